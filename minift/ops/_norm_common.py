"""What rms_norm and layer_norm share: the backward's weight-gradient machinery and the launch plans.

Both ops save only their inputs: the backward kernel recomputes the row statistics from the x it
has to load anyway, which costs no extra memory traffic. Weight/bias gradients come from a
persistent grid (as many programs as fit on the GPU at once, read from the compiled kernel's
registers), each program summing its rows in fp32; the per-program sums are then added up by a
second launch (deterministic), or, for layer_norm's wide rows, by fp32 atomics into one buffer
(faster; not under torch.use_deterministic_algorithms). Rows are processed as (BLOCK_M, BLOCK_N)
tiles so small hidden sizes (per-head q/k norms) still give each program a useful amount of work;
the backward kernels can split a row into a power-of-two part and a remainder instead of padding
it, and on Hopper the weight-grad backward of such rows loads them by TMA instead.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..errors import InputError
from ._backend import HAS_TRITON, INTERPRET, use_triton

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BLOCK_N = 65536  # one row must fit one tile; LLM hidden sizes are far below this

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

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
    def _emit(P, v, cols, mask, j, pid, R, N, ATOMIC: tl.constexpr):
        """This program's sum of weight-grad quantity j over its rows: atomically added to P[j, cols]
        of a zeroed (k, N) fp32 buffer (ATOMIC), else stored as partial row P[j, pid, cols] of a
        (k, R, N) one for _sum_partials_kernel (deterministic)."""
        if ATOMIC:
            tl.atomic_add(P + j * N + cols, v, mask=mask, sem="relaxed")
        else:
            tl.store(P + (j * R + pid) * N + cols, v, mask=mask)

    @triton.jit
    def _store_box(DX, r0, M, N, stride_dxm, dx, s, BLOCK_M: tl.constexpr):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        tl.store(DX + rows[:, None, None] * stride_dxm + s[None, :, :], dx.to(DX.dtype.element_ty),
                 mask=(rows < M)[:, None, None] & (s < N)[None, :, :])

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


def _bwd_config(n: int, split: bool, weight_grad: bool) -> tuple[int, int, int, bool, int]:
    """(BLOCK_M, BLOCK_A, BLOCK_B, MASK_A, num_warps) of a backward kernel for rows of n.

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
    return block_m, a, b, a > n, nw


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _sm_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


_PER_SM: dict = {}


