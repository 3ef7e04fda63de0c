"""Plain-PyTorch definitions of every op: the meaning the Triton kernels must reproduce.

They are also the CPU path and what `torch.compile` fuses where Triton cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, labels), materialising the logits (the definition)."""
    return cross_entropy(hidden @ weight.t(), labels, ignore_index=ignore_index, softcap=softcap, reduction=reduction)


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
