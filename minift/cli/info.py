"""`minift info MODEL`: the architecture, parameter counts (total, and trainable for a LoRA of rank
--r on all-linear) and an estimate of the accelerator memory a LoRA / QLoRA run needs, read from
config.json alone (the model is built on the meta device: no weights are read or downloaded).

The estimate (bytes; what `torch.cuda.max_memory_allocated` would report, so without the CUDA
context and the allocator's slack, typically another 0.3-1 GiB). B = batch size, T = sequence
length, N = B*T tokens, L layers, H hidden, I intermediate, Hq = heads * head_dim, KV =
kv_heads * head_dim, V vocabulary, s = 2 (16-bit compute):

  weights      16-bit: s * P_total. NF4: s * (P_total - P_lin) + P_lin * (1/2 + 1/64 + 4/(64*256))
               (P_lin: the decoder's and, quantised too, the vision tower's linear weights; bytes a
               weight: 4 bits + an 8-bit absmax per 64 + a float32 per 256 absmaxes)
  adapters     A = sum over LoRA targets of r * (in + out) (+ out per DoRA magnitude), float32:
               weights 4 + gradients 4 + AdamW moments 8 = 16 bytes each (adamw_8bit: 4 + 4 + 2 = 10)
  checkpoints  gradient checkpointing: each layer's input is kept, L * N * H * s; with "offload"
               (unsloth) they go to CPU and ~2 layers' stay on the device, 2 * N * H * s; without
               checkpointing this term is replaced by L times the next one
  one layer    the activations a decoder layer's recomputed forward saves plus its backward's
               transient gradients: N * (8H + 2Hq + 3KV + 5I) * s
  logits       linear_cross_entropy's one token chunk of logits: min(N, 256 MiB / (V * s)) * V * s,
               plus the final norm's input / output and the hidden gradient, 3 * N * H * s
  4-bit        NF4 only: one linear dequantised in the forward and one in the backward, 2 * max(in*out) * s
  pixel values vision models: the batch's images, n_img * C * image_size^2 * 4 (float32, as the
               processor makes them; the batch holds them for the whole step), n_img = B * images
  vision       with adapters on the vision tower (without them it builds no autograd graph): P =
               (image_size / patch_size)^2 patches an image, H_v / I_v / L_v the tower's widths and
               layers. With gradient checkpointing (either kind) its encoder layers are recomputed
               too, so it keeps each layer's input plus the final LayerNorm's input and the
               projector's pooling input, (L_v + 2) * n_img * P * H_v * s, on the device ("offload"
               moves only the decoder's); they are held from the vision forward, first, to the
               vision backward, last, so through the whole decoder backward. Without checkpointing
               each layer keeps its activations instead, n_img * P * (L_v * (8 H_v + 2 I_v) + 2 H_v) * s
               (q, k, v and attention output, the two LayerNorms' inputs and outputs, fc1's output
               and its GELU; counted from the saved tensors, not measured)
  vision bwd   checkpointed: the vision backward recomputes one encoder layer, n_img * P *
               (13 H_v + 5 I_v) * s (the decoder layer's count with Hq = KV = H_v); it runs after the
               decoder backward has freed checkpoints, one layer and logits, so only what it needs
               beyond those three terms adds to the peak (nothing, for the shapes below)

The estimate matches torch.cuda.max_memory_allocated within 3% (N = 4 x 2048, r = 16 on
all-linear, fused AdamW; tests/test_cli.py keeps them within 10%):
  bench/RESULTS.md, one H100: Llama-3.2-1B 4.27 / 2.99 GiB estimated vs 4.20 / 2.94 measured
    (bf16 / NF4), Gemma-3-4B text 10.57 / 6.23 vs 10.53 / 6.24, Gemma NF4 with offloaded
    checkpoints 4.98 vs 5.08.
  One H200, 2026-12-01, one 896x896 image (256 tokens) a row, adapters on the vision tower too:
    Gemma-3-4B vision 12.54 / 7.63 vs 12.48 / 7.61 (bf16 / NF4), NF4 with offloaded checkpoints
    6.38 vs 6.45; Llama-3.1-8B NF4 (text) 10.36 vs 10.31.
Not yet checked: without checkpointing, several images a row, DoRA, adamw_8bit."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import UsageError, adapter_base, check_model_arg, is_adapter_dir, str2bool

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
CHUNK_BYTES = 256 << 20  # minift.ops._ce_common.CHUNK_BYTES


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="minift info")
    p.description = ("Architecture, parameter counts and an estimate of the GPU memory of a LoRA / QLoRA run, "
                     "from config.json alone.")
    p.add_argument("model", metavar="MODEL", help="a model directory, a hub id (only config.json is fetched) or an "
                                                  "adapter directory")
    p.add_argument("--r", type=int, default=16, help="LoRA rank of the trainable count (default: 16)")
    p.add_argument("--max_seq_length", type=int, default=2048, help="(default: 2048)")
    p.add_argument("--per_device_train_batch_size", type=int, default=2, help="(default: 2)")
    p.add_argument("--load_in_4bit", action="store_true", help="estimate QLoRA (NF4 base) only")
    p.add_argument("--use_gradient_checkpointing", default="true",
                   help="true (default), unsloth (offloaded to CPU) or false")
    p.add_argument("--optim", default="adamw", help="adamw (default) or adamw_8bit (smaller optimizer states)")
    p.add_argument("--use_dora", action="store_true", help="count DoRA's magnitude vectors")
    p.add_argument("--finetune_vision_layers", type=str2bool, default=True, metavar="BOOL",
                   help="vision models: adapters on the vision tower too (default: true)")
    p.add_argument("--images_per_example", type=int, default=1, help="vision models (default: 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _config(spec: str) -> tuple[dict[str, Any], str]:
    from ..io.hub import is_hub_id
    from ..models.loader import read_config

    if is_adapter_dir(spec):
        spec = adapter_base(Path(spec).expanduser())
    p = Path(spec).expanduser()
    if p.is_dir():
        return read_config(p), str(p)
    if not is_hub_id(spec):
        raise UsageError("MODEL", f"{spec}: no such directory, and not a hub id")
    from huggingface_hub import hf_hub_download

    try:
        f = Path(hf_hub_download(spec, "config.json"))
    except Exception as e:  # offline, gated, missing: all mean the same here
        raise UsageError("MODEL", f"{spec}: could not fetch config.json: {e}") from None
    return read_config(f.parent), spec


def meta_model(cfg: dict[str, Any]) -> Any:
    import torch

    from ..models.classes import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    model.tie_weights()
    return model


def describe(cfg: dict[str, Any], *, r: int = 16, seq: int = 2048, batch: int = 2, checkpointing: bool | str = True,
             optim: str = "adamw", dora: bool = False, vision_lora: bool = True, images: int = 1) -> dict[str, Any]:
    """Everything `minift info` prints, as a dict (bytes and counts)."""
    from ..lora.targets import linear_modules, select_targets
    from ..train.report import count_parameters

    model = meta_model(cfg)
    mc = model.config
    text = getattr(mc, "text", mc)
    vis = getattr(mc, "vision", None)
    total = count_parameters(model)
    lin = linear_modules(model)
    p_lin = sum(m.in_features * m.out_features for m in lin.values())
    max_lin = max(m.in_features * m.out_features for m in lin.values())
    targets = select_targets(model, "all-linear", vision=vision_lora)
    lora = sum(r * (lin[t].in_features + lin[t].out_features) + (lin[t].out_features if dora else 0) for t in targets)
    lora_vision = sum(r * (lin[t].in_features + lin[t].out_features) for t in targets if ".vision_tower." in f".{t}")

    s = 2
    n = batch * seq
    H, I, L, V = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
    Hq, KV = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    layer = n * (8 * H + 2 * Hq + 3 * KV + 5 * I) * s
    if checkpointing == "offload":
        saved = 2 * n * H * s
    elif checkpointing:
        saved = L * n * H * s
    else:
        saved, layer = L * layer, 0
    chunk_rows = max(1, CHUNK_BYTES // (V * s))
    logits = min(n, chunk_rows) * V * s + 3 * n * H * s
    per_adapter = 10 if optim == "adamw_8bit" else 16
    adapters = lora * per_adapter
    pixels = vision_act = vision_layer = 0
    if vis is not None:
        n_img = batch * images
        pixels = n_img * vis.num_channels * vis.image_size**2 * 4
        if lora_vision:
            P, Hv, Iv, Lv = vis.num_patches, vis.hidden_size, vis.intermediate_size, vis.num_hidden_layers
            if checkpointing:
                vision_act = (Lv + 2) * n_img * P * Hv * s
                vision_layer = n_img * P * (13 * Hv + 5 * Iv) * s
            else:
                vision_act = n_img * P * (Lv * (8 * Hv + 2 * Iv) + 2 * Hv) * s

    def run(four_bit: bool) -> dict[str, float]:
        weights = (s * (total - p_lin) + p_lin * NF4_BYTES) if four_bit else s * total
        parts = {"weights": weights, "adapters_and_optimizer": adapters, "checkpointed_inputs": saved,
                 "one_layer": layer, "logits_chunk": logits, "dequantised_weight": 2 * max_lin * s if four_bit else 0,
                 "pixel_values": pixels, "vision_activations": vision_act}
        # the vision backward runs once the decoder's checkpoints, layer and logits are freed
        parts["vision_backward"] = max(0, vision_layer - (saved + layer + logits))
        parts["total"] = sum(parts.values())
        return parts

    arch = {"model_type": mc.model_type, "layers": L, "hidden_size": H, "intermediate_size": I,
            "attention_heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads,
            "head_dim": text.head_dim, "vocab_size": V, "tie_word_embeddings": bool(getattr(mc, "tie_word_embeddings", False)),
            "max_position_embeddings": text.max_position_embeddings}
    if vis is not None:
        arch["vision"] = {"layers": vis.num_hidden_layers, "hidden_size": vis.hidden_size,
                          "image_size": vis.image_size, "patch_size": vis.patch_size,
                          "mm_tokens_per_image": mc.mm_tokens_per_image}
    return {"architecture": arch, "parameters": {"total": total, "linear": p_lin, "lora_trainable": lora,
                                                  "lora_targets": len(targets), "r": r},
            "run": {"batch_size": batch, "max_seq_length": seq, "gradient_checkpointing": checkpointing,
                    "optimizer": optim},
            "memory_bytes": {"lora_16bit": run(False), "qlora_nf4": run(True)}}


def _size(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"


def _fmt(d: dict[str, Any], name: str, four_bit_only: bool) -> str:
    a, p = d["architecture"], d["parameters"]
    lines = [f"{name}: {a['model_type']}, {a['layers']} layers, hidden {a['hidden_size']}, intermediate "
             f"{a['intermediate_size']}, {a['attention_heads']} heads ({a['kv_heads']} kv) x {a['head_dim']}, vocab "
             f"{a['vocab_size']}{', tied head' if a['tie_word_embeddings'] else ''}"]
    if "vision" in a:
        v = a["vision"]
        lines.append(f"vision tower: {v['layers']} layers, hidden {v['hidden_size']}, {v['image_size']}px images in "
                     f"{v['patch_size']}px patches, {v['mm_tokens_per_image']} tokens an image")
    lines.append(f"parameters: {p['total']:,} total; LoRA r={p['r']} on all-linear ({p['lora_targets']} modules): "
                 f"{p['lora_trainable']:,} trainable ({100 * p['lora_trainable'] / p['total']:.2f}%)")
    r = d["run"]
    lines.append(f"estimated peak GPU memory, batch {r['batch_size']} x {r['max_seq_length']} tokens, gradient "
                 f"checkpointing {r['gradient_checkpointing']}, {r['optimizer']} (allocated; add ~0.5 GiB CUDA context):")
    kinds = [("qlora_nf4", "QLoRA (NF4)")] if four_bit_only else [("lora_16bit", "LoRA (16-bit)"), ("qlora_nf4", "QLoRA (NF4)")]
    for key, label in kinds:
        m = d["memory_bytes"][key]
        parts = ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in m.items() if k != "total" and v)
        lines.append(f"  {label}: {_size(m['total'])} ({parts})")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        check_model_arg(a.model, "MODEL")
        for name in ("r", "max_seq_length", "per_device_train_batch_size", "images_per_example"):
            if getattr(a, name) < 1:
                raise UsageError(f"--{name}", f"must be >= 1, got {getattr(a, name)}")
        from .train import gradient_checkpointing

        ckpt = gradient_checkpointing(a.use_gradient_checkpointing)
        if a.optim not in ("adamw", "adamw_8bit"):
            raise UsageError("--optim", "use adamw or adamw_8bit")
        cfg, name = _config(a.model)
    except UsageError as e:
        p.print_usage(sys.stderr)
        sys.stderr.write(f"minift info: error: {e}\n")
        return 2
    d = describe(cfg, r=a.r, seq=a.max_seq_length, batch=a.per_device_train_batch_size, checkpointing=ckpt,
                 optim=a.optim, dora=a.use_dora, vision_lora=a.finetune_vision_layers, images=a.images_per_example)
    if a.json:
        print(json.dumps(d, indent=2))
    else:
        print(_fmt(d, name, a.load_in_4bit))
    return 0
