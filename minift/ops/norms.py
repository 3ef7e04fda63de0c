"""RMSNorm and LayerNorm: Triton kernels with custom autograd, dispatched against the reference.

Both ops save only their inputs: the backward kernel recomputes the row statistics from the x it
has to load anyway, which costs no extra memory traffic. Weight/bias gradients are reduced in two
stages without atomics (each persistent program sums its rows in fp32, one more launch sums the partials),
which keeps them deterministic. Rows are processed as (BLOCK_M, BLOCK_N) tiles so small hidden
sizes (per-head q/k norms) still give each program a useful amount of work.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..errors import InputError
from . import reference as ref
from ._backend import HAS_TRITON, Op, use_triton

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BLOCK_N = 65536  # one row must fit one tile; LLM hidden sizes are far below this

if HAS_TRITON:
    import triton
    import triton.language as tl

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
    def _load_tile(X, DY, blk, M, cols, cmask, stride_xm, stride_xn, stride_dym, stride_dyn, BLOCK_M: tl.constexpr):
        """Row block `blk`: its rows, mask, and x and dy in their storage dtype."""
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows < M)[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
        return rows, mask, x, dy

    @triton.jit
    def _add2(a0, a1, b0, b1):
        return a0 + b0, a1 + b1

    @triton.jit
    def _add3(a0, a1, a2, b0, b1, b2):
        return a0 + b0, a1 + b1, a2 + b2

    @triton.jit
    def _rms_bwd_kernel(DY, X, W, DX, DWP, M, N, stride_dym, stride_dyn, stride_xm, stride_xn, stride_dxm,
                        eps, offset, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # reduced over rows once, after the loop
        # With COMPUTE_DW each persistent program loops over many tiles: software pipelining by hand
        # issues the next tile's loads before this tile's maths, two tiles in flight (loads past the
        # end are masked off); 1.07-1.3x on an H100. Without it each program has one tile.
        if COMPUTE_DW:
            rows, mask, x_next, dy_next = _load_tile(X, DY, pid, M, cols, cmask, stride_xm, stride_xn,
                                                     stride_dym, stride_dyn, BLOCK_M)
        for blk in range(pid, tl.cdiv(M, BLOCK_M), step):
            if COMPUTE_DW:
                cur_rows, cur_mask, x, dy = rows, mask, x_next.to(tl.float32), dy_next.to(tl.float32)
                rows, mask, x_next, dy_next = _load_tile(X, DY, blk + step, M, cols, cmask, stride_xm, stride_xn,
                                                         stride_dym, stride_dyn, BLOCK_M)
            else:
                cur_rows, cur_mask, x, dy = _load_tile(X, DY, blk, M, cols, cmask, stride_xm, stride_xn,
                                                       stride_dym, stride_dyn, BLOCK_M)
                x, dy = x.to(tl.float32), dy.to(tl.float32)
            g = dy * w[None, :]
            # both row sums in one reduction (one cross-warp exchange, not two): sum(g * xhat) is
            # rstd * sum(g * x), so it need not wait for rstd
            ssq, sgx = tl.reduce((x * x, g * x), 1, _add2)
            rstd = 1.0 / tl.sqrt(ssq / N + eps)
            xhat = x * rstd[:, None]
            c = rstd * sgx / N
            dx = (g - xhat * c[:, None]) * rstd[:, None]
            if N == 1:  # 1-D row: g - xhat*c = g*eps*rstd^2 exactly; the subtraction would keep no digits
                dx = g * (eps * rstd * rstd * rstd)[:, None]
            tl.store(DX + cur_rows[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=cur_mask)
            if COMPUTE_DW:
                dw += dy * xhat
        if COMPUTE_DW:
            tl.store(DWP + pid * N + cols, tl.sum(dw, axis=0), mask=cmask)

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
    def _ln_bwd_kernel(DY, X, W, DX, DWP, DBP, M, N, stride_dym, stride_dyn, stride_xm, stride_xn, stride_dxm,
                       eps, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # reduced over rows once, after the loop
        db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if COMPUTE_DW:  # next tile's loads first: see _rms_bwd_kernel
            rows, mask, x_next, dy_next = _load_tile(X, DY, pid, M, cols, cmask, stride_xm, stride_xn,
                                                     stride_dym, stride_dyn, BLOCK_M)
        for blk in range(pid, tl.cdiv(M, BLOCK_M), step):
            if COMPUTE_DW:
                cur_rows, cur_mask, x, dy = rows, mask, x_next.to(tl.float32), dy_next.to(tl.float32)
                rows, mask, x_next, dy_next = _load_tile(X, DY, blk + step, M, cols, cmask, stride_xm, stride_xn,
                                                         stride_dym, stride_dyn, BLOCK_M)
            else:
                cur_rows, cur_mask, x, dy = _load_tile(X, DY, blk, M, cols, cmask, stride_xm, stride_xn,
                                                       stride_dym, stride_dyn, BLOCK_M)
                x, dy = x.to(tl.float32), dy.to(tl.float32)
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(cur_mask, x - mean[:, None], 0.0)
            g = dy * w[None, :]
            if COMPUTE_DW:  # one exchange (see _rms_bwd_kernel): 1.0-1.15x here on an H100,
                ssq, sgx, sg = tl.reduce((xc * xc, g * xc, g), 1, _add3)
            else:  # but 1.02-1.2x slower than three sums on the one-tile-per-program grid
                ssq, sgx, sg = tl.sum(xc * xc, axis=1), tl.sum(g * xc, axis=1), tl.sum(g, axis=1)
            rstd = 1.0 / tl.sqrt(ssq / N + eps)
            xhat = xc * rstd[:, None]
            c1 = rstd * sgx / N
            c2 = sg / N
            h = g - c2[:, None]
            dx = (h - xhat * c1[:, None]) * rstd[:, None]
            if N <= 2:  # centred rows span one direction: h - xhat*c1 = h*eps*rstd^2 exactly (see _rms_bwd_kernel)
                dx = tl.where(cur_mask, h * (eps * rstd * rstd * rstd)[:, None], 0.0)
            if N == 1:  # y = bias whatever x is; h would be g - g, which FMA contraction may leave as the
                dx = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # product's rounding error (x 1/sqrt(eps))
            tl.store(DX + cur_rows[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=cur_mask)
            if COMPUTE_DW:
                dw += dy * xhat
                db += dy
        if COMPUTE_DW:
            tl.store(DWP + pid * N + cols, tl.sum(dw, axis=0), mask=cmask)
            tl.store(DBP + pid * N + cols, tl.sum(db, axis=0), mask=cmask)

    @triton.jit
    def _sum_partials_kernel(P, OUT, R, N, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """OUT[k, c] = sum over r of P[k, r, c], cast to OUT's dtype: each program loads all R partial
        rows of its columns at once (one round trip; a loop over rows is latency-bound)."""
        k = tl.program_id(1).to(tl.int64)
        rows = tl.arange(0, BLOCK_R)
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < R)[:, None] & (cols < N)[None, :]
        p = tl.load(P + k * R * N + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
        tl.store(OUT + k * N + cols, tl.sum(p, axis=0).to(OUT.dtype.element_ty), mask=cols < N)


def _tiles(n: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a one-tile-per-program kernel: one row per tile for wide
    rows, several for narrow ones.

    Forward (and the persistent weight-gradient backward): ~16 elements per thread per tensor up to
    4096-element tiles. Backward without weight grads: tiles of at least 2048 elements at 16 per
    thread; an H100 sweep (bf16, 8192 rows x 2048/2560, 65536 x 256) put these within 3% of the best
    of 16 configs, where 32 per thread was up to 1.5x slower. ptxas for sm_90 reports no spills for
    any forward up to 16384 wide nor backward up to 4096.
    """
    block_n = triton.next_power_of_2(n)
    if backward:
        block_m = max(1, min(16, 2048 // block_n))
        return block_m, block_n, min(16, max(2, block_m * block_n // 512))
    block_m = max(1, min(16, 4096 // block_n))
    return block_m, block_n, min(32, max(4, block_m * block_n // 512))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _weight_grad_launch(x: torch.Tensor, m: int, n: int) -> tuple[int, int, int, int]:
    """(grid, BLOCK_M, BLOCK_N, num_warps) of the persistent weight-gradient backward.

    Two programs per SM on the forward's 4096-element tiles: in an H100 sweep (bf16; programs per SM
    2-8, tiles 2048-8192, 2-16 warps) the kernel then ran within 1-3 us of the no-weight-grad one at
    8192 x 2048/2560/4096 and 65536 x 256; more programs gave more partial rows to sum, which cost
    more than they saved (a torch sum of 528 x 4096 partials took 17 us).
    """
    bm, bn, nw = _tiles(n, backward=False)
    per_device = 2 * _sm_count(x.device.index or 0) if x.is_cuda else 8
    return max(1, min(triton.cdiv(m, bm), per_device)), bm, bn, min(16, nw)


def _sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(K, R, N) fp32 per-program partials -> (K, N) sums in `dtype`, in one launch."""
    k, r, n = partials.shape
    out = torch.empty((k, n), dtype=dtype, device=partials.device)
    block_r = triton.next_power_of_2(r)
    block_c = min(triton.next_power_of_2(n), max(1, 8192 // block_r))
    _sum_partials_kernel[(triton.cdiv(n, block_c), k)](partials, out, r, n, BLOCK_R=block_r, BLOCK_C=block_c,
                                                       num_warps=8)
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (rows, hidden) view (a copy only when no view exists); any strides, stride 0 included."""
    return t.reshape(-1, t.shape[-1])


# ---------------------------------------------------------------- RMSNorm custom ops


def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    x2, y2 = _rows(x), out.view(-1, x.shape[-1])
    m, n = x2.shape
    bm, bn, nw = _tiles(n, backward=False)
    _rms_fwd_kernel[(triton.cdiv(m, bm),)](
        x2, weight.contiguous(), y2, m, n, x2.stride(0), x2.stride(1), y2.stride(0), eps, offset,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=nw)
    return out


def _rms_norm_fake(x, weight, eps, offset):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _rms_norm_bwd_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                     weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight); dweight is an empty placeholder when not wanted (frozen norms under LoRA)."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight, memory_format=torch.contiguous_format) if weight_grad else weight.new_empty(0)
    x2, dy2, dx2 = _rows(x), _rows(dy), dx.view(-1, x.shape[-1])
    m, n = x2.shape
    if weight_grad:
        grid, bm, bn, nw = _weight_grad_launch(x, m, n)
    else:
        bm, bn, nw = _tiles(n, backward=True)
        grid = triton.cdiv(m, bm)
    dwp = torch.empty((grid if weight_grad else 0, n), dtype=torch.float32, device=x.device)
    _rms_bwd_kernel[(grid,)](
        dy2, x2, weight.contiguous(), dx2, dwp, m, n, dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1),
        dx2.stride(0), eps, offset, COMPUTE_DW=weight_grad, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw)
    return dx, _sum_partials(dwp[None], weight.dtype)[0] if weight_grad else weight.new_empty(0)


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


# ---------------------------------------------------------------- LayerNorm custom ops


def _layer_norm_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    x2, y2 = _rows(x), out.view(-1, x.shape[-1])
    m, n = x2.shape
    bm, bn, nw = _tiles(n, backward=False)
    _ln_fwd_kernel[(triton.cdiv(m, bm),)](
        x2, weight.contiguous(), weight if bias is None else bias.contiguous(), y2, m, n,
        x2.stride(0), x2.stride(1), y2.stride(0), eps,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw)
    return out


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
    m, n = x2.shape
    if param_grads:
        grid, bm, bn, nw = _weight_grad_launch(x, m, n)
    else:
        bm, bn, nw = _tiles(n, backward=True)
        grid = triton.cdiv(m, bm)
    dwp = torch.empty((2, grid if param_grads else 0, n), dtype=torch.float32, device=x.device)
    _ln_bwd_kernel[(grid,)](
        dy2, x2, weight.contiguous(), dx2, dwp[0], dwp[1], m, n, dy2.stride(0), dy2.stride(1), x2.stride(0),
        x2.stride(1), dx2.stride(0), eps, COMPUTE_DW=param_grads, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw)
    return dx, _sum_partials(dwp, torch.float32) if param_grads else dwp.new_empty(0)


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


# ---------------------------------------------------------------- public functions


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Shape/dtype/device checks in plain Python, so torch.compile turns them into guards, not breaks."""
    if x.dim() < 1:
        raise InputError(f"{op}: x must have at least one dimension (the normalised one), got a scalar")
    if not x.is_floating_point():
        raise InputError(f"{op}: x must be a floating-point tensor, got dtype {x.dtype}")
    named = [("weight", weight)] + ([] if bias is None else [("bias", bias)])
    for name, t in named:
        if tuple(t.shape) != (x.shape[-1],):
            raise InputError(f"{op}: {name} must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise InputError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != x.device:
            raise InputError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _kernel_ok(x: torch.Tensor) -> bool:
    return use_triton(x, elementwise=True) and x.dtype in _KERNEL_DTYPES and x.shape[-1] <= _MAX_BLOCK_N


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * (offset + weight) over the last dim, in fp32, cast to x's dtype.

    offset=1.0 is Gemma's (1 + weight) form. float64 and rows wider than 65536 use the reference.
    """
    _check("rms_norm", x, weight)
    if _kernel_ok(x):
        return _rms_norm_op(x, weight, float(eps), float(offset))
    return ref.rms_norm(x, weight, eps, offset)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim (bias optional), in fp32, cast to x's dtype."""
    _check("layer_norm", x, weight, bias)
    if _kernel_ok(x):
        return _layer_norm_op(x, weight, bias, float(eps))
    return ref.layer_norm(x, weight, bias, eps)
