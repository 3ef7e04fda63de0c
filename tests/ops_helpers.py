"""Test helpers shared by the op property tests (tests/test_ops_*.py)."""

from __future__ import annotations

import torch

import minift.ops as ops


def upstream(y: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """The gradient reaching the op: ones expanded by sum(), a random tensor, or an expanded row."""
    if mode == "sum":
        return torch.ones((), dtype=y.dtype, device=y.device).expand(y.shape)
    if mode == "expand" and y.dim():
        row = torch.randn(y.shape[-1], generator=gen, dtype=torch.float64, device=gen.device).to(y.device, y.dtype)
        return row.expand(y.shape)
    return torch.randn(y.shape, generator=gen, dtype=torch.float64, device=gen.device).to(y.device, y.dtype)


def assert_compiled_matches_eager(f, inputs: tuple, device: str) -> None:
    """f(*inputs) -> a scalar loss, with the Triton path forced: torch.compile(fullgraph=True) traces
    the custom ops (forward and backward) without graph breaks, with the loss and grads of eager."""
    backend = "inductor" if device == "cuda" else "aot_eager"  # inductor's cold CPU compile is ~30 s
    torch._dynamo.reset()
    with ops.backend("triton"):
        outs = []
        for fn in (f, torch.compile(f, fullgraph=True, backend=backend)):
            leaves = [t.clone().requires_grad_() for t in inputs]
            loss = fn(*leaves)
            loss.backward()
            outs.append([loss] + [t.grad for t in leaves])
    for e, c in zip(*outs):
        torch.testing.assert_close(c, e)
