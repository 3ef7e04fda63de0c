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


def make_x(m: int, k: int, dtype: torch.dtype, layout: str, device: str, gen: torch.Generator) -> torch.Tensor:
    """(m, k) activations in one of the layouts the matmul op tests draw: contiguous, strided (last
    dim not contiguous), sliced (every other element of wider rows), expanded (one stride-0 row)
    or batched ((2, m, k))."""
    if layout == "strided":  # last dim not contiguous: a transposed view
        return torch.randn(k, m, generator=gen).to(dtype).to(device).t()
    if layout == "sliced":  # rows further apart than K, every other element
        return torch.randn(m, 2 * k + 3, generator=gen).to(dtype).to(device)[:, 1:2 * k + 1:2]
    if layout == "expanded":  # stride-0 rows: one row broadcast
        return torch.randn(1, k, generator=gen).to(dtype).to(device).expand(m, k)
    if layout == "batched":  # (2, m, k): leading dims flattened
        return torch.randn(2, m, k, generator=gen).to(dtype).to(device)
    return torch.randn(m, k, generator=gen).to(dtype).to(device)
