"""Rotary embedding tables: inverse frequencies for each RoPE type as transformers computes them,
and cos/sin for arbitrary position ids (packed rows restart positions)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import RopeConfig


def inv_freq_and_scale(rc: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, head_dim/2) and the factor cos/sin are multiplied by."""
    dim = int(head_dim * rc.partial_rotary_factor)
    base = rc.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if rc.rope_type in ("default", "dynamic"):
        return inv, 1.0  # dynamic rescales at run time, see RotaryEmbedding.forward
    if rc.rope_type == "linear":
        return inv / rc.factor, 1.0
    if rc.rope_type == "llama3":
        factor, lo, hi = rc.factor, rc.low_freq_factor, rc.high_freq_factor
        old = rc.original_max_position_embeddings
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rc.rope_type == "yarn":
        return _yarn(rc, dim, base)
    raise ValueError(rc.rope_type)


def _yarn(rc: RopeConfig, dim: int, base: float) -> tuple[torch.Tensor, float]:
    factor = rc.factor
    orig = rc.original_max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rc.attention_factor
    if attn is None:
        if rc.mscale and rc.mscale_all_dim:
            attn = float(mscale(factor, rc.mscale) / mscale(factor, rc.mscale_all_dim))
        else:
            attn = mscale(factor)
    beta_fast = rc.beta_fast or 32
    beta_slow = rc.beta_slow or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rc.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return inter * (1 - keep) + extra * keep, attn


class RotaryEmbedding(nn.Module):
    """cos/sin tables (batch, seq, head_dim) in float32 for the given position ids."""

    def __init__(self, rc: RopeConfig, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.rc, self.head_dim, self.max_pos = rc, head_dim, max_position_embeddings
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.attention_scaling = 1.0
        if self.inv_freq.device.type != "meta":
            self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)computes inv_freq; called after the model is built on the meta device."""
        inv, self.attention_scaling = inv_freq_and_scale(self.rc, self.head_dim, self.max_pos)
        dev = device if device is not None else (self.inv_freq.device if self.inv_freq.device.type != "meta" else "cpu")
        self.inv_freq = inv.to(dev)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq.float()
        pos = position_ids.float()
        if self.rc.rope_type == "dynamic":
            inv = self._dynamic_inv_freq(position_ids, inv)
        freqs = pos[..., None] * inv  # (b, s, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def _dynamic_inv_freq(self, position_ids: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        """NTK-aware rescaling once the sequence outgrows max_position_embeddings, computed on
        device from the largest position (no host sync), as transformers' dynamic RoPE does."""
        dim = inv.numel() * 2
        seq_len = (position_ids.max() + 1).float().clamp(min=self.max_pos)
        f = self.rc.factor
        base = self.rc.rope_theta * ((f * seq_len / self.max_pos) - (f - 1)) ** (dim / (dim - 2))
        expo = torch.arange(0, dim, 2, dtype=torch.int64, device=inv.device).float() / dim
        return 1.0 / (base ** expo)
