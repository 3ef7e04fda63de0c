"""Decoding's matrix-vector products for 16-bit weights: one row of x against W^T.

At batch 1 a decode step is a chain of GEMVs: every weight byte is read once for one multiply-add,
so the step takes the weights' bytes over the HBM rate, plus a gap and a ramp for every kernel.
cuBLAS's GEMVs ran at ~52% of the H200's HBM rate in minift's decode step, and at 8-30% on the small
projections (bench/RESULTS.md, "Generation"). Three ops here, one kernel:

* `gemv(x, w, bias)`: x @ W^T (+ bias);
* `gemv_cat(x, [w0, w1, w2], biases)`: [x @ W0^T | x @ W1^T | x @ W2^T] from one launch (q/k/v:
  one read of x, one ramp, one tail instead of three);
* `gemv_glu(x, w_gate, w_up, act)`: act(x @ Wg^T) * (x @ Wu^T) from one launch (gate/up and the
  activation: the gate and up vectors never go to memory).

Each takes `low_rank=` (A, B, scaling) per weight: an unmerged adapter, as a model has right after
training. A small launch computes every adapter's A x (r values each) and the GEMV's epilogue adds
scaling * B[rows] (A x), so a layer with adapters on all seven projections still decodes in four
GEMV launches (plus three small ones) instead of ~6 kernels a projection (casts, two thin
matmuls, scale, add).

Arithmetic as the unfused modules: products and sums in float32 (as cuBLAS accumulates), bias added
in float32, each projection rounded once to x's dtype; the gated product then takes those rounded
values in float32 (as `ops.swiglu` / `ops.geglu`) and rounds once more. So each equals the separate
F.linear calls (and the activation op) up to float32 summation order.

Kernel (one program: BLOCK_N rows of one W, all of K): W is read in (BLOCK_N, BLOCK_K) tiles, 16-byte
vector loads along K, `evict_first` (each byte is read once); the float32 product is summed over K in
registers. Small BLOCK_N means many programs, several an SM, which is what keeps enough loads in
flight: a GEMV has no reuse to hide latency behind. No split-K (each program owns its outputs:
deterministic, one launch). The tile rules come from `bench/ops.py --gemv-sweep` on an H200;
`CONFIG_OVERRIDE` replaces them. Only a single row of x takes the kernel: at 2-8 rows its float32
broadcast product ran at a third of cuBLAS's speed, which reuses each W tile across the rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError
from . import reference as ref
from ._backend import HAS_TRITON, Op, use_triton
from .activations import ACTIVATIONS
from .rms_norm import _rms_norm_bwd_op, rms_norm

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .activations import _act_fwd

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
MAX_ROWS = 1  # rows of x the kernel takes; more: cuBLAS
CONFIG_OVERRIDE: dict | None = None  # e.g. dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4)
_ACT_NAMES = {v: k for k, v in ACTIVATIONS.items()}

if HAS_TRITON:

    @triton.jit
    def _rstd(x_ptr, K, eps, BLOCK_K: tl.constexpr):
        """1 / sqrt(mean(x^2) + eps) over x's K values, in float32 (the RMSNorm prologue's statistic)."""
        rk = tl.arange(0, BLOCK_K)
        ssq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + k0 + rk, mask=(k0 + rk) < K, other=0.0).to(tl.float32)
            ssq += x * x
        return 1.0 / tl.sqrt(tl.sum(ssq, axis=0) / K + eps)

    @triton.jit
    def _w_tile(w_ptr, sw, rn, nmask, k0, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
        """W[rn, k0:k0 + BLOCK_K], read once (`evict_first`); masked rows and columns read 0."""
        rk = k0 + tl.arange(0, BLOCK_K)
        ptrs = w_ptr + rn[:, None].to(tl.int64) * sw + rk[None, :]
        if EVEN_K:
            if EVEN_N:
                return tl.load(ptrs, eviction_policy="evict_first")
            else:
                return tl.load(ptrs, mask=nmask[:, None], other=0.0, eviction_policy="evict_first")
        else:
            return tl.load(ptrs, mask=nmask[:, None] & (rk < K)[None, :], other=0.0, eviction_policy="evict_first")

    @triton.jit
    def _tile_dot(w, x_ptr, k0, K, nw_ptr, rstd, offset, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                  NORM: tl.constexpr):
        """float32 (BLOCK_N,) = w @ x[k0:k0 + BLOCK_K], x first RMS-normalised (NORM: x * rstd * (offset +
        nw), rounded to x's dtype as the separate norm op's output is)."""
        rk = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + rk)
            if NORM:
                nw = tl.load(nw_ptr + rk)
        else:
            x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
            if NORM:
                nw = tl.load(nw_ptr + rk, mask=rk < K, other=0.0)
        if NORM:
            x = (x.to(tl.float32) * rstd * (offset + nw.to(tl.float32))).to(x.dtype)
        return tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)

    @triton.jit
    def _dot_rows(x_ptr, w_ptr, sw, rn, nmask, K, nw_ptr, rstd, offset, acc, k_start, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, NORM: tl.constexpr):
        """acc + W[rn, k_start:] @ x[k_start:] in float32, a (BLOCK_N, BLOCK_K) tile an iteration."""
        for k0 in range(k_start, K, BLOCK_K):
            w = _w_tile(w_ptr, sw, rn, nmask, k0, K, BLOCK_K, EVEN_K, EVEN_N)
            acc += _tile_dot(w, x_ptr, k0, K, nw_ptr, rstd, offset, BLOCK_K, EVEN_K, NORM)
        return acc

    @triton.jit
    def _lora_up(lb_ptr, rn, nmask, xa_ptr, xoff, rank, R: tl.constexpr, ODT: tl.constexpr):
        """(BLOCK_N,) = B[rn, :rank] @ xa[xoff:xoff + rank] as the LoRA layer computes it: B in the
        output dtype ODT, float32 products, rounded to ODT (held in float32); B row-major (N, rank);
        rank 0: zeros."""
        rr = tl.arange(0, R)
        rmask = rr < rank
        bt = tl.load(lb_ptr + rn[:, None].to(tl.int64) * rank + rr[None, :], mask=nmask[:, None] & rmask[None, :],
                     other=0.0)
        xa = tl.load(xa_ptr + xoff + rr, mask=rmask, other=0.0)
        return tl.sum(bt.to(ODT).to(tl.float32) * xa[None, :], axis=1).to(ODT).to(tl.float32)

    @triton.jit
    def _lora_down_kernel(x_ptr, nw_ptr, a0, a1, a2, xa_ptr, K, R0, R1, R2, eps, offset,
                          NORM: tl.constexpr, BLOCK_K: tl.constexpr):
        """xa = [A0 x' | A1 x' | A2 x'] (x' = x, or RMS-normalised as in `_gemv_kernel`), each A cast to
        x's dtype and the products summed in float32, rounded to x's dtype (kept in float32) as the
        LoRA layer's first matmul: program (s, j) computes row j of adapter s's A (rank R_s)."""
        seg = tl.program_id(0)
        j = tl.program_id(1)
        if seg == 0:
            a_ptr, rank, xoff = a0, R0, R0 * 0
        elif seg == 1:
            a_ptr, rank, xoff = a1, R1, R0
        else:
            a_ptr, rank, xoff = a2, R2, R0 + R1
        if j < rank:
            if NORM:
                rstd = _rstd(x_ptr, K, eps, BLOCK_K)
            rk = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                km = (k0 + rk) < K
                x = tl.load(x_ptr + k0 + rk, mask=km, other=0.0)
                if NORM:
                    nw = tl.load(nw_ptr + k0 + rk, mask=km, other=0.0)
                    x = (x.to(tl.float32) * rstd * (offset + nw.to(tl.float32))).to(x.dtype)
                a = tl.load(a_ptr + j.to(tl.int64) * K + k0 + rk, mask=km, other=0.0)
                acc += a.to(x.dtype).to(tl.float32) * x.to(tl.float32)  # A in x's dtype, as the layer casts it
            tl.store(xa_ptr + xoff + j, tl.sum(acc, axis=0).to(x_ptr.dtype.element_ty).to(tl.float32))

    @triton.jit
    def _gemv_kernel(
        x_ptr, w0, w1, w2, b0, b1, b2, out_ptr, nw_ptr, r_ptr, N0, N1, N2, K, sw0, sw1, sw2, NB0, NB1, eps, offset,
        xa_ptr, lb0, lb1, lb2, R0, R1, R2, ls0, ls1, ls2,
        HAS_BIAS: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, RESID: tl.constexpr,
        LORA: tl.constexpr, R: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        odt = out_ptr.dtype.element_ty
        if GLU:  # gate (w0) and up (w1) rows together, act(gate) * up out
            rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = rn < N0
            wa, swa, wb, swb = w0, sw0, w1, sw1
        else:  # segment s of [W0 | W1 | W2]: NB0, NB1 programs for the first two
            if pid < NB0:
                wa, swa, b_ptr, n, r0, col = w0, sw0, b0, N0, pid * BLOCK_N, N0 * 0
                lb, rank, xoff, ls = lb0, R0, R0 * 0, ls0
            elif pid < NB0 + NB1:
                wa, swa, b_ptr, n, r0, col = w1, sw1, b1, N1, (pid - NB0) * BLOCK_N, N0
                lb, rank, xoff, ls = lb1, R1, R0, ls1
            else:
                wa, swa, b_ptr, n, r0, col = w2, sw2, b2, N2, (pid - NB0 - NB1) * BLOCK_N, N0 + N1
                lb, rank, xoff, ls = lb2, R2, R0 + R1, ls2
            rn = r0 + tl.arange(0, BLOCK_N)
            nmask = rn < n
        acc_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if NORM:
            # The first tile's weights are requested before the norm's statistic (a loop over x, 2-16 KB
            # from L2, in every program), so their latency hides behind it instead of after it.
            ta = _w_tile(wa, swa, rn, nmask, 0, K, BLOCK_K, EVEN_K, EVEN_N)
            if GLU:
                tb = _w_tile(wb, swb, rn, nmask, 0, K, BLOCK_K, EVEN_K, EVEN_N)
            rstd = _rstd(x_ptr, K, eps, BLOCK_K)
            acc_a += _tile_dot(ta, x_ptr, 0, K, nw_ptr, rstd, offset, BLOCK_K, EVEN_K, NORM)
            if GLU:
                acc_b += _tile_dot(tb, x_ptr, 0, K, nw_ptr, rstd, offset, BLOCK_K, EVEN_K, NORM)
            k_start = BLOCK_K
        else:
            rstd = 1.0
            k_start = 0
        acc_a = _dot_rows(x_ptr, wa, swa, rn, nmask, K, nw_ptr, rstd, offset, acc_a, k_start, BLOCK_K, EVEN_K,
                          EVEN_N, NORM)
        if GLU:
            g = acc_a
            u = _dot_rows(x_ptr, wb, swb, rn, nmask, K, nw_ptr, rstd, offset, acc_b, k_start, BLOCK_K, EVEN_K,
                          EVEN_N, NORM)
            if HAS_BIAS:
                g += tl.load(b0 + rn, mask=nmask, other=0.0).to(tl.float32)
                u += tl.load(b1 + rn, mask=nmask, other=0.0).to(tl.float32)
            if LORA:  # as the LoRA layer: round(base) + round(scaling * B (A x)), rounded below
                g = g.to(odt).to(tl.float32) + (ls0 * _lora_up(lb0, rn, nmask, xa_ptr, 0, R0, R, odt)).to(odt).to(
                    tl.float32)
                u = u.to(odt).to(tl.float32) + (ls1 * _lora_up(lb1, rn, nmask, xa_ptr, R0, R1, R, odt)).to(odt).to(
                    tl.float32)
            g = g.to(odt).to(tl.float32)  # each projection rounded, as the separate modules
            u = u.to(odt).to(tl.float32)
            tl.store(out_ptr + rn, (_act_fwd(g, ACT) * u).to(odt), mask=nmask)
        else:
            acc = acc_a
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
            if LORA:
                acc = acc.to(odt).to(tl.float32) + (ls * _lora_up(lb, rn, nmask, xa_ptr, xoff, rank, R, odt)).to(
                    odt).to(tl.float32)
            if RESID:  # the projection rounded, then the residual added and rounded, as `x + proj(a)`
                r = tl.load(r_ptr + col + rn, mask=nmask, other=0.0).to(tl.float32)
                acc = acc.to(odt).to(tl.float32) + r
            tl.store(out_ptr + col + rn, acc.to(odt), mask=nmask)


def _config(n: int, k: int) -> dict:
    """Tile rules from the H200 sweep at M = 1: all of K up to 2048 an iteration, 2 rows a program
    up to N = 4096, 8 beyond (a wide weight has programs enough), 4 warps."""
    bk = max(64, min(2048, 1 << max(k - 1, 1).bit_length()))
    cfg = dict(BLOCK_N=2 if n <= 4096 else 8, BLOCK_K=bk, num_warps=4, num_stages=1)
    if CONFIG_OVERRIDE:
        cfg.update(CONFIG_OVERRIDE)
    return cfg


def _pad3(seq: list, fill=None) -> list:
    """A list of up to three weights / biases as the kernel's and the op's three slots."""
    return list(seq) + [fill] * (3 - len(seq))


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def _kernel_ok(x: torch.Tensor, ws: list[torch.Tensor]) -> bool:
    return (use_triton(x) and x.dtype in _FLOATS and all(w.dtype == x.dtype for w in ws)
            and 0 < _rows(x) <= MAX_ROWS)


def _launch(x: torch.Tensor, ws: list[torch.Tensor], biases: list[torch.Tensor], glu: int,
            norm: tuple[torch.Tensor, float, float] | None = None, residual: torch.Tensor | None = None,
            lora: list[tuple[torch.Tensor, torch.Tensor, float] | None] | None = None) -> torch.Tensor:
    """One launch over weights `ws` (concatenated along N, or gate/up when glu = ACTIVATIONS code + 1),
    x first RMS-normalised by `norm` = (weight, eps, offset), `residual` (N,) added to the output;
    `lora` (one (A, B, scaling) or None a weight): a small launch first computes every adapter's
    A x' and the GEMV's epilogue adds scaling * B (A x'), rounded as the LoRA layer rounds."""
    k = ws[0].shape[1]
    x1 = _flat(x, k)
    ws = [w if w.stride(-1) == 1 else w.contiguous() for w in ws]
    bs = [b.to(x.dtype) for b in biases]
    ns = [w.shape[0] for w in ws]
    total = ns[0] if glu else sum(ns)
    out = torch.empty(total, dtype=x.dtype, device=x.device)
    cfg = _config(max(ns), k)
    bn = cfg["BLOCK_N"]
    nbs = [triton.cdiv(n, bn) for n in ns]
    wp, bp, np_, sp = _pad3(ws, ws[0]), _pad3(bs or [ws[0]], ws[0]), _pad3(ns, 0), _pad3([w.stride(0) for w in ws], 0)
    nw, eps, offset = (_flat(norm[0], k), float(norm[1]), float(norm[2])) if norm is not None else (x1, 0.0, 0.0)
    r = _flat(residual.to(x.dtype), total) if residual is not None else x1
    low = _low_rank_inputs(x1, lora, nw, eps, offset, norm is not None)
    ranks, lbs, scales, xa = low if low is not None else ([0, 0, 0], [x1] * 3, [0.0] * 3, x1)
    grid = (nbs[0] if glu else sum(nbs),)
    _gemv_kernel[grid](
        x1, *wp, *bp, out, nw, r, *np_, k, *sp, nbs[0], nbs[1] if len(nbs) > 1 else 0, eps, offset,
        xa, *lbs, *ranks, *scales,
        HAS_BIAS=bool(bs), GLU=bool(glu), ACT=max(glu - 1, 0), NORM=norm is not None, RESID=residual is not None,
        LORA=low is not None, R=triton.next_power_of_2(max(1, *ranks)),
        BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], EVEN_K=k % cfg["BLOCK_K"] == 0, EVEN_N=all(n % bn == 0 for n in ns),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out.view(*x.shape[:-1], total)


def _low_rank_inputs(x1: torch.Tensor, lora: list[tuple | None] | None, nw: torch.Tensor, eps: float, offset: float,
                     norm: bool) -> tuple[list[int], list[torch.Tensor], list[float], torch.Tensor] | None:
    """What a GEMV's low-rank epilogue reads, for a contiguous row x1 and one adapter (A, B, scaling)
    or None a weight: each of three slots' rank, B and scaling, and xa = [A_0 x' | A_1 x' | ...] in
    float32 from one small launch (x' = x1, or RMS-normalised by nw, eps, offset when `norm`, as in
    the GEMV's prologue). None when no weight has an adapter."""
    if lora is None or all(spec is None for spec in lora):
        return None
    specs = _pad3(lora)
    real = [spec for spec in specs if spec is not None]
    # One pointer type a slot (the kernels pick a segment's pointer by branch): adapters of mixed
    # dtypes go as float32, and a missing adapter's slot holds another's tensor (rank 0: unread).
    same = len({t.dtype for spec in real for t in spec[:2]}) == 1
    c = lambda t: (t if same else t.float()).contiguous()  # noqa: E731
    ranks = [0 if spec is None else spec[0].shape[0] for spec in specs]
    las = [c((spec or real[0])[0]) for spec in specs]
    lbs = [c((spec or real[0])[1]) for spec in specs]
    scales = [0.0 if spec is None else float(spec[2]) for spec in specs]
    k = x1.shape[0]
    xa = torch.empty(max(1, sum(ranks)), dtype=torch.float32, device=x1.device)
    _lora_down_kernel[(len(lora), max(ranks))](
        x1, nw, *las, xa, k, *ranks, eps, offset, NORM=norm,
        BLOCK_K=max(64, min(2048, triton.next_power_of_2(k))), num_warps=4)
    return ranks, lbs, scales, xa


def _flat(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t` as n contiguous values (a single row of x, a norm weight, a residual)."""
    t = t.reshape(n)
    return t if t.stride(0) == 1 else t.contiguous()


# ---- the ops: forward, backward, registration -------------------------------------------------
# Weights and biases are separate (optional) arguments, not lists: eager autograd (`_backend.Op`)
# differentiates only direct tensor arguments.


def _present(*ts: torch.Tensor | None) -> list[torch.Tensor]:
    return [t for t in ts if t is not None]


def _normed(x: torch.Tensor, nw: torch.Tensor | None, eps: float, offset: float) -> torch.Tensor:
    """The projections' input: x itself, or RMSNorm(x) when a norm weight is fused in."""
    return x if nw is None else rms_norm(x, nw, eps, offset)


def _norm_backward(ctx, x: torch.Tensor, nw: torch.Tensor | None, dxn: torch.Tensor | None) -> tuple:
    """(dx, dnorm_weight) from the gradient of the normalised input (the norm op's own backward)."""
    if nw is None or dxn is None:
        return dxn, None
    want_w = ctx.needs_input_grad[ctx.nw_index]
    dx, dnw = _rms_norm_bwd_op(dxn.reshape(x.shape).contiguous(), x, nw, ctx.eps, ctx.offset, want_w)
    return dx, dnw if want_w else None


def _with_lora(xn: torch.Tensor, out: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None,
               scaling: float) -> torch.Tensor:
    """A projection's output with its adapter, as the LoRA layer computes it: out + scaling * B (A xn)
    with A and B in out's dtype, each step rounded to it; `out` itself without one."""
    if a is None:
        return out
    return out + scaling * F.linear(F.linear(xn.to(out.dtype), a.to(out.dtype)), b.to(out.dtype))


def _lora_backward(ctx, g: torch.Tensor, x2: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None,
                   scaling: float, ia: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d xn (float32, or None), dA, dB) of one projection's adapter term from its output gradient g."""
    if a is None:
        return None, None, None
    acc = torch.promote_types(g.dtype, torch.float32)
    g2 = g.reshape(-1, g.shape[-1]).to(acc)
    xf = x2.to(acc)
    gl = scaling * (g2 @ b.to(acc))  # the gradient of A xn
    da = (gl.T @ xf).to(a.dtype) if ctx.needs_input_grad[ia] else None
    db = (scaling * (g2.T @ (xf @ a.to(acc).T))).to(b.dtype) if ctx.needs_input_grad[ia + ctx.n_lora] else None
    return gl @ a.to(acc), da, db


def _cat_impl(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor | None, w2: torch.Tensor | None,
              b0: torch.Tensor | None, b1: torch.Tensor | None, b2: torch.Tensor | None, nw: torch.Tensor | None,
              eps: float, offset: float, residual: torch.Tensor | None, la0: torch.Tensor | None,
              la1: torch.Tensor | None, la2: torch.Tensor | None, lb0: torch.Tensor | None, lb1: torch.Tensor | None,
              lb2: torch.Tensor | None, ls0: float, ls1: float, ls2: float) -> torch.Tensor:
    ws, bs = _present(w0, w1, w2), _present(b0, b1, b2)
    las, lbs, lss = [la0, la1, la2], [lb0, lb1, lb2], [ls0, ls1, ls2]
    lora = [None if las[i] is None else (las[i], lbs[i], lss[i]) for i in range(len(ws))]
    if _kernel_ok(x, ws):
        return _launch(x, ws, bs, 0, None if nw is None else (nw, eps, offset), residual, lora)
    xn = _normed(x, nw, eps, offset)
    out = torch.cat([_with_lora(xn, ref.linear(xn, w, bs[i] if bs else None), las[i], lbs[i], lss[i])
                     for i, w in enumerate(ws)], dim=-1)
    return out if residual is None else out + residual.to(out.dtype).reshape(out.shape)


def _cat_fake(x, w0, w1, w2, b0, b1, b2, nw, eps, offset, residual, la0, la1, la2, lb0, lb1, lb2, ls0, ls1, ls2):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in _present(w0, w1, w2))))


def _cat_setup(ctx, inputs, output):
    x, w0, w1, w2, b0, b1, b2, nw, eps, offset, residual, la0, la1, la2, lb0, lb1, lb2, ls0, ls1, ls2 = inputs
    ws = _present(w0, w1, w2)
    ctx.save_for_backward(x, nw, la0, la1, la2, lb0, lb1, lb2, *ws)
    ctx.has_bias, ctx.has_residual, ctx.eps, ctx.offset, ctx.nw_index = b0 is not None, residual is not None, eps, offset, 7
    ctx.scales, ctx.n_lora = (ls0, ls1, ls2), 3


def _cat_backward(ctx, grad):
    x, nw, la0, la1, la2, lb0, lb1, lb2, *ws = ctx.saved_tensors
    las, lbs = [la0, la1, la2], [lb0, lb1, lb2]
    xn = _normed(x, nw, ctx.eps, ctx.offset)
    gs = grad.split([w.shape[0] for w in ws], dim=-1)
    x2 = xn.reshape(-1, x.shape[-1])
    loras = [_lora_backward(ctx, g, x2, las[i], lbs[i], ctx.scales[i], 11 + i) for i, g in enumerate(gs)]
    need_dxn = ctx.needs_input_grad[0] or (nw is not None and ctx.needs_input_grad[7])
    dxn = None
    if need_dxn:
        dxn = sum(g @ w.to(g.dtype) for g, w in zip(gs, ws))
        for dl, _, _ in loras:
            if dl is not None:
                dxn = dxn.to(dl.dtype) + dl.view(dxn.shape)
        dxn = dxn.to(x.dtype)
    dx, dnw = _norm_backward(ctx, x, nw, dxn)
    dws = [(g.reshape(-1, g.shape[-1]).T @ x2.to(g.dtype)).to(w.dtype) for g, w in zip(gs, ws)]
    dbs = [g.reshape(-1, g.shape[-1]).sum(0) for g in gs] if ctx.has_bias else []
    return (dx, *_pad3(dws), *_pad3(dbs), dnw, None, None, grad if ctx.has_residual else None,
            *_pad3([da for _, da, _ in loras]), *_pad3([db for _, _, db in loras]), None, None, None)


_cat_op = Op("gemv_cat", _cat_impl, _cat_fake, _cat_setup, _cat_backward)

LoraSpec = tuple  # (A (r, in_features), B (out_features, r), scaling): a projection's adapter


def _lora_args(lora: list[LoraSpec | None] | None, n: int) -> list:
    """A list of n adapters (or None) as the ops' (A0..A2, B0..B2, scaling0..2) arguments."""
    specs = _pad3(list(lora) if lora is not None else [None] * n)
    return ([None if s is None else s[0] for s in specs] + [None if s is None else s[1] for s in specs]
            + [0.0 if s is None else float(s[2]) for s in specs])


def _cat_call(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor],
              norm: tuple[torch.Tensor, float, float] | None = None, residual: torch.Tensor | None = None,
              lora: list[LoraSpec | None] | None = None) -> torch.Tensor:
    nw, eps, offset = norm if norm is not None else (None, 0.0, 0.0)
    return _cat_op(x, *_pad3(ws), *_pad3(bs), nw, float(eps), float(offset), residual, *_lora_args(lora, len(ws)))


def _glu_impl(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
              b_up: torch.Tensor | None, act: int, nw: torch.Tensor | None, eps: float, offset: float,
              la0: torch.Tensor | None, la1: torch.Tensor | None, lb0: torch.Tensor | None, lb1: torch.Tensor | None,
              ls0: float, ls1: float) -> torch.Tensor:
    bs = _present(b_gate, b_up)
    if _kernel_ok(x, [w_gate, w_up]):
        lora = [None if la0 is None else (la0, lb0, ls0), None if la1 is None else (la1, lb1, ls1)]
        return _launch(x, [w_gate, w_up], bs, act + 1, None if nw is None else (nw, eps, offset), lora=lora)
    g, u = _glu_inputs(x, w_gate, w_up, b_gate, b_up, nw, eps, offset, la0, la1, lb0, lb1, ls0, ls1)[1:]
    if act == ACTIVATIONS["silu"]:
        return ref.swiglu(g, u)
    return ref.geglu(g, u, "tanh" if act == ACTIVATIONS["gelu_tanh"] else "none")


def _glu_inputs(x, w_gate, w_up, b_gate, b_up, nw, eps, offset, la0, la1, lb0, lb1, ls0, ls1):
    """(x', gate, up): the normalised input and the two projections, adapters included."""
    xn = _normed(x, nw, eps, offset)
    g = _with_lora(xn, ref.linear(xn, w_gate, b_gate), la0, lb0, ls0)
    u = _with_lora(xn, ref.linear(xn, w_up, b_up), la1, lb1, ls1)
    return xn, g, u


def _glu_fake(x, w_gate, w_up, b_gate, b_up, act, nw, eps, offset, la0, la1, lb0, lb1, ls0, ls1):
    return x.new_empty((*x.shape[:-1], w_gate.shape[0]))


def _glu_setup(ctx, inputs, output):
    x, w_gate, w_up, b_gate, b_up, act, nw, eps, offset, la0, la1, lb0, lb1, ls0, ls1 = inputs
    ctx.save_for_backward(x, nw, w_gate, w_up, b_gate, b_up, la0, la1, lb0, lb1)
    ctx.act, ctx.eps, ctx.offset, ctx.nw_index = act, eps, offset, 6
    ctx.scales, ctx.n_lora = (ls0, ls1), 2


def _glu_backward(ctx, grad):
    """Recomputes the normalised input, gate and up (a decoding op: the backward exists for
    completeness and tests)."""
    x, nw, wg, wu, bg, bu, la0, la1, lb0, lb1 = ctx.saved_tensors
    act = _ACT_NAMES[ctx.act]
    xn, g, u = _glu_inputs(x, wg, wu, bg, bu, nw, ctx.eps, ctx.offset, la0, la1, lb0, lb1, *ctx.scales)
    f, df = ref.act_and_grad(g.float(), act)
    dg = (grad.float() * u.float() * df).to(x.dtype)
    du = (grad.float() * f).to(x.dtype)
    x2 = xn.reshape(-1, x.shape[-1])
    dg2, du2 = dg.reshape(-1, dg.shape[-1]), du.reshape(-1, du.shape[-1])
    lg = _lora_backward(ctx, dg, x2, la0, lb0, ctx.scales[0], 9)
    lu = _lora_backward(ctx, du, x2, la1, lb1, ctx.scales[1], 10)
    need_dxn = ctx.needs_input_grad[0] or (nw is not None and ctx.needs_input_grad[6])
    dxn = None
    if need_dxn:
        dxn = dg @ wg.to(x.dtype) + du @ wu.to(x.dtype)
        for dl in (lg[0], lu[0]):
            if dl is not None:
                dxn = dxn.to(dl.dtype) + dl.view(dxn.shape)
        dxn = dxn.to(x.dtype)
    dx, dnw = _norm_backward(ctx, x, nw, dxn)
    dwg = (dg2.T @ x2).to(wg.dtype) if ctx.needs_input_grad[1] else None
    dwu = (du2.T @ x2).to(wu.dtype) if ctx.needs_input_grad[2] else None
    dbg, dbu = (dg2.sum(0), du2.sum(0)) if bg is not None else (None, None)
    return dx, dwg, dwu, dbg, dbu, None, dnw, None, None, lg[1], lu[1], lg[2], lu[2], None, None


_glu_op = Op("gemv_glu", _glu_impl, _glu_fake, _glu_setup, _glu_backward)


def _check(x: torch.Tensor, ws: list, biases: list | None, what: str) -> list[torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise InputError(f"{what}: x: expected a floating-point tensor with at least 1 dim, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    for i, w in enumerate(ws):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise InputError(f"{what}: weight {i}: expected a 2-d floating-point (out_features, in_features) "
                             f"tensor, got {getattr(w, 'shape', type(w).__name__)}")
        if w.shape[1] != x.shape[-1]:
            raise InputError(f"{what}: x: last dim {x.shape[-1]} != weight {i}'s in_features {w.shape[1]}")
        if w.device != x.device:
            raise InputError(f"{what}: weight {i} is on {w.device} but x is on {x.device}")
    if biases is None or all(b is None for b in biases):
        return []
    if len(biases) != len(ws) or any(not isinstance(b, torch.Tensor) or tuple(b.shape) != (w.shape[0],)
                                     for b, w in zip(biases, ws)):
        raise InputError(f"{what}: biases: expected one ({', '.join(str(w.shape[0]) for w in ws)},)-shaped "
                         f"tensor per weight, got {[getattr(b, 'shape', b) for b in biases]}")
    return list(biases)


def _check_norm(x: torch.Tensor, norm_weight: torch.Tensor | None, what: str) -> None:
    if norm_weight is not None and (not isinstance(norm_weight, torch.Tensor) or tuple(norm_weight.shape) != (x.shape[-1],)
                                    or norm_weight.device != x.device):
        raise InputError(f"{what}: norm_weight: expected a ({x.shape[-1]},) tensor on {x.device}, got "
                         f"{getattr(norm_weight, 'shape', type(norm_weight).__name__)}")


def _check_lora(x: torch.Tensor, ws: list[torch.Tensor], lora: Any, what: str) -> list[LoraSpec | None] | None:
    """`low_rank`: None, or one (A (r, in_features), B (out_features, r), scaling) or None per weight."""
    if lora is None:
        return None
    if not isinstance(lora, (list, tuple)) or len(lora) != len(ws):
        raise InputError(f"{what}: low_rank: expected a list of {len(ws)} (A, B, scaling) tuples or None, got {lora!r:.80}")
    for i, (spec, w) in enumerate(zip(lora, ws)):
        if spec is None:
            continue
        ok = isinstance(spec, (list, tuple)) and len(spec) == 3
        a, b, sc = spec if ok else (None, None, None)
        if not (ok and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2
                and a.is_floating_point() and b.is_floating_point() and a.shape[1] == w.shape[1]
                and b.shape == (w.shape[0], a.shape[0]) and a.device == b.device == x.device
                and isinstance(sc, (int, float)) and not isinstance(sc, bool)):
            raise InputError(f"{what}: low_rank[{i}]: expected (A of shape (r, {w.shape[1]}), B of shape ({w.shape[0]}, r), "
                             f"a float scaling) on {x.device}, got "
                             f"{[getattr(t, 'shape', t) for t in spec] if isinstance(spec, (list, tuple)) else spec!r}")
    return list(lora)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
         residual: torch.Tensor | None = None, low_rank: LoraSpec | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) (+ residual): x (..., K), W (N, K) -> (..., N) in x's dtype; the kernel for one
    row of x on CUDA, F.linear otherwise. `residual` (..., N) is added after the product is rounded
    (as `residual + linear(x)`: a decoder layer's skip connection, in the kernel's epilogue).
    `low_rank` = (A, B, scaling): an unmerged LoRA adapter, added as the LoRA layer's forward does
    (`out + scaling * B (A x)`, A and B cast to x's dtype, each step rounded to it), in the same
    launch's epilogue after a small launch for A x. Differentiable in every tensor."""
    if not (isinstance(w, torch.Tensor) and w.dim() == 2):
        raise InputError(f"gemv: w: expected a 2-d (out_features, in_features) tensor, got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    biases = _check(x, [w], [bias], "gemv")
    want = (*x.shape[:-1], w.shape[0])
    if residual is not None and (not isinstance(residual, torch.Tensor) or tuple(residual.shape) != want):
        raise InputError(f"gemv: residual: expected a {want} tensor, got {getattr(residual, 'shape', type(residual).__name__)}")
    return _cat_call(x, [w], biases, residual=residual,
                     lora=_check_lora(x, [w], None if low_rank is None else [low_rank], "gemv"))


def gemv_cat(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None, *,
             norm_weight: torch.Tensor | None = None, eps: float = 1e-6, norm_offset: float = 0.0,
             low_rank: list[LoraSpec | None] | None = None) -> torch.Tensor:
    """[x' @ W0^T | x' @ W1^T | ...] (+ biases) for up to three weights of one in_features, as one
    tensor (..., sum N); one launch for a row of x on CUDA. x' = x, or `rms_norm(x, norm_weight,
    eps, norm_offset)` computed in the kernel's prologue (a decoder layer's pre-attention norm).
    `low_rank`: an adapter (A, B, scaling) or None per weight, applied as in `gemv`."""
    if not isinstance(weights, (list, tuple)) or not 1 <= len(weights) <= 3:
        raise InputError(f"gemv_cat: weights: expected a list of 1 to 3 tensors, got {type(weights).__name__} "
                         f"of {len(weights) if isinstance(weights, (list, tuple)) else '?'}")
    bs = _check(x, list(weights), biases, "gemv_cat")
    _check_norm(x, norm_weight, "gemv_cat")
    return _cat_call(x, list(weights), bs, None if norm_weight is None else (norm_weight, eps, norm_offset),
                     lora=_check_lora(x, list(weights), low_rank, "gemv_cat"))


def gemv_glu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, activation: str = "silu",
             biases: list[torch.Tensor | None] | None = None, *, norm_weight: torch.Tensor | None = None,
             eps: float = 1e-6, norm_offset: float = 0.0, low_rank: list[LoraSpec | None] | None = None) -> torch.Tensor:
    """act(x' @ Wg^T) * (x' @ Wu^T) (+ biases inside), activation 'silu' (SwiGLU), 'gelu_tanh' or 'gelu'
    (GeGLU); one launch for a row of x on CUDA. x' as in `gemv_cat` (the pre-MLP norm fused in);
    `low_rank`: [gate's adapter, up's adapter], each (A, B, scaling) or None, applied as in `gemv`."""
    if activation not in ACTIVATIONS:
        raise InputError(f"gemv_glu: activation={activation!r}; expected one of {sorted(ACTIVATIONS)}")
    bs = _check(x, [w_gate, w_up], biases, "gemv_glu")
    if w_gate.shape != w_up.shape:
        raise InputError(f"gemv_glu: w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} differ")
    _check_norm(x, norm_weight, "gemv_glu")
    lora = _check_lora(x, [w_gate, w_up], low_rank, "gemv_glu") or [None, None]
    la = [None if spec is None else spec[0] for spec in lora]
    lb = [None if spec is None else spec[1] for spec in lora]
    ls = [0.0 if spec is None else float(spec[2]) for spec in lora]
    return _glu_op(x, w_gate, w_up, *(bs or [None, None]), ACTIVATIONS[activation], norm_weight, float(eps),
                   float(norm_offset), *la, *lb, *ls)


def takes_gemv(x: torch.Tensor, ws: list[torch.Tensor]) -> bool:
    """Whether a call should take the kernel: one row where Triton runs (CUDA; the CPU interpreter
    only under backend "triton"), no gradient wanted, one dtype. Under
    autograd (training) the callers run F.linear exactly, so a compiled training graph never
    branches on the number of rows."""
    return (not torch.is_grad_enabled() and x.numel() <= MAX_ROWS * x.shape[-1] and use_triton(x)
            and all(w.dtype == x.dtype for w in ws))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or `gemv`'s kernel when decoding (one row, no gradient wanted, CUDA)."""
    if takes_gemv(x, [w]):
        return _cat_call(x, [w], [] if bias is None else [bias])
    return F.linear(x, w, bias)


def linear_cat(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
    """(F.linear(x, w_i, b_i) for each i), from one `gemv_cat` launch when decoding (its outputs are
    views of one buffer)."""
    if takes_gemv(x, weights):
        out = _cat_call(x, list(weights), [] if all(b is None for b in biases) else list(biases))
        return tuple(out.split([w.shape[0] for w in weights], dim=-1))
    return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))
