"""`save_merged`: a complete transformers checkpoint with the adapters folded in.

Merging happens in float32 (a 4-bit base is dequantised exactly first) and each tensor is cast
once to the output dtype, one shard at a time, so peak extra memory is about one shard. Tensor
names are the transformers 5 model's. `dtype="4bit"` re-quantises every linear weight but
lm_head with bitsandbytes (NF4, blocksize 64, double quantisation), writing the tensors and
`quantization_config` exactly as transformers' own save_pretrained of a 4-bit model does.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import AdapterError
from ..io.files import atomic_dir, parse_size, write_tokenizer_files
from ..lora.layers import LoraLinear, ModulesToSave, dense_weight, is_linear
from ..lora.peft import check_save_args
from ..lora.targets import hf_path
from ..quant import BLOCKSIZE, quantize_4bit
from ..templates import stop_token_ids


@dataclass
class _Group:
    """Tensors written together (a 4-bit weight and its quant state must share a shard)."""

    nbytes: int
    make: Callable[[], dict[str, torch.Tensor]]


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    d = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise AdapterError(f"save_merged: dtype must be a floating torch dtype or '4bit', got {dtype!r}")
    return d


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's 16-bit (or float32) tensors: its input embedding's."""
    return model.language_model.embed_tokens.weight.dtype


def _live(mod: nn.Module) -> nn.Module:
    """The module whose weights are saved: a ModulesToSave's trainable copy, else the module."""
    return mod.modules_to_save if isinstance(mod, ModulesToSave) else mod


def _dense(mod: nn.Module) -> torch.Tensor:
    """A linear module's weight in float32: merged for LoRA, dequantised for 4-bit."""
    mod = _live(mod)
    return mod.merged_weight() if isinstance(mod, LoraLinear) else dense_weight(mod, torch.float32)


