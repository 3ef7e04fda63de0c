"""`minift info MODEL`: the architecture, parameter counts (total, and trainable for a LoRA of rank
--r on all-linear) and an estimate of the accelerator memory a LoRA / QLoRA run needs, read from
config.json alone (the model is built on the meta device: no weights are read or downloaded).
The estimate's terms, and the measured peaks it was checked against, are `minift.train.memory`'s
(the same arithmetic the Trainer's `gradient_checkpointing="auto"` planner uses)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..train.memory import GIB, NF4_BYTES, activation_bytes, adapter_bytes, host_offload_bytes
from .common import UsageError, adapter_base, check_model_arg, is_adapter_dir, str2bool



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
             optim: str = "adamw", dora: bool = False, vision_lora: bool = True, images: int = 1,
             vision_offload: bool = True) -> dict[str, Any]:
    """Everything `minift info` prints, as a dict (bytes and counts). vision_offload=False: the
    vision tower's checkpointed inputs kept on the device (a loop without the Trainer's hooks)."""
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

    act = {four_bit: activation_bytes(text, vis, batch=batch, seq=seq, checkpointing=checkpointing, images=images,
                                      vision_lora=bool(lora_vision), max_linear=max_lin, four_bit=four_bit,
                                      vision_offload=vision_offload)
           for four_bit in (False, True)}
    adapters = adapter_bytes(lora, optim)
    L, H, I, V = text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.vocab_size

    def run(four_bit: bool) -> dict[str, float]:
        weights = (2 * (total - p_lin) + p_lin * NF4_BYTES) if four_bit else 2 * total
        parts = {"weights": weights, "adapters_and_optimizer": adapters, **act[four_bit]}
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
                    "optimizer": optim,
                    "host_offload_bytes": host_offload_bytes(model, batch=batch, seq=seq) if checkpointing == "offload" else 0},
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
    if r["host_offload_bytes"]:
        lines.append(f"host memory for the offloaded checkpoints: {_size(r['host_offload_bytes'])} (page-locked)")
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
