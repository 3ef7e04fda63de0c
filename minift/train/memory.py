"""Peak accelerator memory of a LoRA / QLoRA step, estimated from the model's shapes, and the
planner behind `TrainConfig(gradient_checkpointing="auto")`.

The estimate is what `torch.cuda.max_memory_allocated` reports (no CUDA context, no allocator
slack). B = batch size, T = sequence length, N = B*T tokens, L layers, H hidden, I intermediate,
Hq = heads * head_dim, KV = kv_heads * head_dim, V vocabulary, s = 2 (16-bit compute):

  weights      16-bit: s * P_total. NF4: s * (P_total - P_lin) + P_lin * (1/2 + 1/64 + 4/(64*256))
               (P_lin: the linear weights quantised; bytes a weight: 4 bits + an 8-bit absmax per
               64 + a float32 per 256 absmaxes). A loaded model: its parameters' and buffers' bytes.
  adapters     trainable parameters in float32: weights 4 + gradients 4 + AdamW moments 8 = 16 bytes
               each (adamw_8bit: 4 + 4 + 2 = 10)
  checkpoints  the first k of L decoder layers checkpointed keep their input, k * N * H * s; the
               other L - k keep their activations, (L - k) * one layer; with "offload" (unsloth) the
               inputs go to CPU and ~2 layers' stay on the device, 2 * N * H * s
  one layer    the activations a decoder layer's recomputed forward saves plus its backward's
               transient gradients: N * (8H + 2Hq + 3KV + 5I) * s (counted once when k = L: the
               layer being recomputed; within the L - k term otherwise). With the MLP in chunks of
               C tokens (long context, TextModel.mlp_chunk_tokens) the 5I part is min(N, C) * 5I * s,
               once: each layer keeps N * (8H + 2Hq + 3KV) * s
  logits       linear_cross_entropy's one token chunk of logits: min(N, 256 MiB / (V * s)) * V * s,
               plus the final norm's input / output and the hidden gradient, 3 * N * H * s
  4-bit        NF4 only: the weights dequantised at once, 2 * max(in*out) * s: one linear in the
               forward and one in the backward
  pixels       vision models: the batch's float32 images, n_img * C * side^2 * 4
  vision       with adapters on the vision tower. It is checkpointed whenever the decoder is, one
               image at a time (k = 1 image a pass; all n_img under FSDP2, `vision_per_image`),
               and the Trainer offloads what its L_v encoder layers and post-LayerNorm save to the
               host: on the device stay the projector's pooling inputs and ~2 passes' layer inputs
               in flight, (n_img + 2k) * P * H_v * s. Its backward recomputes one encoder layer
               of one pass, k * P * (13 H_v + 5 I_v) * s, after the decoder's checkpoints, layer
               and logits are freed: it adds only what exceeds them. (Before, all images' layer
               inputs stayed, (L_v + 2) * n_img * P * H_v * s, and the recompute took all images
               at once: Gemma 3's notebook job, four 896px images a merged step, peaked 1.36 GiB
               over its unmerged micro-batches.) Without checkpointing, every encoder layer's
               activations, n_img * P * (L_v * (8 H_v + 2 I_v) + 2 H_v) * s.

Checked on an H200 (2026-12-01; batch 4 x 2048, r = 16 on all-linear incl. the vision tower,
AdamW) against measured peaks: Gemma-3-4B vision NF4 7.63 GiB estimated vs 7.61 measured, with
offloaded checkpoints 6.38 vs 6.45, bf16 12.54 vs 12.48; Llama-3.1-8B NF4 10.36 vs 10.31; and on
an H100, Llama-3.2-1B 4.27 / 2.99 vs 4.20 / 2.94 (bf16 / NF4), Gemma-3-4B text 10.57 / 6.23 vs
10.53 / 6.24 (tests/test_cli.py keeps these within 10%). The vision rows ran with the tower's inputs
on the device (vision_offload=False); the offloaded tower's terms are not yet checked against a
measurement (`bench/notebook.py --phases`), nor are partial and no checkpointing, several images
per row, DoRA, adamw_8bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
CHUNK_BYTES = 256 << 20  # minift.ops._ce_common.CHUNK_BYTES
# What the planner keeps free of its budget: the estimate's error (within ~1-2% where measured, up
# to 10% allowed by the tests) and the allocator's fragmentation.
PLAN_MARGIN = 0.10
# cuda_graphs="auto" is on only when a step's estimated peak is at most 1/GRAPH_HEADROOM of the
# budget: the graphs' memory pool keeps its blocks apart from the eager allocator's.
GRAPH_HEADROOM = 2.0
# Tokens an MLP takes at a time in a long-context plan: GEMMs of 8192 rows still run at full speed,
# and Llama-3.1-8B's 5 intermediate-sized activations of a chunk are 1.1 GiB.
MLP_CHUNK = 8192


def adapter_bytes(trainable: int, optim: str = "adamw") -> int:
    """Float32 trainable parameters with their gradients and optimizer state."""
    return trainable * (10 if optim == "adamw_8bit" else 16)


def activation_bytes(text: Any, vision: Any = None, *, batch: int, seq: int, checkpointing: bool | str = True,
                     checkpoint_layers: int | None = None, images: int = 1, vision_lora: bool = True,
                     max_linear: int = 0, four_bit: bool = False, vision_per_image: bool = True,
                     vision_offload: bool = True, mlp_chunk: int | None = None) -> dict[str, float]:
    """Every term but the weights and adapters (module docstring), from the decoder's config `text`
    (and the vision tower's `vision`): checkpointed inputs, one layer, logits chunk, the dequantised
    NF4 weights (`max_linear` = the largest in * out), pixel values, vision activations and backward
    (`vision_per_image`: the checkpointed tower runs one image at a time, as the Trainer has it
    except under FSDP2; `vision_offload=False`: its saved inputs stay on the device, as in a loop
    without the Trainer's offloading hooks; `mlp_chunk`: TextModel.mlp_chunk_tokens)."""
    s, n = 2, batch * seq
    H, I, L, V = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
    Hq, KV = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    if mlp_chunk:  # each MLP keeps only its input; one chunk's 5 I a token exist at a time
        kept, transient = n * (8 * H + 2 * Hq + 3 * KV) * s, min(n, int(mlp_chunk)) * 5 * I * s
    else:
        kept, transient = n * (8 * H + 2 * Hq + 3 * KV + 5 * I) * s, 0
    one = kept + transient
    k = L if checkpoint_layers is None else max(0, min(L, int(checkpoint_layers)))
    if checkpointing == "offload":
        saved, layer = 2 * n * H * s, one
    elif checkpointing and k == L:
        saved, layer = L * n * H * s, one
    elif checkpointing and k > 0:
        saved, layer = k * n * H * s + (L - k) * kept + transient, 0
    else:
        saved, layer = L * kept + transient, 0
    logits = min(n, max(1, CHUNK_BYTES // (V * s))) * V * s + 3 * n * H * s
    pixels = vision_act = vision_layer = 0
    if vision is not None:
        n_img = batch * images
        pixels = n_img * vision.num_channels * vision.image_size**2 * 4
        if vision_lora:
            P, Hv, Iv, Lv = vision.num_patches, vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
            if checkpointing:
                k = 1 if vision_per_image else n_img
                vision_act = ((n_img + 2 * k) if vision_offload else (Lv + 2) * n_img) * P * Hv * s
                vision_layer = k * P * (13 * Hv + 5 * Iv) * s
            else:
                vision_act = n_img * P * (Lv * (8 * Hv + 2 * Iv) + 2 * Hv) * s
    return {"checkpointed_inputs": saved, "one_layer": layer, "logits_chunk": logits,
            "dequantised_weight": 2 * max_linear * s if four_bit else 0, "pixel_values": pixels,
            "vision_activations": vision_act,
            # the vision backward runs once the decoder's checkpoints, layer and logits are freed
            "vision_backward": max(0, vision_layer - (saved + layer + logits))}


def _configs(model: nn.Module) -> tuple[Any, Any]:
    mc = model.config
    return getattr(mc, "text", mc), getattr(mc, "vision", None)


def model_bytes(model: nn.Module) -> int:
    """Bytes of a loaded model's frozen parameters and buffers on its device (trainable ones are in
    `adapter_bytes`)."""
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return frozen + sum(b.numel() * b.element_size() for b in model.buffers())


def estimate(model: nn.Module, *, batch: int, seq: int, checkpointing: bool | str = True,
             checkpoint_layers: int | None = None, optim: str = "adamw", images: int = 1,
             vision_per_image: bool = True, mlp_chunk: int | None = None,
             vision_offload: bool = True) -> dict[str, float]:
    """The estimated peak of one training step of this loaded model (LoRA applied, or full fine-tuning
    with everything trainable), by term, plus "total" (`vision_per_image`, `mlp_chunk`,
    `vision_offload`: see activation_bytes)."""
    from ..quant import Linear4bit

    text, vision = _configs(model)
    q4 = [m for m in model.modules() if isinstance(m, Linear4bit)]  # LoRA's bases included
    max_lin = max((m.in_features * m.out_features for m in q4), default=0)
    four_bit = bool(q4)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vision_lora = vision is not None and any(p.requires_grad for n, p in model.named_parameters()
                                             if ".vision_tower." in f".{n}")
    parts = {"weights": model_bytes(model), "adapters_and_optimizer": adapter_bytes(trainable, optim)}
    parts.update(activation_bytes(text, vision, batch=batch, seq=seq, checkpointing=checkpointing,
                                  checkpoint_layers=checkpoint_layers, images=images, vision_lora=vision_lora,
                                  max_linear=max_lin, four_bit=four_bit,
                                  vision_per_image=vision_per_image, vision_offload=vision_offload,
                                  mlp_chunk=mlp_chunk))
    parts["total"] = sum(parts.values())
    return parts


@dataclass(frozen=True)
class MemoryPlan:
    """What `gradient_checkpointing="auto"` chose: `checkpointing` (False, True or "offload") with the
    first `checkpoint_layers` decoder layers checkpointed (None: all), its estimated peak and the
    budget it had (bytes)."""

    checkpointing: bool | str
    checkpoint_layers: int | None
    estimate: int
    budget: int
    fits: bool
    mlp_chunk_tokens: int | None = None  # long context: each MLP over this many tokens at a time
    host_bytes: int = 0  # "offload": the decoder's checkpoints a forward keeps in host memory

    def describe(self) -> str:
        chunks = f", MLPs in chunks of {self.mlp_chunk_tokens} tokens" if self.mlp_chunk_tokens else ""
        if self.checkpointing == "offload":
            what = (f"every decoder layer checkpointed, inputs offloaded to the CPU "
                    f"({self.host_bytes / GIB:.1f} GiB of host memory){chunks}")
        elif not self.checkpointing:
            what = "no gradient checkpointing"
        elif self.checkpoint_layers is None:
            what = f"every decoder layer checkpointed{chunks}"
        else:
            what = f"the first {self.checkpoint_layers} decoder layers checkpointed"
        fit = "" if self.fits else " (does not fit: the leanest plan)"
        return f"{what}: estimated peak {self.estimate / GIB:.2f} GiB of a {self.budget / GIB:.2f} GiB budget{fit}"


def device_budget(device: torch.device) -> int | None:
    """Bytes this process may still allocate on a CUDA `device` plus what it holds already (the
    estimate counts the loaded weights too); None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_allocated(device))


def host_offload_bytes(model: nn.Module, *, batch: int, seq: int) -> int:
    """Host memory the decoder's offloaded checkpoints take ("offload"): every layer's input,
    L * N * H * s, held from its forward to its backward (a checkpointed vision tower's, offloaded
    too, are a few images' worth and not counted)."""
    text, _ = _configs(model)
    return text.num_hidden_layers * batch * seq * text.hidden_size * 2


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # absent (not Linux, cgroup v1) or "max"
        return None


def host_budget() -> int | None:
    """Bytes of host memory this process can still take: /proc/meminfo's MemAvailable, lowered to
    what the cgroup v2 limit leaves (containers); None where neither is readable."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    cg = Path("/sys/fs/cgroup")
    limit, used = _read_int(cg / "memory.max"), _read_int(cg / "memory.current")
    if limit is not None and used is not None:
        avail = limit - used if avail is None else min(avail, limit - used)
    return avail


def host_shortfall(model: nn.Module, *, batch: int, seq: int, host_budget_bytes: int | None) -> str | None:
    """Why offloaded checkpoints of this batch would not fit (1 - PLAN_MARGIN) of the host memory
    left; None when they fit or the host's memory is unknown."""
    need = host_offload_bytes(model, batch=batch, seq=seq)
    if host_budget_bytes is None or need <= host_budget_bytes * (1 - PLAN_MARGIN):
        return None
    return (f"the offloaded checkpoints of a batch of {batch} x {seq} tokens take ~{need / GIB:.1f} GiB of "
            f"host memory, and {host_budget_bytes / GIB:.1f} GiB is available")


def plan(model: nn.Module, *, batch: int, seq: int, budget_bytes: int, optim: str = "adamw",
         images: int = 1, vision_per_image: bool = True, vision_offload: bool = True,
         host_budget_bytes: int | None = None) -> MemoryPlan:
    """The fastest plan whose estimate fits (1 - PLAN_MARGIN) of `budget_bytes`: no checkpointing,
    else the fewest checkpointed layers (recomputing as little as fits), else their inputs offloaded
    to the CPU, else that with each MLP run in chunks of MLP_CHUNK tokens (long context; a
    checkpointed layer's chunks cost no extra FLOPs); the leanest is taken even when it does not
    fit. Offloading needs host memory too (`host_offload_bytes`): where it would not fit
    (1 - PLAN_MARGIN) of `host_budget_bytes` (None: unknown, assumed to fit), every layer stays
    checkpointed on the device, MLPs chunked. At most L - 1 of L layers are
    checkpointed: the last layer's backward comes right after its forward, so checkpointing it
    would keep its input and recompute it at once - more memory and more time than keeping it."""
    text, _ = _configs(model)
    limit = budget_bytes * (1 - PLAN_MARGIN)
    layers = text.num_hidden_layers

    def total(ckpt: bool | str, k: int | None, chunk: int | None = None) -> int:
        return int(estimate(model, batch=batch, seq=seq, checkpointing=ckpt, checkpoint_layers=k, optim=optim,
                            images=images, vision_per_image=vision_per_image, mlp_chunk=chunk,
                            vision_offload=vision_offload)["total"])

    none = total(False, None)
    if none <= limit:
        return MemoryPlan(False, None, none, budget_bytes, True)
    top = max(layers - 1, 1)
    if total(True, top) <= limit:  # the estimate falls as k grows to L - 1: the least k that fits
        lo, hi = 1, top
        while lo < hi:
            mid = (lo + hi) // 2
            if total(True, mid) <= limit:
                hi = mid
            else:
                lo = mid + 1
        k = None if lo >= layers else lo
        return MemoryPlan(True, k, total(True, k), budget_bytes, True)
    chunk = MLP_CHUNK if batch * seq > MLP_CHUNK else None  # one chunk: no gain
    if host_shortfall(model, batch=batch, seq=seq, host_budget_bytes=host_budget_bytes) is not None:
        on_device = total(True, None, chunk)
        return MemoryPlan(True, None, on_device, budget_bytes, on_device <= limit, chunk)
    host = host_offload_bytes(model, batch=batch, seq=seq)
    off = total("offload", None)
    if off <= limit or chunk is None:
        return MemoryPlan("offload", None, off, budget_bytes, off <= limit, host_bytes=host)
    chunked = total("offload", None, chunk)
    return MemoryPlan("offload", None, chunked, budget_bytes, chunked <= limit, chunk, host)


def gib(value: float) -> int:
    """GiB (a TrainConfig field) to bytes."""
    return int(math.floor(value * GIB))