def _programs_per_sm(kernel, args, consts: dict, opts: dict, x: torch.Tensor) -> int:
    """How many programs of `kernel`, compiled for these arguments, fit on one SM at once (registers,
    warps, shared memory), as Triton's fused-softmax tutorial computes it. A persistent grid larger
    than that runs in waves; the weight-gradient kernels hold ~110-255 registers a thread. `args()`
    gives arguments to compile with; it is only called the first time a config is seen."""
    key = (kernel.fn.__name__, tuple(sorted(consts.items())), tuple(sorted(opts.items())), x.device.index, x.dtype)
    num_warps = opts["num_warps"]
    if key not in _PER_SM:
        compiled = kernel.warmup(*args(), grid=(1,), **opts, **consts)
        compiled._init_handles()  # fills in n_regs (the tutorial's way to read them)
        props = triton.runtime.driver.active.utils.get_device_properties(x.device.index or 0)
        regs = -(-max(compiled.n_regs, 1) // 8) * 8  # allocated in units of 8 a thread
        threads = torch.cuda.get_device_properties(x.device).max_threads_per_multi_processor
        fit = min(props["max_num_regs"] // (regs * 32 * num_warps), threads // (32 * num_warps))
        if compiled.metadata.shared:
            fit = min(fit, props["max_shared_mem"] // compiled.metadata.shared)
        _PER_SM[key] = max(1, fit)
    return _PER_SM[key]


def _tma_plan(x2: torch.Tensor, dy2: torch.Tensor, n: int) -> Optional[int]:
    """SUB when the weight-grad backward should load these rows by TMA as (n // SUB, SUB) sub-rows,
    else None. Only for widths that are not a power of two (the pointer kernel pads those, and
    measured faster at 2048 / 4096 / 256); it needs a Hopper GPU (or the interpreter), unit column
    strides, 16-byte aligned rows, and SUB (the largest power of two <= 256 dividing n) at least 16
    bytes wide."""
    if n & (n - 1) == 0:
        return None
    if not INTERPRET and not (x2.is_cuda and _sm_major(x2.device.index or 0) >= 9):
        return None
    el = x2.element_size()
    sub = min(n & -n, 256)
    if sub * el < 16 or n // sub > 256:
        return None
    for t in (x2, dy2):
        if t.stride(1) != 1 or t.stride(0) < n or (t.stride(0) * el) % 16 or t.data_ptr() % 16:
            return None
    return sub


def _tma_config(n: int, sub: int, ln: bool) -> tuple[int, int, int, int, Optional[int]]:
    """(BLOCK_M, NSUB, STAGES, num_warps, maxnreg) of a TMA backward. From H100 sweeps (bf16, 8192
    rows of 1152 / 2560 / 3584): the box padded to a power of two beat splitting it into a
    power-of-two part and a remainder; one row a program from 2048 wide, 2-4 warps; 4 stages up to
    2560 wide (3 for rms_norm at 2560), 3 beyond. layer_norm's kernel takes all 254 registers ptxas
    allows; capped at 200 (no spills, the same 2 programs an SM) it ran 1.04x faster at 2560."""
    nsub = triton.next_power_of_2(n // sub)
    width = nsub * sub
    block_m = max(1, 2048 // width)
    stages = 3 if n > 3072 or (not ln and width > 2048) else 4
    nw = max(2, min(8, block_m * width // 1024))
    return block_m, nsub, stages, nw, 200 if ln and nw == 4 else None


def _use_atomics(ln: bool, n: int) -> bool:
    """Whether the weight-grad sums go straight into one fp32 buffer by atomics (run-to-run bit
    differences; never under torch.use_deterministic_algorithms) instead of per-program partial
    rows added up by a second launch. On an H100 that made layer_norm's backward 1.03-1.05x faster
    from 2048 wide (slower below, with more programs adding to the same columns); rms_norm's was
    slower at every width (its gradient then needs a cast launch to the weight's dtype)."""
    return ln and n >= 2048 and not torch.are_deterministic_algorithms_enabled()


def norm_backward(ln: bool, kernels: tuple, dy2: torch.Tensor, x2: torch.Tensor, w: torch.Tensor, dx2: torch.Tensor,
                  tail: tuple, weight_grad: bool, out_dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Fill dx2 with the norm's input gradient; return the (k, n) weight-grad sums in out_dtype
    (k = 2: layer_norm's weight and bias) or None without weight grads. kernels: the op's (pointer,
    TMA) backward kernels; `tail` their arguments after dx's row stride (eps, and rms_norm's offset).

    Without weight grads: one row tile per program (the pointer kernel). With them: a persistent
    grid of as many programs as fit on the GPU at once, each summing its rows' weight-grad terms
    (more programs would only mean more partial rows to add up); rows that are not a power of two
    wide go by TMA on Hopper (see rms_norm's _rms_bwd_tma_kernel), the rest by the pointer kernel.
    """
    m, n = x2.shape
    k = 2 if ln else 1
    atomic = weight_grad and _use_atomics(ln, n)
    sub = _tma_plan(x2, dy2, n) if weight_grad else None
    if sub is not None:
        kernel = kernels[1]
        bm, nsub, stages, nw, maxnreg = _tma_config(n, sub, ln)
        opts = dict(num_warps=nw) if maxnreg is None else dict(num_warps=nw, maxnreg=maxnreg)
        box = [bm, nsub, sub]
        dyd = TensorDescriptor(dy2, [m, n // sub, sub], [dy2.stride(0), sub, 1], box)
        xd = TensorDescriptor(x2, [m, n // sub, sub], [x2.stride(0), sub, 1], box)
        consts = dict(BLOCK_M=bm, NSUB=nsub, SUB=sub, STAGES=stages, ATOMIC=atomic)

        def args(buf):
            return (dyd, xd, w, dx2, buf, m, n, dx2.stride(0), *tail)
    else:
        kernel = kernels[0]
        bm, a, b, mask_a, nw = _bwd_config(n, ln, weight_grad)
        opts = dict(num_warps=nw)
        consts = dict(COMPUTE_DW=weight_grad, BLOCK_M=bm, BLOCK_A=a, MASK_A=mask_a, ATOMIC=atomic)
        if ln:
            consts["BLOCK_B"] = b

        def args(buf):
            return (dy2, x2, w, dx2, buf, m, n, dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1),
                    dx2.stride(0), *tail)
    grid = triton.cdiv(m, bm)
    if weight_grad:
        if INTERPRET or not x2.is_cuda:  # the interpreter: a few programs, each looping over several tiles
            grid = min(grid, 8)
        else:
            per_sm = _programs_per_sm(kernel, lambda: args(x2.new_empty((k, 1, n), dtype=torch.float32)), consts, opts, x2)
            grid = min(grid, per_sm * _sm_count(x2.device.index or 0))
    if atomic:
        buf = torch.zeros((k, n), dtype=torch.float32, device=x2.device)
    else:
        buf = torch.empty((k, grid if weight_grad else 0, n), dtype=torch.float32, device=x2.device)
    kernel[(grid,)](*args(buf), **opts, **consts)
    if not weight_grad:
        return None
    if atomic:
        return buf.to(out_dtype)
    return _sum_partials(buf, out_dtype)


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


def norm_forward(kernel, x: torch.Tensor, params: tuple, scalars: tuple, **consts) -> torch.Tensor:
    """y = norm(x) by a forward kernel (X, *params, Y, M, N, x's strides, y's row stride, *scalars)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    x2, y2 = _rows(x), out.view(-1, x.shape[-1])
    m, n = x2.shape
    bm, bn, nw = _tiles(n)
    kernel[(triton.cdiv(m, bm),)](x2, *params, y2, m, n, x2.stride(0), x2.stride(1), y2.stride(0), *scalars,
                                  BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, **consts)
    return out


def check(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
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


def kernel_ok(x: torch.Tensor) -> bool:
    return use_triton(x, elementwise=True) and x.dtype in _KERNEL_DTYPES and x.shape[-1] <= _MAX_BLOCK_N