def _quantized(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    data, qs = quantize_4bit(w.contiguous(), f"{name}.weight")
    out = {f"{name}.weight": data}
    out.update({f"{name}.weight.{k}": v for k, v in qs.as_dict(packed=True).items()})
    return out


def _nf4_nbytes(n: int) -> int:
    blocks = -(-n // BLOCKSIZE)
    return (n + 1) // 2 + blocks + 4 * -(-blocks // 256) + 64 + 1024 + 200


def merged_groups(model: nn.Module, out_dtype: torch.dtype, quantize: bool) -> tuple[list[_Group], bool]:
    """Every tensor of the merged checkpoint, lazily, in module order; and whether the LM head
    is still tied to the input embedding (then it is left out, as transformers saves it)."""
    groups: list[_Group] = []
    seen: set[int] = set()
    done: list[str] = []
    size = torch.finfo(out_dtype).bits // 8

    def plain(name: str, t: torch.Tensor) -> None:
        if id(t) in seen:
            return
        seen.add(id(t))
        dt = out_dtype if t.is_floating_point() else t.dtype
        groups.append(_Group(t.numel() * (t.element_size() if not t.is_floating_point() else size),
                             lambda t=t, dt=dt, name=name: {name: t.detach().to(dt)}))

    for path, mod in model.named_modules():
        if any(path.startswith(p + ".") for p in done):
            continue
        hp = hf_path(model, path)
        if is_linear(_live(mod)) or isinstance(mod, LoraLinear):
            done.append(path)
            w_obj = _live(mod).weight
            if id(w_obj) in seen:  # a tied head
                continue
            seen.add(id(w_obj))
            n = int(mod.out_features) * int(mod.in_features)
            leaf = path.rsplit(".", 1)[-1]
            if quantize and leaf != "lm_head":
                groups.append(_Group(_nf4_nbytes(n), lambda mod=mod, hp=hp: _quantized(hp, _dense(mod).to(out_dtype))))
            else:
                groups.append(_Group(n * size, lambda mod=mod, hp=hp: {f"{hp}.weight": _dense(mod).to(out_dtype)}))
            if _live(mod).bias is not None:
                plain(f"{hp}.bias", _live(mod).bias)
            continue
        if isinstance(mod, ModulesToSave):
            done.append(path)
            for name, t in mod.modules_to_save.state_dict(keep_vars=True).items():
                plain(f"{hp}.{name}", t)
            continue
        skip = getattr(mod, "_non_persistent_buffers_set", set())
        for name, t in list(mod._parameters.items()) + [(k, v) for k, v in mod._buffers.items() if k not in skip]:
            if t is not None:
                plain(f"{hp}.{name}" if hp else name, t)
    head = getattr(model, "lm_head", None)
    tied = head is not None and _live(head).weight is _live(model.language_model.embed_tokens).weight
    return groups, tied


def _config(model: nn.Module, out_dtype: torch.dtype, quantize: bool, tied: bool) -> dict[str, Any]:
    raw = getattr(model.config, "raw", None)
    if not raw:
        raise AdapterError("save_merged: the model has no config.raw (the source config.json) to write back")
    cfg = copy.deepcopy(raw)
    cfg.pop("quantization_config", None)
    name = str(out_dtype).replace("torch.", "")
    subs = [c for c in (cfg, cfg.get("text_config"), cfg.get("vision_config")) if isinstance(c, dict)]
    for c in subs:
        for k in ("dtype", "torch_dtype"):
            if k in c or c is cfg:
                c[k] = name
    if not tied and model.config.tie_word_embeddings:  # a tied head trained apart: now its own matrix
        for c in subs[:2]:
            if c is cfg or "tie_word_embeddings" in c:
                c["tie_word_embeddings"] = False
    if quantize:
        cfg["quantization_config"] = {
            "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": name,
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
            "quant_method": "bitsandbytes",
        }
    return cfg


def _saved_tokenizer(folder: Path) -> Any:
    """The tokenizer just written beside the weights (None when there is none or it cannot load)."""
    if not any(folder.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def generation_config(model: nn.Module, tokenizer: Any = None) -> dict[str, Any]:
    """generation_config.json for a merged checkpoint: the source's (or config.json's ids), with
    eos extended by the tokenizer's eos and its chat template's end-of-turn tokens. Without them a
    chat model loaded in transformers does not stop at the end of its answer and repeats it."""
    src = model.load_info.source_path
    f = Path(src) / "generation_config.json" if src is not None else None
    gen: dict[str, Any] = json.loads(f.read_text()) if f is not None and f.is_file() else {}
    text = getattr(model.config, "text", model.config)
    eos = _id_list(gen.get("eos_token_id", text.eos_token_id))
    if tokenizer is not None:
        eos += stop_token_ids(tokenizer)
    eos = list(dict.fromkeys(eos))
    for key in ("bos_token_id", "pad_token_id"):
        if gen.get(key) is None and getattr(text, key, None) is not None:
            gen[key] = getattr(text, key)
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return gen


def _shards(groups: list[_Group], limit: int) -> list[list[_Group]]:
    shards: list[list[_Group]] = [[]]
    used = 0
    for g in groups:
        if shards[-1] and used + g.nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(g)
        used += g.nbytes
    return shards


@torch.no_grad()
def save_merged(
    model: nn.Module,
    save_dir: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    tokenizer: Any = None,
) -> Path:
    """Writes config.json, safetensors shards (+ model.safetensors.index.json when more than one),
    generation_config.json (eos including the chat template's end-of-turn tokens, see
    `generation_config`) and the tokenizer / processor files, with
    every adapter merged. dtype: the output dtype, or "4bit" for a bitsandbytes NF4 checkpoint
    (computing in the model's dtype). Written to a temporary directory, then renamed."""
    from safetensors.torch import save_file

    check_save_args(model, save_dir, overwrite, tokenizer, "save_merged", dtype=dtype, max_shard_size=max_shard_size)
    quantize = isinstance(dtype, str) and dtype.lower() in ("4bit", "nf4")
    out_dtype = model_dtype(model) if quantize else _dtype(dtype)
    limit = parse_size(max_shard_size)
    groups, tied = merged_groups(model, out_dtype, quantize)
    cfg = _config(model, out_dtype, quantize, tied)
    shards = _shards(groups, limit)
    src = model.load_info.source_path
    with atomic_dir(save_dir, overwrite=overwrite, what="merged checkpoint") as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for g in shard:
                tensors.update({k: v.to("cpu").contiguous() for k, v in g.make().items()})
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({k: fname for k in tensors})
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        write_tokenizer_files(tmp, tokenizer, src)
        gen = generation_config(model, tokenizer if tokenizer is not None else _saved_tokenizer(tmp))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    return Path(save_dir)
