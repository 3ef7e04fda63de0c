"""Attention masks and the attention product.

Masks are boolean (batch, 1, q, k), True where a query may look, or, on CUDA, the same mask as
a flex attention BlockMask (`flex.py`): a dense mask forces SDPA off its flash kernel, and
soft-capping off SDPA altogether. Building one is skipped when plain causal attention
suffices, so SDPA can take its fused causal (flash) path.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn.functional as F

from . import flex as _flex

Backend = Literal["auto", "sdpa", "flex"]
Mask = Union[torch.Tensor, "_flex.BlockMask", None]
_backend: Backend = "auto"


def set_attention_backend(backend: Backend) -> None:
    """Chooses the attention kernel. "auto": flex attention on CUDA wherever a mask or
    soft-capping is needed, SDPA (or the eager soft-capping path) elsewhere. "sdpa": never
    flex. "flex": flex on any device (CPU runs PyTorch's uncompiled reference: for tests).
    Plain causal attention without soft-capping always takes SDPA's flash path."""
    global _backend
    if backend not in ("auto", "sdpa", "flex"):
        raise ValueError(f"attention backend must be 'auto', 'sdpa' or 'flex', not {backend!r}")
    if backend == "flex" and not _flex.AVAILABLE:
        raise ValueError("this torch has no torch.nn.attention.flex_attention")
    _backend = backend


def get_attention_backend() -> Backend:
    return _backend


def uses_flex(device: torch.device | str) -> bool:
    """Whether masks on `device` are built as BlockMasks under the current backend."""
    if _backend == "auto":
        return _flex.AVAILABLE and torch.device(device).type == "cuda"
    return _backend == "flex"


def is_block_mask(mask: Mask) -> bool:
    return mask is not None and not isinstance(mask, torch.Tensor)


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment id per token of rows that hold several sequences back to back: a new segment
    starts wherever the position does not follow the previous one (as transformers detects)."""
    prev = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], dim=1)
    return (position_ids - prev != 1).cumsum(-1)


def build_mask(
    batch: int,
    seq: int,
    device: torch.device,
    *,
    attention_mask: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    sliding_window: int | None = None,
    bidirectional_groups: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Causal mask with optional key padding, packed-sequence segments, a sliding window, and
    groups of tokens that see each other both ways (Gemma 3 image tokens; -1 for none).

    Returns None when the plain causal mask is enough."""
    window = sliding_window if sliding_window is not None and sliding_window < seq else None
    if attention_mask is None and segments is None and window is None and bidirectional_groups is None:
        return None
    q = torch.arange(seq, device=device)
    causal = q[:, None] >= q[None, :]
    if window is not None and bidirectional_groups is None:
        causal = causal & (q[None, :] > q[:, None] - window)
    allowed = causal[None, None].expand(batch, 1, seq, seq)
    if segments is not None:
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    if bidirectional_groups is not None:
        g = bidirectional_groups
        same = (g[:, None, :, None] == g[:, None, None, :]) & (g[:, None, :, None] >= 0)
        allowed = allowed | same
        if window is not None:  # as transformers: AND(window, OR(causal, groups)); the window bounds only the past
            allowed = allowed & (q[None, :] > q[:, None] - window)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    # A query that may see nothing (left padding) would give NaN; let only such a row see itself.
    empty = ~allowed.any(-1, keepdim=True)
    return allowed | (empty & torch.eye(seq, dtype=torch.bool, device=device))


def make_mask(
    batch: int,
    seq: int,
    device: torch.device,
    *,
    attention_mask: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    sliding_window: int | None = None,
    bidirectional_groups: torch.Tensor | None = None,
    softcap: float | None = None,
) -> Mask:
    """The mask `attention` takes for one layer type, built once per forward: None (plain causal,
    no soft-capping: SDPA flash), a flex BlockMask (see `uses_flex`), or build_mask's tensor."""
    window = sliding_window if sliding_window is not None and sliding_window < seq else None
    plain = attention_mask is None and segments is None and window is None and bidirectional_groups is None
    if plain and softcap is None:
        return None
    kw = dict(attention_mask=attention_mask, segments=segments, sliding_window=window,
              bidirectional_groups=bidirectional_groups)
    if uses_flex(device):
        return _flex.block_mask(batch, seq, device, **kw)
    return build_mask(batch, seq, device, **kw)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped] + mask) v for q (b, h, s, d), k/v (b, hk, s, d).
    mask: None for plain causal, a boolean (b, 1, s, s) tensor, or a flex BlockMask."""
    if is_block_mask(mask):
        return _flex.flex(q, k, v, mask, scale, softcap)
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        s = q.shape[-2]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
