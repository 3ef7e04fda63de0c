"""Saving and loading adapters in PEFT's format (adapter_config.json + adapter_model.safetensors).

Keys are PEFT's saved names, `base_model.model.<module path>.lora_A.weight` (no adapter name),
with module paths as the transformers model names them, so `peft.PeftModel.from_pretrained`
loads minift's adapters and `load_adapter` loads PEFT's.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError
from ..io.files import atomic_dir, read_json_object, write_tokenizer_files
from .layers import ModulesToSave
from .settings import LoraSettings, settings_of
from .targets import _tied_pair, has_adapters, hf_path, lora_layers, match_modules_to_save, minift_path, peft_path, saved_modules

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


# ---- save -----------------------------------------------------------------------------------------


def adapter_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """The adapter's tensors under PEFT's saved names (CPU, contiguous), and whether PiSSA
    adapters were converted to rank-2r LoRA over the original base (A' = [A; A0], B' = [B, -B0])."""
    out: dict[str, torch.Tensor] = {}
    converted = False
    for path, layer in lora_layers(model):
        key = PREFIX + peft_path(model, path)
        a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        if hasattr(layer, "pissa_A"):
            a, b = torch.cat([a, layer.pissa_A]), torch.cat([b, -layer.pissa_B], dim=1)
            converted = True
        out[f"{key}.lora_A.weight"] = a
        out[f"{key}.lora_B.weight"] = b
        if layer.dora:
            out[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    for path, wrap in saved_modules(model):
        for name, t in wrap.modules_to_save.state_dict().items():
            out[f"{PREFIX}{peft_path(model, path)}.{name}"] = t.detach()
    # clone: safetensors refuses tensors sharing memory (a tied head's copy is saved twice)
    return {k: v.to("cpu", copy=True).contiguous() for k, v in out.items()}, converted


def adapter_config(model: nn.Module, s: LoraSettings, converted: bool) -> dict[str, Any]:
    r, alpha = s.r, s.alpha
    if converted:  # PEFT's PiSSA → LoRA conversion keeps the scaling with twice the rank
        r, alpha = 2 * r, alpha * (math.sqrt(2) if s.rslora else 2)
    init: Any = "gaussian" if s.init == "gaussian" else True
    alpha_out: float | int = int(alpha) if float(alpha).is_integer() else alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.load_info.name_or_path,
        "r": r,
        "lora_alpha": alpha_out,
        "lora_dropout": s.dropout,
        "use_rslora": s.rslora,
        "use_dora": s.dora,
        "target_modules": s.target_modules,
        "modules_to_save": s.modules_to_save or None,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": init,
        "inference_mode": True,
        "rank_pattern": {k: 2 * v for k, v in s.rank_pattern.items()} if converted else s.rank_pattern,
        "alpha_pattern": s.alpha_pattern,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "revision": None,
        "auto_mapping": None,
    }


def save_adapter(model: nn.Module, save_dir: str | os.PathLike, *, overwrite: bool = False, tokenizer: Any = None) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors (PEFT's format) and the tokenizer /
    processor files (`tokenizer`'s, else copied from the source checkpoint), atomically."""
    from safetensors.torch import save_file

    s = settings_of(model)
    if s is None or not has_adapters(model):
        raise AdapterError("save_adapter: the model has no adapters; call minift.add_lora or minift.load_adapter first")
    tensors, converted = adapter_tensors(model)
    cfg = adapter_config(model, s, converted)
    with atomic_dir(save_dir, overwrite=overwrite, what="adapter") as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        write_tokenizer_files(tmp, tokenizer, model.load_info.source_path)
    return Path(save_dir)


# ---- load -----------------------------------------------------------------------------------------


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json (checked: a LoRA adapter minift can load) and the adapter's tensors."""
    from safetensors.torch import load_file

    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: no such adapter directory")
    cf, wf = adapter_dir / CONFIG, adapter_dir / WEIGHTS
    cfg = read_json_object(cf, AdapterError, what=f"an adapter directory needs {CONFIG}")
    _check_config(cfg, cf)
    if not wf.is_file():
        extra = " (only pickle adapter_model.bin, which minift does not load)" if (adapter_dir / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{wf}: missing{extra}")
    try:
        return cfg, load_file(str(wf))
    except Exception as e:
        raise AdapterError(f"{wf}: not a readable safetensors file: {e}") from e


def _check_config(cfg: dict[str, Any], where: Path) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {cfg.get('peft_type')!r}; minift loads LoRA adapters only")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise AdapterError(f"{where}: trained biases (bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r}) "
                           "are not supported; minift adapters train no biases")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(f"{where}: fan_in_fan_out=True (Conv1D bases) does not apply to these models")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{where}: r must be a positive integer, got {r!r}")


