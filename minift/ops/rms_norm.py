"""RMSNorm: Triton kernels with custom autograd, dispatched against the reference.

The backward recomputes each row's rstd from x (only the inputs are saved); the weight-grad
machinery it shares with layer_norm is in _norm_common.
"""

from __future__ import annotations

import torch

from . import reference as ref
from ._backend import HAS_TRITON, Op
from ._norm_common import _rows, check, kernel_ok, norm_backward, norm_forward

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._norm_common import _add2, _emit, _load_rows, _store_box

    @triton.jit
    def _rms_fwd_kernel(X, W, Y, M, N, stride_xm, stride_xn, stride_ym, eps, offset,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = (rows < M)[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        y = x * rstd[:, None] * w[None, :]
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_dx(g, x, rstd, c, eps, N):
        dx = (g - x * (rstd * c)[:, None]) * rstd[:, None]
        if N == 1:  # 1-D row: g - xhat*c = g*eps*rstd^2 exactly; the subtraction would keep no digits
            dx = g * (eps * rstd * rstd * rstd)[:, None]
        return dx

    @triton.jit
    def _rms_bwd_kernel(DY, X, W, DX, DWP, M, N, stride_dym, stride_dyn, stride_xm, stride_xn, stride_dxm,
                        eps, offset, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
                        MASK_A: tl.constexpr, ATOMIC: tl.constexpr):
        """One padded part per row (BLOCK_A >= N): splitting off the remainder would double the one
        row-sum reduction this kernel has, which measured slower (see _bwd_config)."""
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        ca = tl.arange(0, BLOCK_A)
        wa = tl.load(W + ca, mask=ca < N, other=0.0).to(tl.float32) + offset
        dwa = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)  # reduced over rows once, after the loop
        # With COMPUTE_DW each persistent program loops over many tiles, pipelined by hand: the next
        # tile's loads are issued before this tile's maths, two tiles in flight (loads past the end
        # are masked off); 1.07-1.3x on an H100. Without it each program has one tile.
        if COMPUTE_DW:
            rows_n, ma_n, _, xa_n, dya_n, _, _ = _load_rows(X, DY, pid, M, N, stride_xm, stride_xn, stride_dym,
                                                            stride_dyn, BLOCK_M, BLOCK_A, 0, MASK_A)
        for blk in range(pid, tl.cdiv(M, BLOCK_M), step):
            if COMPUTE_DW:
                rows, ma, xa, dya = rows_n, ma_n, xa_n, dya_n
                rows_n, ma_n, _, xa_n, dya_n, _, _ = _load_rows(X, DY, blk + step, M, N, stride_xm, stride_xn,
                                                                stride_dym, stride_dyn, BLOCK_M, BLOCK_A, 0, MASK_A)
            else:
                rows, ma, _, xa, dya, _, _ = _load_rows(X, DY, blk, M, N, stride_xm, stride_xn, stride_dym,
                                                        stride_dyn, BLOCK_M, BLOCK_A, 0, MASK_A)
            xa, dya = xa.to(tl.float32), dya.to(tl.float32)
            ga = dya * wa[None, :]
            # both row sums in one reduction (one cross-warp exchange, not two): sum(g * xhat) is
            # rstd * sum(g * x), so it need not wait for rstd
            ssq, sgx = tl.reduce((xa * xa, ga * xa), 1, _add2)
            rstd = 1.0 / tl.sqrt(ssq / N + eps)
            c = rstd * sgx / N
            dxa = _rms_dx(ga, xa, rstd, c, eps, N)
            tl.store(DX + rows[:, None] * stride_dxm + ca[None, :], dxa.to(DX.dtype.element_ty), mask=ma)
            if COMPUTE_DW:
                dwa += dya * xa * rstd[:, None]
        if COMPUTE_DW:
            _emit(DWP, tl.sum(dwa, axis=0), ca, ca < N, 0, pid, step, N, ATOMIC)

    @triton.jit
    def _rms_bwd_tma_kernel(DYD, XD, W, DX, DWP, M, N, stride_dxm, eps, offset, BLOCK_M: tl.constexpr,
                            NSUB: tl.constexpr, SUB: tl.constexpr, STAGES: tl.constexpr, ATOMIC: tl.constexpr):
        """rms_norm backward with weight grad on Hopper: x and dy arrive by TMA into shared memory,
        STAGES row blocks in flight (the pointer kernel keeps one more in registers, which caps its
        occupancy). A row is viewed as (N // SUB, SUB) sub-rows and loaded as a (BLOCK_M, NSUB, SUB)
        box; sub-rows past the row end come back zero-filled without being read, so a width that is
        not a power of two moves no padding (2560 = 10 x 256 in a 16 x 256 box)."""
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        s = tl.arange(0, NSUB)[:, None] * SUB + tl.arange(0, SUB)[None, :]
        w = (tl.load(W + s, mask=s < N, other=0.0).to(tl.float32) + offset)[None, :, :]
        dw = tl.zeros((BLOCK_M, NSUB, SUB), dtype=tl.float32)
        for blk in tl.range(pid, tl.cdiv(M, BLOCK_M), step, num_stages=STAGES):
            x = XD.load([blk * BLOCK_M, 0, 0]).to(tl.float32)
            dy = DYD.load([blk * BLOCK_M, 0, 0]).to(tl.float32)
            g = dy * w
            ssq, sgx = tl.reduce((x * x, g * x), 2, _add2)
            ssq, sgx = tl.reduce((ssq, sgx), 1, _add2)
            rstd = 1.0 / tl.sqrt(ssq / N + eps)
            r = rstd[:, None, None]
            dx = (g - x * (rstd * rstd * sgx / N)[:, None, None]) * r
            _store_box(DX, blk * BLOCK_M, M, N, stride_dxm, dx, s, BLOCK_M)
            dw += dy * x * r
        _emit(DWP, tl.sum(dw, axis=0), s, s < N, 0, pid, step, N, ATOMIC)


def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    return norm_forward(_rms_fwd_kernel, x, (weight.contiguous(),), (eps, offset))


def _rms_norm_fake(x, weight, eps, offset):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _rms_norm_bwd_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                     weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight); dweight is an empty placeholder when not wanted (frozen norms under LoRA)."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight, memory_format=torch.contiguous_format) if weight_grad else weight.new_empty(0)
    x2, dy2, dx2 = _rows(x), _rows(dy), dx.view(-1, x.shape[-1])
    dw = norm_backward(False, (_rms_bwd_kernel, _rms_bwd_tma_kernel), dy2, x2, weight.contiguous(), dx2,
                       (eps, offset), weight_grad, weight.dtype)
    return dx, dw[0] if weight_grad else weight.new_empty(0)


def _rms_norm_bwd_fake(dy, x, weight, eps, offset, weight_grad):
    dw = weight.new_empty(weight.shape if weight_grad else 0)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), dw


_rms_norm_bwd_op = Op("rms_norm_backward", _rms_norm_bwd_impl, _rms_norm_bwd_fake)


def _rms_setup(ctx, inputs, output):
    x, weight, eps, offset = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.offset = eps, offset


def _rms_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[1]
    dx, dw = _rms_norm_bwd_op(dy, x, weight, ctx.eps, ctx.offset, weight_grad)
    return dx, dw if weight_grad else None, None, None


_rms_norm_op = Op("rms_norm", _rms_norm_impl, _rms_norm_fake, _rms_setup, _rms_backward)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * (offset + weight) over the last dim, in fp32, cast to x's dtype.

    offset=1.0 is Gemma's (1 + weight) form. float64 and rows wider than 65536 use the reference.
    """
    check("rms_norm", x, weight)
    if kernel_ok(x):
        return _rms_norm_op(x, weight, float(eps), float(offset))
    return ref.rms_norm(x, weight, eps, offset)
