"""One decode step's attention for one layer as a single kernel: the optional q/k RMSNorm, RoPE on q
and k, the new key and value written into their KV-cache slot, and softmax attention over the
cache under its mask (with Gemma 2's soft-capping).

Unfused, a decode step spends five small launches a layer here (RoPE, the cache writes, SDPA's
preparation, SDPA and its reduction: ~10 us of kernels at Llama-1B's batch 1 on an H100, each moving
a few kilobytes), so that part of the step is bound by launch latency, not bytes (bench/RESULTS.md).
Each program takes one (row, KV head) and every query head of its group as the rows of
tensor-core dots (q K^T, then P V, as flash attention), so the cache is read once per group (GQA).
The slots are split over enough programs to fill the GPU (flash decoding); the last of a group's
programs to finish (an atomic ticket, as split-K nf4_matmul) combines their partial softmax sums, so
a long cache is one launch too. The program whose share holds the new slot writes the key and
value there before its CTA barrier; no other program reads that slot.
"""

from __future__ import annotations

import functools

import torch

from ..errors import InputError
from . import reference as ref
from ._backend import HAS_TRITON, INTERPRET, Op, ticket_counters, use_triton

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The most programs a (row, KV head) is split over; None: enough that the launch fills every SM
# once (a split is at least one tile of slots). bench/generate.py's minift-attn<N> sets it.
MAX_SPLITS: int | None = None
CPU_PROGRAMS = 132  # the SM count assumed under the interpreter

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._ce_kernels import _softcap

    _INTERP = tl.constexpr(INTERPRET)

    @triton.jit
    def _normed_rotated(lo, hi, NW, c1, c2, s1, s2, d, dmask, HALF, eps, offset, DT, NORM: tl.constexpr):
        """RMSNorm (optional) then rotate-half RoPE of head vectors given as their two halves
        (rows, BLOCK_D), each result rounded to DT where the unfused ops round (after the norm,
        after RoPE), returned in float32."""
        if NORM:
            ms = (tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / (2 * HALF)
            r = (1.0 / tl.sqrt(ms + eps))[:, None]
            w1 = tl.load(NW + d, mask=dmask, other=0.0).to(tl.float32) + offset
            w2 = tl.load(NW + HALF + d, mask=dmask, other=0.0).to(tl.float32) + offset
            lo = (lo * r * w1[None, :]).to(DT).to(tl.float32)
            hi = (hi * r * w2[None, :]).to(DT).to(tl.float32)
        out1 = (lo * c1 - hi * s1).to(DT).to(tl.float32)
        out2 = (hi * c2 + lo * s2).to(DT).to(tl.float32)
        return out1, out2

    @triton.jit
    def _decode_attention_kernel(
            Q, K, V, KC, VC, COS, SIN, MASK, SLOT, QNW, KNW, O, PM, PL, PACC, TICKETS,
            HK, REP, S, HALF, SPLIT_LEN, scale, cap, inv_cap, eps, offset,
            sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d,
            skc_b, skc_h, skc_s, skc_d, svc_b, svc_h, svc_s, svc_d,
            sc_b, sc_d, ss_b, ss_d, sm_b, sm_s, so_b, so_h, so_d,
            QK_NORM: tl.constexpr, SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, FP32: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)  # (batch row, KV head)
        split = tl.program_id(1)
        nsplit = tl.num_programs(1)
        b = (pid // HK).to(tl.int64)
        hk = (pid % HK).to(tl.int64)
        CDT = KC.dtype.element_ty  # the dots' operand type: the cache's
        # float32 operands and IEEE dots for a float32 cache, and under the interpreter (whose 16-bit
        # dots are not exact; the values are the same: 16-bit operands, float32 sums)
        F32_DOTS: tl.constexpr = _INTERP | FP32
        PRECISION: tl.constexpr = "ieee" if F32_DOTS else "tf32"  # tf32: unused by 16-bit operands
        d = tl.arange(0, BLOCK_D)
        dmask = d < HALF
        c1 = tl.load(COS + b * sc_b + d * sc_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(COS + b * sc_b + (d + HALF) * sc_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(SIN + b * ss_b + d * ss_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(SIN + b * ss_b + (d + HALF) * ss_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        slot = tl.load(SLOT)
        start = split * SPLIT_LEN
        stop = tl.minimum(start + SPLIT_LEN, S)
        kc = KC + b * skc_b + hk * skc_h
        vc = VC + b * svc_b + hk * svc_h

        if (slot >= start) & (slot < stop):  # this program's share holds the new slot: write it
            kp = K + b * sk_b + hk * sk_h
            k1 = tl.load(kp + d * sk_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            k2 = tl.load(kp + (d + HALF) * sk_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            k1, k2 = _normed_rotated(k1, k2, KNW, c1, c2, s1, s2, d, dmask, HALF, eps, offset, K.dtype.element_ty,
                                     QK_NORM)
            vp = V + b * sv_b + hk * sv_h
            wmask = dmask[None, :]
            tl.store(kc + slot * skc_s + d[None, :] * skc_d, k1.to(CDT), mask=wmask)
            tl.store(kc + slot * skc_s + (d[None, :] + HALF) * skc_d, k2.to(CDT), mask=wmask)
            tl.store(vc + slot * svc_s + d[None, :] * svc_d, tl.load(vp + d * sv_d, mask=dmask)[None, :].to(CDT),
                     mask=wmask)
            tl.store(vc + slot * svc_s + (d[None, :] + HALF) * svc_d,
                     tl.load(vp + (d + HALF) * sv_d, mask=dmask)[None, :].to(CDT), mask=wmask)
        tl.debug_barrier()  # the slot's stores come before any thread of this CTA reads it

        # The group's query heads (rows of the dots; padding rows are zeros), normed and rotated.
        r = tl.arange(0, BLOCK_R)
        rmask = r < REP
        qmask = rmask[:, None] & dmask[None, :]
        qp = Q + b * sq_b + (hk * REP + r)[:, None] * sq_h
        q1 = tl.load(qp + d[None, :] * sq_d, mask=qmask, other=0.0).to(tl.float32)
        q2 = tl.load(qp + (d[None, :] + HALF) * sq_d, mask=qmask, other=0.0).to(tl.float32)
        q1, q2 = _normed_rotated(q1, q2, QNW, c1, c2, s1, s2, d, dmask, HALF, eps, offset, Q.dtype.element_ty, QK_NORM)
        q1 = q1.to(CDT)
        q2 = q2.to(CDT)
        if F32_DOTS:
            q1 = q1.to(tl.float32)
            q2 = q2.to(tl.float32)

        m_i = tl.full((BLOCK_R,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_R,), tl.float32)
        acc1 = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        acc2 = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        for s0 in range(start, stop, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            smask = s < stop
            tmask = smask[:, None] & dmask[None, :]
            kt1 = tl.load(kc + s[:, None] * skc_s + d[None, :] * skc_d, mask=tmask, other=0.0)
            kt2 = tl.load(kc + s[:, None] * skc_s + (d[None, :] + HALF) * skc_d, mask=tmask, other=0.0)
            vt1 = tl.load(vc + s[:, None] * svc_s + d[None, :] * svc_d, mask=tmask, other=0.0)
            vt2 = tl.load(vc + s[:, None] * svc_s + (d[None, :] + HALF) * svc_d, mask=tmask, other=0.0)
            ok = tl.load(MASK + b * sm_b + s * sm_s, mask=smask, other=0) != 0
            if F32_DOTS:
                kt1 = kt1.to(tl.float32)
                kt2 = kt2.to(tl.float32)
                vt1 = vt1.to(tl.float32)
                vt2 = vt2.to(tl.float32)
            sc = tl.dot(q1, tl.trans(kt1), input_precision=PRECISION)
            sc = tl.dot(q2, tl.trans(kt2), sc, input_precision=PRECISION)
            sc = sc * scale
            if SOFTCAP:
                sc = _softcap(sc, cap, inv_cap)
            sc = tl.where(ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc1 = acc1 * alpha[:, None]
            acc2 = acc2 * alpha[:, None]
            pc = p.to(CDT)  # P rounded to the cache's type for the tensor cores, as flash attention does
            if F32_DOTS:
                pc = pc.to(tl.float32)
            acc1 = tl.dot(pc, vt1, acc1, input_precision=PRECISION)
            acc2 = tl.dot(pc, vt2, acc2, input_precision=PRECISION)
            m_i = m_new
        if SPLIT:  # partial sums; the (row, head)'s last program to finish combines them
            part = pid * nsplit + split
            tl.store(PM + part * BLOCK_R + r, m_i)
            tl.store(PL + part * BLOCK_R + r, l_i)
            pacc = PACC + (part * BLOCK_R + r)[:, None] * (2 * BLOCK_D)
            tl.store(pacc + d[None, :], acc1)
            tl.store(pacc + BLOCK_D + d[None, :], acc2)
            tl.debug_barrier()  # the CTA's partial stores come before its ticket
            ticket = tl.atomic_add(TICKETS + pid, 1, sem="acq_rel", scope="gpu")
            if ticket == nsplit - 1:
                _combine(PM, PL, PACC, O, b, hk, pid, nsplit, REP, HALF, so_b, so_h, so_d, BLOCK_P, BLOCK_R, BLOCK_D)
                tl.atomic_xchg(TICKETS + pid, 0)  # ready for the next call
        else:
            op = O + b * so_b + (hk * REP + r)[:, None] * so_h
            tl.store(op + d[None, :] * so_d, (acc1 / l_i[:, None]).to(O.dtype.element_ty), mask=qmask)
            tl.store(op + (d[None, :] + HALF) * so_d, (acc2 / l_i[:, None]).to(O.dtype.element_ty), mask=qmask)

    @triton.jit
    def _combine(PM, PL, PACC, O, b, hk, pid, nsplit, REP, HALF, so_b, so_h, so_d,
                 BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """out = sum_p exp(m_p - m) acc_p / sum_p exp(m_p - m) l_p over one (row, KV head)'s splits,
        in split order (the same bits every call)."""
        p = tl.arange(0, BLOCK_P)
        r = tl.arange(0, BLOCK_R)
        d = tl.arange(0, 2 * BLOCK_D)
        pr = (pid * nsplit + p)[:, None] * BLOCK_R + r[None, :]  # (splits, rows)
        pmask = (p < nsplit)[:, None]
        m = tl.load(PM + pr, mask=pmask, other=-1.0e30, cache_modifier=".cg")
        l = tl.load(PL + pr, mask=pmask, other=0.0, cache_modifier=".cg")
        mx = tl.max(m, axis=0)
        w = tl.exp(m - mx[None, :])
        total = tl.sum(w * l, axis=0)
        acc = tl.load(PACC + pr[:, :, None] * (2 * BLOCK_D) + d[None, None, :], mask=pmask[:, :, None], other=0.0,
                      cache_modifier=".cg")
        out = tl.sum(w[:, :, None] * acc, axis=0) / total[:, None]  # (rows, 2 * BLOCK_D): two padded halves
        half = d // BLOCK_D
        col = d - half * BLOCK_D
        omask = (r < REP)[:, None] & (col < HALF)[None, :]
        op = O + b * so_b + (hk * REP + r)[:, None] * so_h + (col + half * HALF)[None, :] * so_d
        tl.store(op, out.to(O.dtype.element_ty), mask=omask)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_PROGRAMS


def _tiles(rep: int, half: int, slots: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_S, BLOCK_D): the query rows and the halves of head_dim padded to the
    tensor-core dots' 16, and a tile of slots (64 = 16 KiB of bf16 keys and values at head_dim 64)."""
    block_r = max(16, triton.next_power_of_2(rep))
    block_d = max(16, triton.next_power_of_2(half))
    block_s = max(16, min(64 if block_d <= 64 else 32, triton.next_power_of_2(slots)))
    return block_r, block_s, block_d


def _splits(rows: int, slots: int, block_s: int, device: torch.device) -> int:
    """Programs each of `rows` (row, KV head) pairs is split over: enough for the launch to fill
    every SM once, each at least one tile of slots (MAX_SPLITS caps it)."""
    splits = max(1, min(triton.cdiv(slots, block_s), triton.cdiv(_sm_count(device), rows)))
    return splits if MAX_SPLITS is None else max(1, min(splits, MAX_SPLITS))


def _impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
          cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor,
          q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, scale: float, softcap: float, eps: float,
          norm_offset: float) -> torch.Tensor:
    b, hq, _, dim = q.shape
    hk, slots = k_cache.shape[1], k_cache.shape[2]
    rep, half = hq // hk, dim // 2
    out = torch.empty(b, hq, 1, dim, device=q.device, dtype=q.dtype)
    block_r, block_s, block_d = _tiles(rep, half, slots)
    splits = _splits(b * hk, slots, block_s, q.device)
    split_len = triton.cdiv(triton.cdiv(slots, splits), block_s) * block_s
    splits = triton.cdiv(slots, split_len)
    tickets = ticket_counters(q.device, b * hk) if splits > 1 else None
    if tickets is None:  # one program a (row, head): no partials, no tickets
        splits, split_len = 1, slots
    if splits > 1:
        pm = torch.empty(b * hk * splits * block_r, device=q.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
        pacc = torch.empty(pm.numel() * 2 * block_d, device=q.device, dtype=torch.float32)
    else:
        pm = pl = pacc = tickets = out  # unused
    cos, sin = cos.expand(b, 1, dim), sin.expand(b, 1, dim)
    norms = q_norm is not None
    cap = float(softcap) if softcap else 1.0
    _decode_attention_kernel[(b * hk, splits)](
        q, k, v, k_cache, v_cache, cos, sin, mask, slot, q_norm if norms else q, k_norm if norms else q, out,
        pm, pl, pacc, tickets, hk, rep, slots, half, split_len, float(scale), cap, 1.0 / cap, float(eps),
        float(norm_offset),
        q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
        *(k_cache.stride(i) for i in range(4)), *(v_cache.stride(i) for i in range(4)),
        cos.stride(0), cos.stride(2), sin.stride(0), sin.stride(2), mask.stride(0), mask.stride(-1),
        out.stride(0), out.stride(1), out.stride(3),
        QK_NORM=norms, SOFTCAP=bool(softcap), SPLIT=splits > 1, FP32=k_cache.dtype == torch.float32,
        BLOCK_P=triton.next_power_of_2(splits), BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)
    return out


def _fake(q, k, v, k_cache, v_cache, cos, sin, mask, slot, q_norm, k_norm, scale, softcap, eps, norm_offset):
    return q.new_empty(q.shape[0], q.shape[1], 1, q.shape[3])


_op = Op("decode_attention", _impl, _fake, mutates=("k_cache", "v_cache"))


def _check(q, k, v, k_cache, v_cache, cos, sin, mask, slot, q_norm, k_norm) -> None:
    """Shapes, dtypes and devices, in plain Python (guards under torch.compile, never graph breaks)."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise InputError(f"decode_attention: q must be (batch, heads, 1, head_dim), got {tuple(q.shape)}")
    b, hq, _, dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != b or k_cache.shape[3] != dim:
        raise InputError(f"decode_attention: k_cache must be (batch={b}, kv_heads, slots, head_dim={dim}), "
                         f"got {tuple(k_cache.shape)}")
    hk, slots = k_cache.shape[1], k_cache.shape[2]
    if hq % hk:
        raise InputError(f"decode_attention: q's {hq} heads are not a multiple of the cache's {hk} KV heads")
    if dim % 2:
        raise InputError(f"decode_attention: head_dim must be even for rotate-half RoPE, got {dim}")
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (b, hk, 1, dim):
            raise InputError(f"decode_attention: {name} must be (batch={b}, kv_heads={hk}, 1, head_dim={dim}), "
                             f"got {tuple(t.shape)}")
    if v_cache.shape != k_cache.shape:
        raise InputError(f"decode_attention: v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1] != 1 or t.shape[2] != dim:
            raise InputError(f"decode_attention: {name} must be (batch={b} or 1, 1, head_dim={dim}), got {tuple(t.shape)}")
    if mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape) != (b, 1, 1, slots):
        raise InputError(f"decode_attention: mask must be a bool (batch={b}, 1, 1, slots={slots}) tensor, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if slot.dtype != torch.long or slot.numel() != 1:
        raise InputError(f"decode_attention: slot must be one int64 cache slot, got {slot.dtype} {tuple(slot.shape)}")
    if (q_norm is None) != (k_norm is None):
        raise InputError("decode_attention: give both q_norm and k_norm weights, or neither")
    for name, t in (("q_norm", q_norm), ("k_norm", k_norm)):
        if t is not None and tuple(t.shape) != (dim,):
            raise InputError(f"decode_attention: {name} must be ({dim},), got {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("cos", cos), ("sin", sin),
                    ("mask", mask), ("slot", slot)):
        if t.device != q.device:
            raise InputError(f"decode_attention: {name} is on {t.device} but q is on {q.device}")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                     slot: torch.Tensor, scale: float, softcap: float | None = None, *,
                     q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                     norm_offset: float = 0.0) -> torch.Tensor:
    """One decode token's attention for a layer: q (b, heads, 1, d), k / v (b, kv_heads, 1, d) straight
    from the projections (before q/k norm and RoPE); k_cache / v_cache (b, kv_heads, slots, d), into
    whose `slot` (a one-element int64 tensor) the new key (normed, rotated) and value are written in
    place; cos / sin (b or 1, 1, d); mask (b, 1, 1, slots) bool, True where the query may look (the
    new slot included). `q_norm` / `k_norm`: RMSNorm weights over head_dim (`eps`, `norm_offset`).
    Returns (b, heads, 1, d) in q's dtype. No gradient: generation only."""
    _check(q, k, v, k_cache, v_cache, cos, sin, mask, slot, q_norm, k_norm)
    if takes_decode_attention(q, k, k_cache):
        return _op(q, k, v, k_cache, v_cache, cos, sin, mask, slot, q_norm, k_norm, float(scale),
                   float(softcap or 0.0), float(eps), float(norm_offset))
    return ref.decode_attention(q, k, v, k_cache, v_cache, cos, sin, mask, slot, scale, softcap,
                                q_norm=q_norm, k_norm=k_norm, eps=eps, norm_offset=norm_offset)


def takes_decode_attention(q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode_attention runs the kernel: where Triton runs (CUDA; the CPU interpreter only
    under backend "triton"), no gradient wanted, 16- or 32-bit q/k matching the cache's dtype."""
    return (not torch.is_grad_enabled() and use_triton(q) and q.dtype in _KERNEL_DTYPES
            and k.dtype == k_cache.dtype == q.dtype)
