"""`gemv(x, w, bias)`: x @ W^T (+ bias) for a few rows of x and a 16-bit W, for decoding.

At batch 1-8 a decode step is a chain of matrix-vector products: each weight byte is read once and
used for a handful of multiply-adds, so the step's time is the weights' bytes over the HBM rate.
cuBLAS's GEMV kernels measured ~52% of the H200's HBM rate inside minift's decode step (bench/
RESULTS.md, "Generation"); this kernel streams W with wide loads and many rows in flight.

Arithmetic: products and sums in float32 (as cuBLAS accumulates), bias added in float32, one
rounding to x's dtype: `F.linear` up to float32 summation order.

Kernel (one program: BLOCK_N rows of W, all of K, BLOCK_M rows of x): W's rows are read in
(BLOCK_N, BLOCK_K) tiles (16-byte vector loads along K, `evict_first`: each byte is read once),
x's in (BLOCK_M, BLOCK_K); the float32 product (BLOCK_M, BLOCK_N, BLOCK_K) is summed over K in
registers. Small BLOCK_N gives many programs (several an SM), which is what keeps enough loads in
flight: a GEMV has no reuse to hide latency behind. No split-K: every program owns its outputs
(deterministic, one launch). `CONFIG_OVERRIDE` replaces the tile rules (the bench sweep's hook).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from . import reference as ref
from ._backend import HAS_TRITON, Op, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
# Rows of x the kernel takes; beyond, a GEMM (cuBLAS) reuses each W tile across rows and wins.
MAX_ROWS = 8
CONFIG_OVERRIDE: dict | None = None  # e.g. dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4)

if HAS_TRITON:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, sxm, swn, som,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        nmask = rn < N
        mmask = rm < M
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * swn + rk[None, :]
        x_ptrs = x_ptr + rm[:, None] * sxm + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                if EVEN_N:
                    w = tl.load(w_ptrs, eviction_policy="evict_first")
                else:
                    w = tl.load(w_ptrs, mask=nmask[:, None], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=mmask[:, None], other=0.0)
            else:
                kmask = (k0 + rk) < K
                w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm[:, None] * som + rn[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _block_m(m: int) -> int:
    return 1 if m <= 1 else 1 << (m - 1).bit_length()


def _config(m: int, n: int, k: int) -> dict:
    """Tile rules: the float32 product tile (BLOCK_M x BLOCK_N x BLOCK_K) held to 8K values (64 a
    thread at 4 warps), K covered in as few iterations as that allows, BLOCK_N then as small as
    that leaves (more programs in flight)."""
    bm = _block_m(m)
    bk = min(1 << max(k - 1, 1).bit_length(), 2048 // bm if bm <= 8 else 256)
    bk = max(bk, 64)
    bn = max(1, 8192 // (bm * bk))
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=1)
    if CONFIG_OVERRIDE:
        cfg.update(CONFIG_OVERRIDE)
    return cfg


def _kernel_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    m = x.numel() // max(1, x.shape[-1])
    return use_triton(x) and x.dtype in _FLOATS and w.dtype == x.dtype and 0 < m <= MAX_ROWS


def _launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = w.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = _config(m, n, k)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemv_kernel[grid](
        x2, w, bias if bias is not None else w, out, m, n, k, x2.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        EVEN_N=n % cfg["BLOCK_N"] == 0, EVEN_K=k % cfg["BLOCK_K"] == 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out.view(*x.shape[:-1], n)


# ---- the op: forward, backward, registration -------------------------------------------------


def _gemv_impl(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _kernel_ok(x, w):
        return _launch(x, w, None if bias is None else bias.to(x.dtype))
    return ref.linear(x, w, bias)


def _gemv_fake(x, w, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _gemv_setup(ctx, inputs, output):
    x, w, bias = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = bias is not None


def _gemv_backward(ctx, grad):
    x, w = ctx.saved_tensors
    g2 = grad.reshape(-1, grad.shape[-1])
    dx = (g2 @ w.to(grad.dtype)).view(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
    dw = (g2.T @ x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(w.dtype) if ctx.needs_input_grad[1] else None
    db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


_gemv_op = Op("gemv", _gemv_impl, _gemv_fake, _gemv_setup, _gemv_backward)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias): x (..., K), W (N, K) -> (..., N) in x's dtype, read at the HBM rate for up to
    MAX_ROWS rows of x on CUDA (the kernel); more rows, another device or mixed dtypes: F.linear.
    Differentiable in x, W and bias."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise InputError(f"x: expected a floating-point tensor with at least 1 dim, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise InputError(f"w: expected a 2-d floating-point (out_features, in_features) tensor, got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    if x.shape[-1] != w.shape[1]:
        raise InputError(f"x: last dim {x.shape[-1]} != w's in_features {w.shape[1]}")
    if w.device != x.device:
        raise InputError(f"w: is on {w.device} but x is on {x.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (w.shape[0],)):
        raise InputError(f"bias: expected shape ({w.shape[0]},), got {getattr(bias, 'shape', bias)!r}")
    return _gemv_op(x, w, bias)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except where `gemv`'s kernel is faster: a few rows of x, no gradient wanted (decoding).
    Under autograd (training) it is F.linear exactly, so a compiled training graph never branches on
    the number of rows."""
    if not torch.is_grad_enabled() and x.numel() <= MAX_ROWS * x.shape[-1] and x.is_cuda and w.dtype == x.dtype:
        return _gemv_op(x, w, bias)
    return F.linear(x, w, bias)
