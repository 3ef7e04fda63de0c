"""FlexAttention path: the masks of `attention.build_mask` as a block-sparse `BlockMask`, and
Gemma 2's logit soft-capping as a `score_mod`.

Why: a dense (b, 1, s, s) boolean mask pushes SDPA off its flash kernel onto one that reads a
materialised bias, and soft-capping otherwise needs the full fp32 (b, h, s, s) scores. Flex
attention fuses both into one tiled kernel that skips fully masked tiles (the window's far past,
other packed sequences, padding) and runs `mask_mod` only on tiles the mask cuts through.

The BlockMask is built once per forward per layer type (`block_mask`), outside the decoder
layers; the layers only call `flex` (compiled once, here). On CPU, flex runs uncompiled: that is
PyTorch's dense reference implementation, slow but exact, used by the tests only.

Kernel options: none by default, i.e. PyTorch's per-architecture heuristics. On H100 (sm_90,
227 KiB shared memory per block) those pick, for bf16 head_dim 256, forward tiles 64x32 with 3
stages and backward tiles 64x64 with 2 stages, both within the shared-memory budget, so Gemma's
head_dim 256 needs no override there. GPUs with under ~200 KiB per block (A10/L40/RTX, sm_12x)
fail to compile the head_dim > 128 backward with those defaults; on them `SMALL_SMEM_OPTIONS`
(32x32 tiles, 2 stages) is used for head_dim > 128. `set_kernel_options` overrides per head_dim.
On CUDA the backend is always the tiled Triton kernel (`flex`), also for short queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypedDict

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from typing_extensions import Unpack

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    AVAILABLE = True
except ImportError:  # torch without flex attention
    BlockMask = None  # type: ignore[assignment,misc]
    AVAILABLE = False

# Compiled once: uncompiled flex materialises the scores (and does not run backward on CPU).
# dynamic=False: one kernel per shape; sequence lengths should come from a few buckets.
_compiled = torch.compile(flex_attention, dynamic=False) if AVAILABLE else None

# Fits ~99 KiB of shared memory per block at head_dim 256 (forward and backward).
SMALL_SMEM_OPTIONS: dict[str, Any] = {
    "fwd_BLOCK_M": 32, "fwd_BLOCK_N": 32, "fwd_num_stages": 2, "fwd_num_warps": 4,
    "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 32,
    "bwd_num_stages": 2, "bwd_num_warps": 4,
}
# The kernel option that selects the tiled kernel: BACKEND where torch has it, else the older knob.
_TILED: dict[str, Any] = {"FORCE_USE_FLEX_ATTENTION": True}
if AVAILABLE:
    import typing

    from torch.nn.attention import flex_attention as _fa

    if "TRITON" in typing.get_args(getattr(_fa, "_Backend", None) or ()):
        _TILED = {"BACKEND": "TRITON"}
_kernel_options: dict[int, dict[str, Any] | None] = {}  # head_dim -> options (explicit overrides)
_small_smem = False  # set by `block_mask` on the first CUDA device with little shared memory
_checked_devices: set[int] = set()


class MaskRequest(TypedDict, total=False):
    """The keyword arguments every mask builder takes (`MaskSpec.of` documents them)."""

    attention_mask: torch.Tensor | None
    segments: torch.Tensor | None
    sliding_window: int | None
    bidirectional_groups: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """One mask request, normalised once so that the dense mask (`attention.build_mask`), the
    BlockMask (`block_mask`) and the dispatch (`attention.make_mask`) agree on what it means.
    It lives here, not in attention.py, because attention.py imports this module.

    attention_mask: (b, s) key padding, nonzero where valid. segments: (b, s) packed-sequence
    ids. window: the sliding window, None when it is absent or covers the whole sequence.
    groups: (b, s) ids of tokens that see each other both ways (Gemma 3 images), -1 for none.
    """

    attention_mask: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    window: int | None = None
    groups: torch.Tensor | None = None

    @classmethod
    def of(
        cls,
        seq: int,
        *,
        attention_mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        sliding_window: int | None = None,
        bidirectional_groups: torch.Tensor | None = None,
    ) -> "MaskSpec":
        """A window of at least `seq` keys cuts nothing, so it is dropped: the mask stays plain."""
        window = sliding_window if sliding_window is not None and sliding_window < seq else None
        return cls(attention_mask, segments, window, bidirectional_groups)

    @property
    def plain(self) -> bool:
        """Nothing beyond causal: no mask needs building (SDPA's fused causal path)."""
        return self.attention_mask is None and self.segments is None and self.window is None and self.groups is None


def set_kernel_options(head_dim: int, options: dict[str, Any] | None) -> None:
    """Kernel options (BLOCK_M, fwd_num_stages, bwd_BLOCK_N1, ...) for one head_dim; None goes
    back to the automatic choice. For benchmarks and GPUs the defaults do not fit."""
    if options is None:
        _kernel_options.pop(head_dim, None)
    else:
        _kernel_options[head_dim] = dict(options)


def _check_device(device: torch.device) -> None:
    """Notes once per device whether it has too little shared memory for the default tiles.
    Runs where the block mask is built (eager, outside the layers), never in a traced layer."""
    global _small_smem
    if device.type != "cuda" or torch.compiler.is_compiling():
        return
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _checked_devices:
        return
    _checked_devices.add(idx)
    smem = getattr(torch.cuda.get_device_properties(idx), "shared_memory_per_block_optin", 0)
    if smem and smem < 200 * 1024:
        _small_smem = True


def _runs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index of the run of equal values each position belongs to, (b, s) each."""
    s = x.shape[-1]
    idx = torch.arange(s, device=x.device).expand_as(x)
    starts = torch.ones_like(x, dtype=torch.bool)
    starts[:, 1:] = x[:, 1:] != x[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    last = torch.where(ends, idx, torch.full_like(idx, s - 1)).flip(-1).cummin(-1).values.flip(-1)
    return first, last


def empty_rows(
    valid: torch.Tensor,
    segments: torch.Tensor | None,
    groups: torch.Tensor | None,
    window: int | None,
) -> torch.Tensor:
    """(b, s) True for queries that may see no valid key under build_mask's rules (left padding),
    in O(b s) with prefix sums instead of an s x s mask and without a host sync. Assumes
    segments and image groups are contiguous runs, as packed_segments / image_groups give."""
    b, s = valid.shape
    idx = torch.arange(s, device=valid.device).expand(b, s)
    before = F.pad(valid.long().cumsum(-1), (1, 0))  # before[:, i]: valid keys at positions < i

    def any_valid(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # a valid key in [lo, hi]
        lo, hi = lo.clamp(0, s), (hi + 1).clamp(0, s)
        return before.gather(1, hi) - before.gather(1, lo) > 0

    past = idx - window + 1 if window is not None else torch.zeros_like(idx)
    lo = past if segments is None else torch.maximum(past, _runs(segments)[0])
    seen = any_valid(lo, idx)
    if groups is not None:
        first, last = _runs(groups)
        seen = seen | ((groups >= 0) & any_valid(torch.maximum(past, first), last))
    return ~seen


def mask_mod(
    *,
    valid: torch.Tensor | None,
    empty: torch.Tensor | None,
    segments: torch.Tensor | None,
    groups: torch.Tensor | None,
    window: int | None,
) -> Callable:
    """build_mask's rule as a flex mask_mod: ((causal & same segment) | same image group) & window
    & valid key, plus "a query that sees nothing sees itself". One closure per combination, so
    the compiled kernel evaluates only the parts in use."""

    def mod(b, h, q, k):
        m = q >= k
        if segments is not None:
            m = m & (segments[b, q] == segments[b, k])
        if groups is not None:
            m = m | ((groups[b, q] == groups[b, k]) & (groups[b, q] >= 0))
        if window is not None:
            m = m & (q - k < window)
        if valid is not None:
            m = (m & valid[b, k]) | (empty[b, q] & (q == k))
        return m

    return mod


def block_mask(batch: int, seq: int, device: torch.device, **request: Unpack[MaskRequest]) -> "BlockMask":
    """The BlockMask of build_mask's mask (arguments as build_mask; plain causal when none)."""
    _check_device(torch.device(device))
    spec = MaskSpec.of(seq, **request)
    valid = empty = None
    if spec.attention_mask is not None:
        valid = spec.attention_mask.bool()
        empty = empty_rows(valid, spec.segments, spec.groups, spec.window)
    mod = mask_mod(valid=valid, empty=empty, segments=spec.segments, groups=spec.groups, window=spec.window)
    per_row = valid is not None or spec.segments is not None or spec.groups is not None
    return create_block_mask(mod, batch if per_row else None, None, seq, seq, device=device)


def softcap_mod(cap: float) -> Callable:
    """Gemma 2's tanh soft-capping of the scores, fused into the flex kernel."""

    def mod(score, b, h, q, k):
        return torch.tanh(score / cap) * cap

    return mod


def flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: "BlockMask",
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped], masked) v for q (b, h, s, d), k/v (b, hk, s, d)."""
    d = q.shape[-1]
    opts = _kernel_options.get(d)
    if opts is None and _small_smem and d > 128:
        opts = SMALL_SMEM_OPTIONS
    if q.is_cuda and not (opts and ("BACKEND" in opts or "FORCE_USE_FLEX_ATTENTION" in opts)):
        # the tiled kernel, never flex-decoding: torch picks that for queries under 128 tokens,
        # and finds no kernel config for some (a 98-token Gemma 3 row at head_dim 16, torch 2.11)
        opts = {**(opts or {}), **_TILED}
    # Inside a compiled region (a compiled decoder layer) dynamo lowers flex_attention itself.
    fn = flex_attention if q.device.type == "cpu" or torch.compiler.is_compiling() else _compiled
    return fn(
        q, k, v,
        score_mod=softcap_mod(softcap) if softcap is not None else None,
        block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1], kernel_options=opts,
    )
