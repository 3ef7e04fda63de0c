"""A static key/value cache for generation: one preallocated buffer per layer, written in place,
so every decode step has the same shapes (one compiled graph, CUDA-graph friendly).

Full-attention layers keep every position (`max_len` slots). Sliding-window layers keep only
their window: a ring buffer of `window` slots, position p in slot p % window, which is exactly
the keys a sliding layer may still see. Each slot records the position it holds (-1: empty) and
whether that key is real or left padding, and the decode mask is computed from those records,
so padding, windows and the ring need no special cases in the attention.

Positions here are cache positions (0 ... prompt + new tokens - 1, the same for every row: rows
are left-padded), not RoPE positions (which skip the padding).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .config import SLIDING, ModelConfig


class KVCache:
    """Keys and values of a batch of `batch` sequences of up to `max_len` tokens.

    `fused_attention`: decode steps run each layer's attention as one `ops.decode_attention` launch
    where it can. Off until a GPU times it faster than RoPE + cache writes + SDPA: its first version
    measured slower on an H100, and its rework is untimed (bench/RESULTS.md, twentieth session)."""

    fused_attention = False

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, device: torch.device | str,
                 dtype: torch.dtype):
        self.batch, self.max_len = int(batch), int(max_len)
        self.window = cfg.sliding_window
        self.layer_types = list(cfg.layer_types)
        hk, d = cfg.num_key_value_heads, cfg.head_dim
        self.size = {t: self._size(t) for t in set(self.layer_types)}
        self.keys = [torch.zeros(batch, hk, self.size[t], d, device=device, dtype=dtype) for t in self.layer_types]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.slot_pos = {t: torch.full((batch, n), -1, device=device, dtype=torch.long) for t, n in self.size.items()}
        self.slot_real = {t: torch.zeros(batch, n, device=device, dtype=torch.bool) for t, n in self.size.items()}
        self.length = 0  # tokens written so far (host-side; the decode step takes it as a tensor)
        # Each layer type's decode mask and slot, rebuilt by every `step`. The keys never change, so
        # a compiled step's guards on these dicts hold from the first step on (no second compile).
        self._masks = {t: self.slot_real[t][:, None, None, :] for t in self.size}
        self._slot = {t: torch.zeros(1, device=device, dtype=torch.long) for t in self.size}

    def _size(self, layer_type: str) -> int:
        if layer_type == SLIDING and self.window is not None:
            return min(self.window, self.max_len)
        return self.max_len

    # -- called once per forward, before the layers -------------------------------------------------

    def prefill(self, attention_mask: torch.Tensor) -> None:
        """Start of the prompt's forward: (batch, prompt) attention_mask, 1 for real tokens."""
        if self.length:
            raise InputError("KVCache.prefill: this cache already holds a prompt; make a new cache per generation")
        n = attention_mask.shape[1]
        if n > self.max_len:
            raise InputError(f"prompt of {n} tokens does not fit a cache of {self.max_len}")
        self._prompt = attention_mask.bool()

    def step(self, position: torch.Tensor) -> None:
        """Start of a one-token decode forward at cache position `position` (a 0-d long tensor,
        so a compiled step sees no new constant): records it and builds each layer type's mask."""
        self._prompt = None
        for t, n in self.size.items():
            slot = (position % n).reshape(1)
            pos, real = self.slot_pos[t], self.slot_real[t]
            pos.index_copy_(1, slot, position.reshape(1, 1).expand(self.batch, 1))
            real.index_fill_(1, slot, True)
            ok = (pos >= 0) & real & (pos <= position)
            if t == SLIDING and self.window is not None:
                ok = ok & (position - pos < self.window)
            self._slot[t] = slot
            self._masks[t] = ok[:, None, None, :]

    def mask(self, layer_type: str) -> torch.Tensor:
        """The decode step's (batch, 1, 1, slots) boolean mask for `layer_type`."""
        return self._masks[layer_type]

    @property
    def prefilling(self) -> bool:
        return self._prompt is not None

    # -- called by each attention layer ---------------------------------------------------------------

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this forward's keys/values (batch, kv heads, tokens, head_dim) and returns what the
        layer attends to: the prompt itself while prefilling, the whole buffer when decoding."""
        t = self.layer_types[layer_idx]
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        if self._prompt is not None:
            n, size = k.shape[2], self.size[t]
            keep = min(n, size)  # a ring keeps the last `size` prompt positions
            first = n - keep
            slots = torch.arange(first, n, device=k.device) % size
            kb.index_copy_(2, slots, k[:, :, first:].to(kb.dtype))
            vb.index_copy_(2, slots, v[:, :, first:].to(vb.dtype))
            if layer_idx == self.layer_types.index(t):  # the slot records, once per layer type
                pos = torch.arange(first, n, device=k.device).expand(self.batch, keep)
                self.slot_pos[t].index_copy_(1, slots, pos)
                self.slot_real[t].index_copy_(1, slots, self._prompt[:, first:])
            return k, v
        slot = self._slot[t]
        kb.index_copy_(2, slot, k.to(kb.dtype))
        vb.index_copy_(2, slot, v.to(vb.dtype))
        return kb, vb

    def decode_target(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, slot) of a decode step for a layer whose attention writes its new key and
        value itself (ops.decode_attention) instead of calling `update`."""
        return self.keys[layer_idx], self.values[layer_idx], self._slot[self.layer_types[layer_idx]]

    def advance(self, tokens: int) -> None:
        """After a forward of `tokens` tokens."""
        self.length += tokens
