"""On CUDA, a small model of real proportions (Llama-style: 64-wide heads, GQA, SwiGLU; Gemma 3's
soft-capped, sliding-window variant), bf16 and NF4 bases: the Trainer's compiled layers give the
eager kernels' loss and LoRA gradients within bf16 noise, with and without checkpointing."""

from __future__ import annotations

import pytest
import torch
from train_utils import rel

import minift
from minift.testing import write_tiny_checkpoint

pytestmark = pytest.mark.gpu
SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
def test_compiled_step_equals_eager(tmp_path, family, four_bit, ckpt):
    extra = dict(sliding_window=256) if family == "gemma3_text" else {}
    path = write_tiny_checkpoint(tmp_path / "m", family, **SHAPE, **extra)
    ids = torch.randint(10, 250, (2, 1024), generator=torch.Generator().manual_seed(0)).cuda()
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, _ = minift.load(path, dtype=torch.bfloat16, device="cuda", load_in_4bit=four_bit)
        minift.add_lora(model, r=16, alpha=16, seed=0)
        with torch.no_grad():  # B = 0 at init: move it so every gradient is non-trivial
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn_like(p))
        model.train()
        model.model.gradient_checkpointing = ckpt
        if compiled:  # as the Trainer does on CUDA
            for layer in model.language_model.layers:
                layer.compile()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}))
    (le, ge), (lc, gc) = results
    assert abs(lc.item() - le.item()) <= 1e-2 * abs(le.item())
    for n in ge:
        assert rel(gc[n], ge[n]) <= 3e-2, n
