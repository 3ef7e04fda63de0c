"""RMSNorm and LayerNorm: Triton kernels with custom autograd, dispatched against the reference.

Both ops save only their inputs: the backward kernel recomputes the row statistics from the x it
has to load anyway, which costs no extra memory traffic. Weight/bias gradients are reduced in two
stages without atomics (each persistent program sums its rows in fp32, one more launch sums the partials),
which keeps them deterministic on a given GPU; the persistent grid is as many programs as fit on it
at once, read from the compiled kernel's registers. Rows are processed as (BLOCK_M, BLOCK_N) tiles so
small hidden sizes (per-head q/k norms) still give each program a useful amount of work; the backward
kernels can split a row into a power-of-two part and a remainder instead of padding it.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..errors import InputError
from . import reference as ref
from ._backend import HAS_TRITON, INTERPRET, Op, use_triton

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
    def _load_rows(X, DY, blk, M, N, stride_xm, stride_xn, stride_dym, stride_dyn,
                   BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, MASK_A: tl.constexpr):
        """Row block `blk` as up to two column parts: its rows, A's mask, B's mask, and x and dy of
        part A (columns [0, BLOCK_A), masked at N only when MASK_A) and part B ([BLOCK_A, BLOCK_A +
        BLOCK_B), masked at N; absent when BLOCK_B is 0), in their storage dtype. Two parts let a width
        that is not a power of two (2560 = 2048 + 512, SigLIP's 1152 = 1024 + 128) run without padded
        lanes, at the price of a second reduction per row sum (see _bwd_config for which wins)."""
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        ca = tl.arange(0, BLOCK_A)
        ma = (rows < M)[:, None]
        if MASK_A:
            ma = ma & (ca < N)[None, :]
        xa = tl.load(X + rows[:, None] * stride_xm + ca[None, :] * stride_xn, mask=ma, other=0.0)
        dya = tl.load(DY + rows[:, None] * stride_dym + ca[None, :] * stride_dyn, mask=ma, other=0.0)
        if BLOCK_B > 0:
            cb = BLOCK_A + tl.arange(0, BLOCK_B)
            mb = (rows < M)[:, None] & (cb < N)[None, :]
            xb = tl.load(X + rows[:, None] * stride_xm + cb[None, :] * stride_xn, mask=mb, other=0.0)
            dyb = tl.load(DY + rows[:, None] * stride_dym + cb[None, :] * stride_dyn, mask=mb, other=0.0)
        else:
            mb, xb, dyb = ma, xa, dya  # unused
        return rows, ma, mb, xa, dya, xb, dyb

    @triton.jit
    def _add2(a0, a1, b0, b1):
        return a0 + b0, a1 + b1

    @triton.jit
    def _add3(a0, a1, a2, b0, b1, b2):
        return a0 + b0, a1 + b1, a2 + b2

    @triton.jit
    def _rms_dx(g, x, rstd, c, eps, N):
        dx = (g - x * (rstd * c)[:, None]) * rstd[:, None]
        if N == 1:  # 1-D row: g - xhat*c = g*eps*rstd^2 exactly; the subtraction would keep no digits
            dx = g * (eps * rstd * rstd * rstd)[:, None]
        return dx

    @triton.jit
    def _rms_bwd_kernel(DY, X, W, DX, DWP, M, N, stride_dym, stride_dyn, stride_xm, stride_xn, stride_dxm,
                        eps, offset, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
                        MASK_A: tl.constexpr, PIPELINE: tl.constexpr):
        """One padded part per row (BLOCK_A >= N): splitting off the remainder would double the one
        row-sum reduction this kernel has, which measured slower (see _bwd_config)."""
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        ca = tl.arange(0, BLOCK_A)
        wa = tl.load(W + ca, mask=ca < N, other=0.0).to(tl.float32) + offset
        dwa = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)  # reduced over rows once, after the loop
        # With COMPUTE_DW each persistent program loops over many tiles; PIPELINE (software pipelining
        # by hand) then issues the next tile's loads before this tile's maths, two tiles in flight
        # (loads past the end are masked off); 1.07-1.3x on an H100. Without it each program has one tile.
        if PIPELINE:
            rows_n, ma_n, _, xa_n, dya_n, _, _ = _load_rows(X, DY, pid, M, N, stride_xm, stride_xn, stride_dym,
                                                            stride_dyn, BLOCK_M, BLOCK_A, 0, MASK_A)
        for blk in range(pid, tl.cdiv(M, BLOCK_M), step):
            if PIPELINE:
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
            tl.store(DWP + pid * N + ca, tl.sum(dwa, axis=0), mask=ca < N)

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
    def _ln_bwd_kernel(DY, X, W, DX, DWP, DBP, M, N, stride_dym, stride_dyn, stride_xm, stride_xn, stride_dxm,
                       eps, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
                       BLOCK_B: tl.constexpr, MASK_A: tl.constexpr, PIPELINE: tl.constexpr):
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
        if PIPELINE:  # next tile's loads first: see _rms_bwd_kernel
            rows_n, ma_n, mb_n, xa_n, dya_n, xb_n, dyb_n = _load_rows(
                X, DY, pid, M, N, stride_xm, stride_xn, stride_dym, stride_dyn, BLOCK_M, BLOCK_A, BLOCK_B, MASK_A)
        for blk in range(pid, tl.cdiv(M, BLOCK_M), step):
            if PIPELINE:
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
            tl.store(DWP + pid * N + ca, tl.sum(dwa, axis=0), mask=ca < N)
            tl.store(DBP + pid * N + ca, tl.sum(dba, axis=0), mask=ca < N)
            if BLOCK_B > 0:
                tl.store(DWP + pid * N + cb, tl.sum(dwb, axis=0), mask=cb < N)
                tl.store(DBP + pid * N + cb, tl.sum(dbb, axis=0), mask=cb < N)

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


def _tiles(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward kernels: one row per tile for wide rows,
    several for narrow ones, ~16 elements per thread per tensor up to 4096-element tiles (ptxas for
    sm_90 reports no spills up to 16384 wide)."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    return block_m, block_n, min(32, max(4, block_m * block_n // 512))


def _bwd_config(n: int, split: bool, weight_grad: bool) -> tuple[int, int, int, bool, int, bool]:
    """(BLOCK_M, BLOCK_A, BLOCK_B, MASK_A, num_warps, PIPELINE) of a backward kernel for rows of n.

    split: columns as the largest power of two <= n plus the rest padded to a power of two, else one
    tile padded to the next power of two. An H100 sweep (bf16; 8192 rows of 1152/2048/2560/4096 and
    65536 of 256) found layer_norm faster split (0.72 -> 0.83 of copy bandwidth at 1152, 0.77 -> 0.90
    at 2560) and rms_norm faster padded (its single row sum would become two). The best tiles there
    held one row (four of 256), with weight grads (programs looping over many tiles) two rows of a
    power-of-two width; at ~16 elements a thread for padded rows of 1024 or more, ~32 otherwise.
    """
    if split:
        a = 1 << (n.bit_length() - 1)
        b = triton.next_power_of_2(n - a) if n > a else 0
    else:
        a, b = triton.next_power_of_2(n), 0
    tile = (2048 if a <= 1024 else 2 * a) if weight_grad and a == n else 1024
    block_m = max(1, min(16, tile // a))
    per_thread = 16 if a >= 1024 and not split else 32
    nw = min(16, max(2, triton.next_power_of_2(triton.cdiv(block_m * (a + b), 32 * per_thread))))
    return block_m, a, b, a > n, nw, weight_grad


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_PER_SM: dict = {}


def _programs_per_sm(kernel, args: tuple, consts: dict, num_warps: int, device: torch.device) -> int:
    """How many programs of `kernel`, compiled for these arguments, fit on one SM at once (registers,
    warps, shared memory), as Triton's fused-softmax tutorial computes it. A persistent grid larger
    than that runs in waves; the weight-gradient kernels hold ~110-255 registers a thread."""
    key = (kernel.fn.__name__, tuple(sorted(consts.items())), num_warps, device.index,
           tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    if key not in _PER_SM:
        compiled = kernel.warmup(*args, grid=(1,), num_warps=num_warps, **consts)
        compiled._init_handles()  # fills in n_regs (the tutorial's way to read them)
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        regs = -(-max(compiled.n_regs, 1) // 8) * 8  # allocated in units of 8 a thread
        threads = torch.cuda.get_device_properties(device).max_threads_per_multi_processor
        fit = min(props["max_num_regs"] // (regs * 32 * num_warps), threads // (32 * num_warps))
        if compiled.metadata.shared:
            fit = min(fit, props["max_shared_mem"] // compiled.metadata.shared)
        _PER_SM[key] = max(1, fit)
    return _PER_SM[key]


def _bwd_launch(kernel, x: torch.Tensor, m: int, n: int, split: bool, weight_grad: bool,
                args) -> tuple[int, dict, int]:
    """(grid, constexprs, num_warps) of a norm backward. Without weight grads one tile per program;
    with them a persistent grid of as many programs as fit on the GPU at once (each sums its rows'
    weight-grad terms, so more programs would only mean more partial rows to add up). `args(partials)`
    gives the kernel's arguments around a partial-sums buffer."""
    bm, a, b, mask_a, nw, pipeline = _bwd_config(n, split, weight_grad)
    consts = dict(COMPUTE_DW=weight_grad, BLOCK_M=bm, BLOCK_A=a, MASK_A=mask_a, PIPELINE=pipeline)
    if split:
        consts["BLOCK_B"] = b
    tiles = triton.cdiv(m, bm)
    if not weight_grad:
        return tiles, consts, nw
    if INTERPRET or not x.is_cuda:  # the interpreter: a few programs, each looping over several tiles
        return min(tiles, 8), consts, nw
    per_sm = _programs_per_sm(kernel, args(x.new_empty((2, 1, n), dtype=torch.float32)), consts, nw, x.device)
    return min(tiles, per_sm * _sm_count(x.device.index or 0)), consts, nw


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
    bm, bn, nw = _tiles(n)
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
    w = weight.contiguous()

    def args(dwp):
        return (dy2, x2, w, dx2, dwp, m, n, dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), dx2.stride(0),
                eps, offset)

    grid, consts, nw = _bwd_launch(_rms_bwd_kernel, x, m, n, False, weight_grad, args)
    dwp = torch.empty((grid if weight_grad else 0, n), dtype=torch.float32, device=x.device)
    _rms_bwd_kernel[(grid,)](*args(dwp), num_warps=nw, **consts)
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
    bm, bn, nw = _tiles(n)
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
    w = weight.contiguous()

    def args(dwp):
        return (dy2, x2, w, dx2, dwp[0], dwp[-1], m, n, dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1),
                dx2.stride(0), eps)

    grid, consts, nw = _bwd_launch(_ln_bwd_kernel, x, m, n, True, param_grads, args)
    dwp = torch.empty((2, grid if param_grads else 0, n), dtype=torch.float32, device=x.device)
    _ln_bwd_kernel[(grid,)](*args(dwp), num_warps=nw, **consts)
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
