"""Plain-PyTorch definitions of every op: the meaning the Triton kernels must reproduce.

They are also the CPU path and what `torch.compile` fuses where Triton cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._ce_common import _check_linear, _chunks, _reduce


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * (offset + weight), in float32, cast to x's dtype at the end."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + weight.float())).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim, in float32, cast to x's dtype at the end."""
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), b, eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE. q (b, h, s, d), k (b, hk, s, d), cos/sin (b, s, d); computed in float32."""
    c = cos.unsqueeze(1).float()
    s = sin.unsqueeze(1).float()
    qf, kf = q.float(), k.float()
    return (qf * c + rotate_half(qf) * s).to(q.dtype), (kf * c + rotate_half(kf) * s).to(k.dtype)


def act_and_grad(x: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """act(x) and act'(x) for act in ops.activations.ACTIVATIONS ('silu', 'gelu_tanh', 'gelu'), by
    the formulas of the kernels' `_act_bwd`, in x's dtype (float32 there): lora_mlp's CPU backward."""
    if act == "silu":
        s = torch.sigmoid(x)
        return x * s, s * (1.0 + x * (1.0 - s))
    if act == "gelu_tanh":  # 0.5 * (1 + tanh(u)) = sigmoid(2u)
        s = torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2 * sqrt(2/pi)
        return x * s, s + x * s * (1.0 - s) * (1.5957691216057308 * (1.0 + 0.134145 * x * x))
    cdf = 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
    return x * cdf, cdf + x * torch.exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return (F.gelu(gate.float(), approximate=approximate) * up.float()).to(gate.dtype)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of (N, V) logits in float32; 'mean' averages over labels != ignore_index."""
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, labels, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **options) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, labels, **options), materialising the logits (the definition)."""
    return cross_entropy(hidden @ weight.t(), labels, **options)


def linear_cross_entropy_chunked(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_size: int | None = None, **options,
) -> torch.Tensor:
    """ops.linear_cross_entropy in plain PyTorch, chunked over tokens and checkpointed per chunk
    (options: ignore_index, softcap, reduction; inputs checked and reduced as the op does).

    Holds one chunk's fp32 logits at a time (recomputed in the backward); `torch.compile` fuses each
    chunk's upcast, softcap and logsumexp. The baseline the fused Triton version is benchmarked against.
    """
    ignore_index, reduction = options.pop("ignore_index", -100), options.pop("reduction", "mean")
    labels, _, chunk = _check_linear(hidden, weight, labels, options.get("softcap"), reduction, chunk_size)
    parts = [
        checkpoint(linear_cross_entropy, hidden[s:e], weight, labels[s:e], use_reentrant=False,
                   ignore_index=ignore_index, reduction="none", **options)
        for s, e in _chunks(hidden.shape[0], chunk)
    ]
    rows = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return _reduce(rows, labels, ignore_index, reduction)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T (+ bias) + scale * (x A^T) B^T, W frozen; A, B cast to x's dtype.
    `weight` may be an NF4Weight: it is dequantised, then cast to x's dtype."""
    if not isinstance(weight, torch.Tensor):
        weight = dequantize_nf4(weight).to(x.dtype)
    y = F.linear(x, weight, bias)
    return y + scale * F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))


def dequantize_nf4(w) -> torch.Tensor:
    """bitsandbytes' NF4 dequantisation of an NF4Weight, bit for bit: absmax (nested: code2[q] *
    absmax2[block // nested_blocksize], then + offset) and code[nibble] * absmax in float32, high
    nibble first, rounded once to w.dtype."""
    n = 1
    for s in w.shape:
        n *= int(s)
    absmax = w.absmax
    if w.nested_absmax is not None:
        idx = torch.arange(absmax.numel(), device=absmax.device) // w.nested_blocksize
        absmax = w.nested_code[absmax.long()] * w.nested_absmax[idx]
        absmax = absmax + w.offset.reshape(())
    b = w.data.reshape(-1)
    q = torch.stack((b >> 4, b & 15), dim=-1).reshape(-1)[:n].long()
    scale = absmax.repeat_interleave(w.blocksize)[:n]
    return (w.code[q] * scale).reshape(w.shape).to(w.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) in x's dtype (W and bias cast to it): what `gemv` computes."""
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def nf4_matmul(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for an NF4Weight W: dequantised (bit-exact, in w.dtype), cast to x's dtype,
    then F.linear (bias cast to x's dtype)."""
    return F.linear(x, dequantize_nf4(w).to(x.dtype), None if bias is None else bias.to(x.dtype))


def _lora_proj(x: torch.Tensor, base, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scale: float) -> torch.Tensor:
    if lora_a is None:
        w = base if isinstance(base, torch.Tensor) else dequantize_nf4(base).to(x.dtype)
        return F.linear(x, w)
    return lora_linear(x, base, lora_a, lora_b, scale)


def lora_mlp(x: torch.Tensor, gate: tuple, up: tuple, down: tuple, activation: str = "swiglu", scale=1.0) -> torch.Tensor:
    """down(act(gate(x)) * up(x)); each projection is (base, lora_a, lora_b) with a LoRA linear
    (lora_a/lora_b None: plain linear); `scale` is one float or one per projection;
    activation 'swiglu', 'geglu' (erf) or 'geglu_tanh'."""
    sg, su, sd = scale if isinstance(scale, (tuple, list)) else (scale,) * 3
    e = _lora_proj(x, *gate, sg)
    g = _lora_proj(x, *up, su)
    if activation == "swiglu":
        h = swiglu(e, g)
    else:
        h = geglu(e, g, "tanh" if activation == "geglu_tanh" else "none")
    return _lora_proj(h, *down, sd)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor, scale: float,
                     softcap: float | None = None, *, q_norm: torch.Tensor | None = None,
                     k_norm: torch.Tensor | None = None, eps: float = 1e-6, norm_offset: float = 0.0) -> torch.Tensor:
    """One decode token's attention, as the unfused layer computes it: q/k RMSNorm (optional), RoPE,
    the new key and value written into the caches at `slot`, then softmax(q k^T * scale
    [soft-capped], masked) v over the cache in float32. Shapes: see ops.decode_attention."""
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps, norm_offset), rms_norm(k, k_norm, eps, norm_offset)
    q, k = rope(q, k, cos, sin)
    k_cache.index_copy_(2, slot.reshape(1), k.to(k_cache.dtype))
    v_cache.index_copy_(2, slot.reshape(1), v.to(v_cache.dtype))
    rep = q.shape[1] // k_cache.shape[1]
    keys = k_cache.float().repeat_interleave(rep, dim=1)
    values = v_cache.float().repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), keys.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values).to(q.dtype)
