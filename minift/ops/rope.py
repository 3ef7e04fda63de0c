"""Rotary position embedding (rotate-half, as transformers): a Triton kernel with custom autograd.

Each program takes a block of (batch, position) tokens, loads their cos/sin once and rotates every q
and k head with them, so arbitrary per-row position ids (packed sequences) cost nothing extra. The kernel
takes full strides, so q/k straight from `.view(b, s, h, d).transpose(1, 2)` and expanded
gradients are read in place, and outputs keep q/k's memory layout. The backward is the same
rotation transposed (sin negated, halves swapped), so it reuses the forward kernel.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from . import reference as ref
from ._backend import HAS_TRITON, Op, use_triton

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(X, O, x_tok, o_tok, tmask, H, sx_h, sx_d, so_h, so_d, c1, c2, s1, s2, HALF, d, dmask,
                      BLOCK_H: tl.constexpr):
        """y1 = x1*c1 - x2*s1, y2 = x2*c2 + x1*s2 for all H heads of a block of tokens, BLOCK_H heads at a time.

        x_tok/o_tok: (BLOCK_T,) int64 offsets of each token; c*/s*: (BLOCK_T, 1, BLOCK_D) fp32.
        """
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
            m = tmask[:, None, None] & (h < H)[None, :, None] & dmask[None, None, :]
            xp = X + x_tok[:, None, None] + h[None, :, None] * sx_h + d[None, None, :] * sx_d
            x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(xp + HALF * sx_d, mask=m, other=0.0).to(tl.float32)
            op = O + o_tok[:, None, None] + h[None, :, None] * so_h + d[None, None, :] * so_d
            tl.store(op, (x1 * c1 - x2 * s1).to(O.dtype.element_ty), mask=m)
            tl.store(op + HALF * so_d, (x2 * c2 + x1 * s2).to(O.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_kernel(Q, K, QO, KO, COS, SIN, T, S, HQ, HK, HALF,
                     sq_b, sq_h, sq_s, sq_d, sqo_b, sqo_h, sqo_s, sqo_d,
                     sk_b, sk_h, sk_s, sk_d, sko_b, sko_h, sko_s, sko_d,
                     sc_b, sc_s, sc_d, ss_b, ss_s, ss_d,
                     BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr,
                     BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # flat (batch, position) token
        tmask = t < T
        b = t // S
        pos = t % S
        d = tl.arange(0, BLOCK_D)
        dmask = d < HALF
        m = tmask[:, None] & dmask[None, :]
        cp = COS + (b * sc_b + pos * sc_s)[:, None] + d[None, :] * sc_d
        sp = SIN + (b * ss_b + pos * ss_s)[:, None] + d[None, :] * ss_d
        c1 = tl.load(cp, mask=m, other=0.0).to(tl.float32)[:, None, :]
        c2 = tl.load(cp + HALF * sc_d, mask=m, other=0.0).to(tl.float32)[:, None, :]
        s1 = tl.load(sp, mask=m, other=0.0).to(tl.float32)[:, None, :]
        s2 = tl.load(sp + HALF * ss_d, mask=m, other=0.0).to(tl.float32)[:, None, :]
        if BACKWARD:  # the transposed rotation: dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1
            tmp = s1
            s1 = -s2
            s2 = -tmp
        _rotate_heads(Q, QO, b * sq_b + pos * sq_s, b * sqo_b + pos * sqo_s, tmask, HQ, sq_h, sq_d, sqo_h, sqo_d,
                      c1, c2, s1, s2, HALF, d, dmask, BLOCK_HQ)
        _rotate_heads(K, KO, b * sk_b + pos * sk_s, b * sko_b + pos * sko_s, tmask, HK, sk_h, sk_d, sko_h, sko_d,
                      c1, c2, s1, s2, HALF, d, dmask, BLOCK_HK)


# Rows (token x head) per half-tile. An H100 sweep of the tile size (bf16, 8192 tokens, Llama-1B's
# 32/8 heads of 64 and Gemma-3-4B's 8/4 heads of 256) found 64 rows the fastest or within 5% for both.
_TILE_ROWS = 64


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool):
    """Rotate q and k (or their gradients) into new tensors laid out like them."""
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    b, hq, s, d = q.shape
    hk = k.shape[1]
    tokens = b * s
    if tokens == 0 or d == 0:
        return qo, ko
    cos, sin = cos.expand(b, s, d), sin.expand(b, s, d)  # batch 1 broadcasts with stride 0
    block_d = triton.next_power_of_2(d // 2)
    # Many heads: loop over head blocks rather than grow the tile.
    block_hq = min(triton.next_power_of_2(max(hq, 1)), _TILE_ROWS)
    block_hk = min(triton.next_power_of_2(max(hk, 1)), _TILE_ROWS)
    block_t = max(1, min(_TILE_ROWS // max(block_hq, block_hk), triton.next_power_of_2(tokens)))
    num_warps = 8 if block_t * max(block_hq, block_hk) * block_d >= 4096 else 4
    _rope_kernel[(triton.cdiv(tokens, block_t),)](
        q, k, qo, ko, cos, sin, tokens, s, hq, hk, d // 2,
        *q.stride(), *qo.stride(), *k.stride(), *ko.stride(), *cos.stride(), *sin.stride(),
        BACKWARD=backward, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
        num_warps=num_warps)
    return qo, ko


def _rope_impl(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, cos, sin, backward=False)


def _rope_bwd_impl(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(dq, dk, cos, sin, backward=True)


def _rope_fake(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)


_rope_bwd_op = Op("rope_backward", _rope_bwd_impl, _rope_fake)


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_bwd_op(dq, dk, cos, sin)
    return dq, dk, None, None


_rope_op = Op("rope", _rope_impl, _rope_fake, _rope_setup, _rope_backward)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Shape/dtype/device checks in plain Python (guards under torch.compile, never graph breaks)."""
    if q.dim() != 4 or k.dim() != 4:
        raise InputError(
            f"rope: q and k must be (batch, heads, seq, head_dim), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    b, _, s, d = q.shape
    if d % 2:
        raise InputError(f"rope: q's head_dim must be even for rotate-half, got {d}")
    if k.shape[3] != d:
        raise InputError(f"rope: k's head_dim {k.shape[3]} != q's head_dim {d}")
    if k.shape[0] != b or k.shape[2] != s:
        raise InputError(f"rope: k {tuple(k.shape)} must match q's batch {b} and seq {s}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1] != s or t.shape[2] != d:
            raise InputError(
                f"rope: {name} must be (batch={b} or 1, seq={s}, head_dim={d}) to match q, got {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not t.is_floating_point():
            raise InputError(f"rope: {name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != q.device:
            raise InputError(f"rope: {name} is on {t.device} but q is on {q.device}")


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE in fp32: q (b, h, s, d), k (b, hk, s, d), cos/sin (b or 1, s, d) -> (q', k').

    cos/sin get no gradient (they are functions of position ids). float64 uses the reference.
    """
    _check(q, k, cos, sin)
    if use_triton(q, elementwise=True) and q.dtype in _KERNEL_DTYPES and k.dtype in _KERNEL_DTYPES:
        return _rope_op(q, k, cos, sin)
    return ref.rope(q, k, cos, sin)