def normalise_key(key: str) -> str:
    """A saved or in-memory PEFT key → '<module path>.<lora_A.weight | lora_B.weight |
    lora_magnitude_vector | param of a modules_to_save copy>'."""
    if key.startswith(PREFIX):
        key = key[len(PREFIX):]
    key = re.sub(r"\.(lora_A|lora_B)\.[^.]+\.weight$", r".\1.weight", key)
    key = re.sub(r"\.lora_magnitude_vector(\.[^.]+)?\.weight$", ".lora_magnitude_vector", key)
    return re.sub(r"\.(modules_to_save\.[^.]+|original_module)\.", ".", key)


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (a key matches the end of the module path)."""
    for k, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({k})$", path):
            return v
    return default


def check_shapes(path: str, parts: dict[str, torch.Tensor], base: nn.Module, dora: bool, where: Path) -> None:
    out_f, in_f = int(base.out_features), int(base.in_features)
    for need in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if dora else ()):
        if need not in parts:
            raise AdapterError(f"{where}: {path} has no {need} tensor")
    a, b = parts["lora_A"], parts["lora_B"]
    ok = a.dim() == 2 and b.dim() == 2 and a.shape[1] == in_f and b.shape[0] == out_f and b.shape[1] == a.shape[0]
    if not ok:
        raise AdapterError(
            f"{where}: adapter for {path} does not fit its base layer: lora_A {tuple(a.shape)} and lora_B "
            f"{tuple(b.shape)} need (r, {in_f}) and ({out_f}, r), as the base weight is ({out_f}, {in_f})"
        )
    m = parts.get("lora_magnitude_vector")
    if m is not None and tuple(m.shape) != (out_f,):
        raise AdapterError(f"{where}: {path}.lora_magnitude_vector has shape {tuple(m.shape)}, but the base weight "
                           f"({out_f}, {in_f}) needs ({out_f},)")


def plan_modules_to_save(model: nn.Module, cfg: dict[str, Any], other: dict[str, torch.Tensor],
                          lora_paths: list[str], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module path → {parameter name: tensor} for the adapter's modules_to_save, all checked."""
    names = list(cfg.get("modules_to_save") or [])
    if not names:
        if other:
            raise AdapterError(f"{where}: holds tensors that are neither LoRA weights nor modules_to_save: "
                               f"{', '.join(sorted(other)[:10])}")
        return {}
    paths = match_modules_to_save(model, names, lora_paths)
    placed: dict[str, dict[str, torch.Tensor]] = {p: {} for p in paths}
    for k, t in other.items():
        mp = minift_path(model, k)
        owner = next((p for p in paths if mp is not None and mp.startswith(p + ".")), None)
        if owner is None:
            raise AdapterError(f"{where}: tensor {k} belongs to no module of modules_to_save {names}")
        placed[owner][mp[len(owner) + 1:]] = t
    tied = _tied_pair(model)
    if tied and placed.get(tied[0]) and not placed.get(tied[1]) or tied and placed.get(tied[1]) and not placed.get(tied[0]):
        # PEFT (without ensure_weight_tying) trained one of a tied pair alone: it unties, as in PEFT
        placed = {p: v for p, v in placed.items() if v or p not in tied}
    for p, got in placed.items():
        if not got:
            raise AdapterError(f"{where}: modules_to_save selects {hf_path(model, p)}, but the adapter holds no tensors for it")
        own = dict(model.get_submodule(p).named_parameters(remove_duplicate=False))
        for name, t in got.items():
            if name not in own or tuple(own[name].shape) != tuple(t.shape):
                want = tuple(own[name].shape) if name in own else "no such parameter"
                raise AdapterError(f"{where}: {hf_path(model, p)}.{name} has shape {tuple(t.shape)}, the model's is {want}")
    return placed


@torch.no_grad()
def fill_modules_to_save(model: nn.Module, placed: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copies the tensors in. A tied head whose two saved copies differ (trained untied, e.g. by
    PEFT without ensure_weight_tying) is untied: each module gets its own matrix."""
    filled: dict[int, torch.Tensor] = {}
    for p, got in placed.items():
        wrap = model.get_submodule(p)
        assert isinstance(wrap, ModulesToSave)
        own = dict(wrap.modules_to_save.named_parameters(remove_duplicate=False))
        for name, t in got.items():
            param = own[name]
            if id(param) in filled and not torch.equal(filled[id(param)], t):
                setattr(wrap.modules_to_save, name, nn.Parameter(t.to(param.device, param.dtype), requires_grad=True))
                continue
            param.copy_(t)
            filled[id(param)] = t
