"""torch.compile(fullgraph=True) traces a decoder layer built from minift.ops with no graph break,
with the Triton kernels (interpreter on CPU) and with the plain-PyTorch references."""

from __future__ import annotations

import pytest
import torch

import minift
from minift.testing import write_tiny_checkpoint

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


def _op_cases(device: str):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    q, k = r(2, 3, 5, 8), r(2, 1, 5, 8)
    return {
        "rms_norm": (r(3, 5, 24), r(24), 1e-6, 1.0),
        "layer_norm": (r(3, 24), r(24), r(24), 1e-5),
        "rope": (q, k, torch.randn(1, 5, 8, generator=g).to(device), torch.randn(1, 5, 8, generator=g).to(device)),
        "swiglu": (r(4, 33), r(4, 33)),
        "geglu": (r(4, 33), r(4, 33), "tanh"),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "rope", "swiglu", "geglu"])
def test_custom_op_registration_matches_eager_path(device: str, name: str) -> None:
    """Eager calls run the op's implementation directly (ops._backend.Op); torch.compile sees the
    registered custom op. Both must be the same function, and the registration must pass opcheck
    (schema, fake tensor, autograd registration)."""
    import importlib

    import minift.ops as ops

    # import_module: minift.ops.rms_norm (and layer_norm, rope) is also the function of that name
    mods = {m: importlib.import_module(f"minift.ops.{m}") for m in ("rms_norm", "layer_norm", "rope", "activations")}
    eager = {"rms_norm": mods["rms_norm"]._rms_norm_op, "layer_norm": mods["layer_norm"]._layer_norm_op,
             "rope": mods["rope"]._rope_op, "swiglu": mods["activations"]._swiglu_op,
             "geglu": mods["activations"]._geglu_op}[name]
    args = _op_cases(device)[name]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with ops.backend("triton"):
        results = []
        for fn in (eager, getattr(torch.ops.minift, name)):
            out = fn(*args)
            outs = out if isinstance(out, tuple) else (out,)
            grads = torch.autograd.grad([o.square().sum() for o in outs], leaves)
            results.append((*outs, *grads))
        for a, b in zip(*results):
            assert torch.equal(a, b)
        # test_aot_dispatch_dynamic traces the backward under AOT autograd, where the kernels must
        # stay behind the custom op (a direct launch on fake tensors fails)
        torch.library.opcheck(getattr(torch.ops.minift, name).default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("device", DEVICES)
def test_eager_kernels_under_activation_checkpointing(gemma3_path, device):
    """The eager kernel path (ops._backend.Op autograd.Functions) recomputed by non-reentrant
    checkpointing, as the Trainer runs uncompiled layers, gives the grads of a plain run."""
    model, _ = minift.load(gemma3_path, device=device, dtype=torch.float32)
    minift.add_lora(model, r=4, alpha=8, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.train()
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    with minift.ops.backend("triton"):
        for ckpt in (False, True):
            model.model.gradient_checkpointing = ckpt
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()
            results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert results[0].keys() == results[1].keys() and results[0]
    for n in results[0]:
        torch.testing.assert_close(results[1][n], results[0][n], rtol=1e-5, atol=1e-7, msg=n)
