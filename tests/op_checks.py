"""Shared accuracy criterion for op property tests.

A kernel passes when its error against a float64 reference is no worse than the plain-PyTorch
op's error in the same dtype, plus a small stated tolerance. NaN never passes.
"""

from __future__ import annotations

import torch

# Extra relative error allowed on top of torch's own error, per dtype: a few ulps of the dtype.
EXTRA_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float64: 1e-10}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.double()
    ref = ref.double()
    denom = ref.norm().item()
    num = (x - ref).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_no_worse(kernel: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, what: str, factor: float = 1.0):
    assert kernel.shape == ref64.shape, f"{what}: shape {tuple(kernel.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(kernel).any(), f"{what}: kernel produced NaN"
    assert torch.isfinite(kernel).all() or not torch.isfinite(ref64).all(), f"{what}: kernel produced inf"
    ek = rel_err(kernel, ref64)
    et = rel_err(torch_out, ref64)
    tol = EXTRA_TOL[dtype] * factor
    assert ek <= et + tol, f"{what}: kernel error {ek:.3e} > torch error {et:.3e} + {tol:.1e} ({dtype})"
