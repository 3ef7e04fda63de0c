"""Attention masks and the attention product.

Masks are boolean (batch, 1, q, k), True where a query may look, or, on CUDA, the same mask as
a flex attention BlockMask (`flex.py`): a dense mask forces SDPA off its flash kernel, and
soft-capping off SDPA altogether. Building one is skipped when plain causal attention
suffices, so SDPA can take its fused causal (flash) path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Union

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import flex as _flex
from .flex import MaskRequest, MaskSpec

if TYPE_CHECKING:
    from typing_extensions import Unpack

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
        raise ConfigError(
            f"set_attention_backend: backend={backend!r} is not an attention backend; expected 'auto', 'sdpa' or 'flex'"
        )
    if backend == "flex" and not _flex.AVAILABLE:
        raise ConfigError("set_attention_backend: backend='flex' needs torch.nn.attention.flex_attention, which this torch lacks")
    _backend = backend


def uses_flex(device: torch.device | str, dtype: torch.dtype | None = None) -> bool:
    """Whether masks on `device` for activations of `dtype` are built as BlockMasks under the
    current backend. "auto": on CUDA for 16-bit activations; fp32 (the fidelity setting) takes
    the dense mask and SDPA, since flex's Triton templates found no valid config for fp32
    masked attention on an H100 (torch 2.11, head_dim 64)."""
    if _backend == "auto":
        return _flex.AVAILABLE and torch.device(device).type == "cuda" and dtype != torch.float32
    return _backend == "flex"


def is_block_mask(mask: Mask) -> bool:
    """Whether `attention` will take the flex path for this mask."""
    return mask is not None and not isinstance(mask, torch.Tensor)


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment id per token of rows that hold several sequences back to back: a new segment
    starts wherever the position does not follow the previous one (as transformers detects)."""
    prev = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], dim=1)
    return (position_ids - prev != 1).cumsum(-1)


def build_mask(batch: int, seq: int, device: torch.device, **request: Unpack[MaskRequest]) -> torch.Tensor | None:
    """Causal mask with optional key padding, packed-sequence segments, a sliding window, and
    groups of tokens that see each other both ways (Gemma 3 image tokens; -1 for none).

    Returns None when the plain causal mask is enough."""
    spec = MaskSpec.of(seq, **request)
    if spec.plain:
        return None
    w, g = spec.window, spec.groups
    q = torch.arange(seq, device=device)
    causal = q[:, None] >= q[None, :]
    if w is not None and g is None:
        causal = causal & (q[None, :] > q[:, None] - w)
    allowed = causal[None, None].expand(batch, 1, seq, seq)
    if spec.segments is not None:
        allowed = allowed & (spec.segments[:, None, :, None] == spec.segments[:, None, None, :])
    if g is not None:
        same = (g[:, None, :, None] == g[:, None, None, :]) & (g[:, None, :, None] >= 0)
        allowed = allowed | same
        if w is not None:  # as transformers: AND(window, OR(causal, groups)); the window bounds only the past
            allowed = allowed & (q[None, :] > q[:, None] - w)
    if spec.attention_mask is not None:
        allowed = allowed & spec.attention_mask.bool()[:, None, None, :]
    # A query that may see nothing (left padding) would give NaN; let only such a row see itself.
    empty = ~allowed.any(-1, keepdim=True)
    return allowed | (empty & torch.eye(seq, dtype=torch.bool, device=device))


def make_mask(
    batch: int, seq: int, device: torch.device, *, softcap: float | None = None, dtype: torch.dtype | None = None,
    **request: Unpack[MaskRequest],
) -> Mask:
    """The mask `attention` takes for one layer type, built once per forward: None (plain causal,
    no soft-capping: SDPA flash), a flex BlockMask (see `uses_flex`; `dtype`: the activations'),
    or build_mask's tensor (None again when plain: the eager soft-capping path builds its causal
    mask itself)."""
    if MaskSpec.of(seq, **request).plain and softcap is None:
        return None
    build = _flex.block_mask if uses_flex(device, dtype) else build_mask
    return build(batch, seq, device, **request)


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
