"""torch.compile(fullgraph=True) traces a decoder layer built from minift.ops with no graph break,
with the Triton kernels (interpreter on CPU) and with the plain-PyTorch references."""

from __future__ import annotations

import pytest
import torch

import minift
from minift._tiny import write_tiny_checkpoint

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def gemma3_path(tmp_path_factory):
    # Gemma 3 text exercises every op of the decoder: (1 + w) RMSNorm, q/k norms, RoPE, GeGLU.
    return write_tiny_checkpoint(tmp_path_factory.mktemp("g3"), "gemma3_text")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_decoder_layer_matches_eager(gemma3_path, backend, device):
    model, _ = minift.load(gemma3_path, device=device, dtype=torch.float32, full_finetuning=True)
    model.train()
    layer = model.model.layers[1]
    b, s = 2, 9
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, model.config.hidden_size, generator=g).to(device)
    pos = torch.arange(s, device=device).expand(b, s)
    cos, sin = model.model.rotary[layer.layer_type](pos)

    def run(fn):
        xi = x.clone().requires_grad_(True)
        for p in layer.parameters():
            p.grad = None
        out = fn(xi, cos, sin, None)
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        return out.detach(), xi.grad, layer.self_attn.q_proj.weight.grad.clone(), layer.input_layernorm.weight.grad.clone()

    torch._dynamo.reset()
    with minift.ops.backend(backend):
        eager = run(layer)
        compiled = run(torch.compile(layer, fullgraph=True, dynamic=False))
    for e, c in zip(eager, compiled):  # inductor reorders float32 sums: a few ulps apart
        assert ((e - c).norm() / e.norm()).item() <= 2e-5
