"""LayerNorm (bias optional): Triton kernels with custom autograd, dispatched against the reference.

The backward recomputes each row's mean and rstd from x (only the inputs are saved); the
weight-grad machinery it shares with rms_norm is in _norm_common.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference as ref
from ._backend import HAS_TRITON, Op
from ._norm_common import _rows, check, kernel_ok, norm_backward, norm_forward

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._norm_common import _add3, _emit, _load_rows, _store_box

    @triton.jit
    def _ln_fwd_kernel(X, W, B, Y, M, N, stride_xm, stride_xn, stride_ym, eps,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = (rows < M)[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _ln_dx(g, sg, xhat, rstd, c1, mask, eps, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        h = g - (sg / N)[:, None]
        dx = (h - xhat * c1[:, None]) * rstd[:, None]
        if N <= 2:  # centred rows span one direction: h - xhat*c1 = h*eps*rstd^2 exactly (see _rms_dx)
            dx = tl.where(mask, h * (eps * rstd * rstd * rstd)[:, None], 0.0)
        if N == 1:  # y = bias whatever x is; h would be g - g, which FMA contraction may leave as the
            dx = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # product's rounding error (x 1/sqrt(eps))
        return dx

    @triton.jit
    def _ln_bwd_kernel(DY, X, W, DX, DWP, M, N, stride_dym, stride_dyn, stride_xm, stride_xn, stride_dxm,
                       eps, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
                       BLOCK_B: tl.constexpr, MASK_A: tl.constexpr, ATOMIC: tl.constexpr):
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        ca = tl.arange(0, BLOCK_A)
        cb = BLOCK_A + tl.arange(0, BLOCK_B if BLOCK_B > 0 else 1)
        wa = tl.load(W + ca, mask=ca < N, other=0.0).to(tl.float32)
        dwa = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)  # reduced over rows once, after the loop
        dba = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)
        if BLOCK_B > 0:
            wb = tl.load(W + cb, mask=cb < N, other=0.0).to(tl.float32)
            dwb = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
            dbb = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
        if COMPUTE_DW:  # next tile's loads first: see _rms_bwd_kernel
            rows_n, ma_n, mb_n, xa_n, dya_n, xb_n, dyb_n = _load_rows(
                X, DY, pid, M, N, stride_xm, stride_xn, stride_dym, stride_dyn, BLOCK_M, BLOCK_A, BLOCK_B, MASK_A)
        for blk in range(pid, tl.cdiv(M, BLOCK_M), step):
            if COMPUTE_DW:
                rows, ma, mb, xa, dya, xb, dyb = rows_n, ma_n, mb_n, xa_n, dya_n, xb_n, dyb_n
                rows_n, ma_n, mb_n, xa_n, dya_n, xb_n, dyb_n = _load_rows(
                    X, DY, blk + step, M, N, stride_xm, stride_xn, stride_dym, stride_dyn, BLOCK_M, BLOCK_A, BLOCK_B, MASK_A)
            else:
                rows, ma, mb, xa, dya, xb, dyb = _load_rows(X, DY, blk, M, N, stride_xm, stride_xn, stride_dym,
                                                               stride_dyn, BLOCK_M, BLOCK_A, BLOCK_B, MASK_A)
            xa, dya = xa.to(tl.float32), dya.to(tl.float32)
            ga = dya * wa[None, :]
            if BLOCK_B > 0:
                xb, dyb = xb.to(tl.float32), dyb.to(tl.float32)
                gb = dyb * wb[None, :]
                mean = (tl.sum(xa, axis=1) + tl.sum(xb, axis=1)) / N
                xcb = tl.where(mb, xb - mean[:, None], 0.0)
            else:
                mean = tl.sum(xa, axis=1) / N
            xca = xa - mean[:, None]  # rows past M are all zero: so is their mean
            if MASK_A:
                xca = tl.where(ma, xca, 0.0)
            # the three row sums in one reduction (one cross-warp exchange; see _rms_bwd_kernel)
            ssq, sgx, sg = tl.reduce((xca * xca, ga * xca, ga), 1, _add3)
            if BLOCK_B > 0:
                ssq_b, sgx_b, sg_b = tl.reduce((xcb * xcb, gb * xcb, gb), 1, _add3)
                ssq, sgx, sg = ssq + ssq_b, sgx + sgx_b, sg + sg_b
            rstd = 1.0 / tl.sqrt(ssq / N + eps)
            c1 = rstd * sgx / N
            xhata = xca * rstd[:, None]
            dxa = _ln_dx(ga, sg, xhata, rstd, c1, ma, eps, N, BLOCK_M, BLOCK_A)
            tl.store(DX + rows[:, None] * stride_dxm + ca[None, :], dxa.to(DX.dtype.element_ty), mask=ma)
            if BLOCK_B > 0:
                xhatb = xcb * rstd[:, None]
                dxb = _ln_dx(gb, sg, xhatb, rstd, c1, mb, eps, N, BLOCK_M, BLOCK_B)
                tl.store(DX + rows[:, None] * stride_dxm + cb[None, :], dxb.to(DX.dtype.element_ty), mask=mb)
            if COMPUTE_DW:
                dwa += dya * xhata
                dba += dya
                if BLOCK_B > 0:
                    dwb += dyb * xhatb
                    dbb += dyb
        if COMPUTE_DW:
            _emit(DWP, tl.sum(dwa, axis=0), ca, ca < N, 0, pid, step, N, ATOMIC)
            _emit(DWP, tl.sum(dba, axis=0), ca, ca < N, 1, pid, step, N, ATOMIC)
            if BLOCK_B > 0:
                _emit(DWP, tl.sum(dwb, axis=0), cb, cb < N, 0, pid, step, N, ATOMIC)
                _emit(DWP, tl.sum(dbb, axis=0), cb, cb < N, 1, pid, step, N, ATOMIC)

    @triton.jit
    def _ln_bwd_tma_kernel(DYD, XD, W, DX, DWP, M, N, stride_dxm, eps, BLOCK_M: tl.constexpr,
                           NSUB: tl.constexpr, SUB: tl.constexpr, STAGES: tl.constexpr, ATOMIC: tl.constexpr):
        """layer_norm backward with weight and bias grads by TMA; see _rms_bwd_tma_kernel."""
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        s = tl.arange(0, NSUB)[:, None] * SUB + tl.arange(0, SUB)[None, :]
        w = tl.load(W + s, mask=s < N, other=0.0).to(tl.float32)[None, :, :]
        dw = tl.zeros((BLOCK_M, NSUB, SUB), dtype=tl.float32)
        db = tl.zeros((BLOCK_M, NSUB, SUB), dtype=tl.float32)
        for blk in tl.range(pid, tl.cdiv(M, BLOCK_M), step, num_stages=STAGES):
            x = XD.load([blk * BLOCK_M, 0, 0]).to(tl.float32)
            dy = DYD.load([blk * BLOCK_M, 0, 0]).to(tl.float32)
            g = dy * w
            mean = tl.sum(tl.sum(x, axis=2), axis=1) / N
            xc = tl.where((s < N)[None, :, :], x - mean[:, None, None], 0.0)
            ssq, sgx, sg = tl.reduce((xc * xc, g * xc, g), 2, _add3)
            ssq, sgx, sg = tl.reduce((ssq, sgx, sg), 1, _add3)
            rstd = 1.0 / tl.sqrt(ssq / N + eps)
            r = rstd[:, None, None]
            xhat = xc * r
            dx = ((g - (sg / N)[:, None, None]) - xhat * (rstd * sgx / N)[:, None, None]) * r
            _store_box(DX, blk * BLOCK_M, M, N, stride_dxm, dx, s, BLOCK_M)
            dw += dy * xhat
            db += dy
        _emit(DWP, tl.sum(dw, axis=0), s, s < N, 0, pid, step, N, ATOMIC)
        _emit(DWP, tl.sum(db, axis=0), s, s < N, 1, pid, step, N, ATOMIC)


def _layer_norm_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return norm_forward(_ln_fwd_kernel, x, (weight.contiguous(), weight if bias is None else bias.contiguous()), (eps,),
                        HAS_BIAS=bias is not None)


def _layer_norm_fake(x, weight, bias, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _layer_norm_bwd_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, param_grads: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, [dweight; dbias]): the latter a (2, hidden) fp32 tensor (the autograd wrapper casts each
    row to its parameter's dtype; one output, since a custom op's outputs may not alias), or an
    empty placeholder when not wanted (frozen parameters)."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, weight.new_zeros((2, weight.shape[0]) if param_grads else (0,), dtype=torch.float32)
    x2, dy2, dx2 = _rows(x), _rows(dy), dx.view(-1, x.shape[-1])
    dwdb = norm_backward(True, (_ln_bwd_kernel, _ln_bwd_tma_kernel), dy2, x2, weight.contiguous(), dx2, (eps,),
                         param_grads, torch.float32)
    return dx, dwdb if param_grads else dx.new_empty(0, dtype=torch.float32)


def _layer_norm_bwd_fake(dy, x, weight, eps, param_grads):
    g = weight.new_empty((2, weight.shape[0]) if param_grads else (0,), dtype=torch.float32)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), g


_layer_norm_bwd_op = Op("layer_norm_backward", _layer_norm_bwd_impl, _layer_norm_bwd_fake)


def _ln_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype


def _ln_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    want_w, want_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, dwdb = _layer_norm_bwd_op(dy, x, weight, ctx.eps, want_w or want_b)
    dw = dwdb[0].to(weight.dtype) if want_w else None
    db = dwdb[1].to(ctx.bias_dtype) if want_b else None
    return dx, dw, db, None


_layer_norm_op = Op("layer_norm", _layer_norm_impl, _layer_norm_fake, _ln_setup, _ln_backward)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim (bias optional), in fp32, cast to x's dtype."""
    check("layer_norm", x, weight, bias)
    if kernel_ok(x):
        return _layer_norm_op(x, weight, bias, float(eps))
    return ref.layer_norm(x, weight, bias, eps)
