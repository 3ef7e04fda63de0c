"""Attention masks and the attention product.

Masks are boolean (batch, 1, q, k), True where a query may look. Building one is skipped when
plain causal attention suffices, so SDPA can take its fused causal (flash) path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped] + mask) v for q (b, h, s, d), k/v (b, hk, s, d)."""
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
