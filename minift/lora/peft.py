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
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError
from ..io.files import atomic_dir, parse_size, read_json_object, write_tokenizer_files
from ..io.hub import base_name, is_hub_id
from .layers import ModulesToSave
from .settings import LoraSettings, settings_of
from .targets import (
    _tied_pair, has_adapters, hf_path, lora_layers, match_modules_to_save, minift_path, peft_path, saved_modules,
    suffix_match,
)

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


# ---- argument checks --------------------------------------------------------------------------------


def check_model(model: Any, who: str) -> None:
    """AdapterError naming `model` unless it is a model `minift.load` returned."""
    if not isinstance(model, nn.Module) or not hasattr(model, "load_info") or not hasattr(model, "config"):
        raise AdapterError(f"{who}: model: expected a model returned by minift.load, got {type(model).__name__}")


def check_dir_arg(value: Any, name: str, who: str) -> Path:
    """A directory argument as a Path; AdapterError naming it for anything but a non-empty str / os.PathLike."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise AdapterError(f"{who}: {name}: expected a directory path (str or os.PathLike), got {value!r}")
    return Path(value).expanduser()


def check_flag(value: Any, name: str, who: str) -> None:
    if not isinstance(value, bool):
        raise AdapterError(f"{who}: {name}: expected True or False, got {value!r}")


_NO_DTYPE = object()


def check_save_args(model: Any, save_dir: Any, overwrite: Any, tokenizer: Any, who: str, *, dtype: Any = _NO_DTYPE,
                    max_shard_size: Any = "5GB") -> None:
    """What save_adapter / save_merged check before writing anything (save_merged: also `dtype`, a
    floating torch dtype or its name, or "4bit"; and `max_shard_size`)."""
    check_model(model, who)
    check_dir_arg(save_dir, "save_dir", who)
    check_flag(overwrite, "overwrite", who)
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise AdapterError(f"{who}: tokenizer: expected None or a tokenizer / processor with save_pretrained, "
                           f"got {type(tokenizer).__name__}")
    if dtype is not _NO_DTYPE:
        d = dtype
        if isinstance(d, str) and d.lower() not in ("4bit", "nf4"):
            d = getattr(torch, d.replace("torch.", ""), None)
        if not (isinstance(dtype, str) and dtype.lower() in ("4bit", "nf4")) and not (
                isinstance(d, torch.dtype) and d.is_floating_point):
            raise AdapterError(f"{who}: dtype must be a floating torch dtype (torch.bfloat16, torch.float16, "
                               f"torch.float32) or its name, or '4bit', got {dtype!r}")
        parse_size(max_shard_size)


def base_model_name(model: nn.Module) -> str | None:
    """The base as an adapter records it: the hub id, or the absolute directory of a local base
    (a relative one would send PEFT to the hub when run from another directory)."""
    info = model.load_info
    name = info.name_or_path
    if name is None:
        return None
    src = info.source_path
    local = src is not None and os.path.abspath(os.path.expanduser(str(name))) == os.path.abspath(src)
    return str(name) if is_hub_id(str(name)) and not local else base_name(name)


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
        "base_model_name_or_path": base_model_name(model),
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

    check_save_args(model, save_dir, overwrite, tokenizer, "save_adapter")
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

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    alpha = cfg.get("lora_alpha", r)
    if not number(alpha) or alpha <= 0:
        raise AdapterError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    drop = cfg.get("lora_dropout") or 0.0
    if not number(drop) or not 0.0 <= drop < 1.0:
        raise AdapterError(f"{where}: lora_dropout must be a number in [0, 1), got {cfg.get('lora_dropout')!r}")
    for key in ("use_rslora", "use_dora"):
        if cfg.get(key) is not None and not isinstance(cfg.get(key), bool):
            raise AdapterError(f"{where}: {key} must be true or false, got {cfg.get(key)!r}")
    for key, ok, want in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                           "positive integers"),
                          ("alpha_pattern", lambda v: number(v) and v > 0, "positive numbers")):
        pat = cfg.get(key)
        if pat is None:
            continue
        if not isinstance(pat, dict) or not all(isinstance(k, str) and ok(v) for k, v in pat.items()):
            raise AdapterError(f"{where}: {key} must map module names to {want}, got {pat!r}")
    for key in ("target_modules", "exclude_modules"):
        t = cfg.get(key)
        if t is not None and not isinstance(t, str) and not (isinstance(t, list) and all(isinstance(x, str) for x in t)):
            raise AdapterError(f"{where}: {key} must be a list of module names or a regex string, got {t!r}")
    for key in ("target_modules", "exclude_modules"):
        if isinstance(cfg.get(key), str) and cfg[key] != "all-linear":
            try:
                re.compile(cfg[key])
            except re.error as e:
                raise AdapterError(f"{where}: {key} {cfg[key]!r} is not a valid regular expression: {e}") from e
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool)) and not (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        raise AdapterError(f"{where}: layers_to_transform must be null, a layer index or a list of them, got {layers!r}")


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


def _names(model: nn.Module, path: str) -> list[str]:
    """Every name a config may use for a module: minift's path, transformers 5's, PEFT's view of
    it, and the original Hub layout of a Gemma 3 vision checkpoint."""
    out = [path, hf_path(model, path), peft_path(model, path)]
    for n in list(out):
        for new, old in (("model.language_model.", "language_model.model."),
                         ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                         ("model.vision_tower.", "vision_tower.vision_model."),
                         ("model.multi_modal_projector.", "multi_modal_projector.")):
            if n.startswith(new):
                out.append(old + n[len(new):])
                break
    return list(dict.fromkeys(out))


def _matches(spec: Any, names: list[str]) -> bool:
    """PEFT's rule: a string is a regex fullmatched on the module name, a list holds names equal
    to it or ending it after a '.'; "all-linear" selects every linear layer."""
    if spec == "all-linear":
        return True
    if isinstance(spec, str):
        return any(re.fullmatch(spec, n) for n in names)
    return any(suffix_match(n, t) for n in names for t in spec)


def _layer_index(names: list[str], pattern: Any) -> int | None:
    pats = [pattern] if isinstance(pattern, str) else list(pattern or ["layers", "h", "blocks", "layer"])
    for n in names:
        for p in pats:
            m = re.search(rf"(?:^|\.){p}\.(\d+)(?:\.|$)", n)
            if m:
                return int(m.group(1))
    return None


def config_selects(model: nn.Module, cfg: dict[str, Any], path: str) -> bool | None:
    """Whether adapter_config.json's target_modules (with layers_to_transform / layers_pattern and
    exclude_modules) selects the linear at `path`, as PEFT decides; None when there is no
    target_modules to go by."""
    spec = cfg.get("target_modules")
    if spec is None:
        return None
    names = _names(model, path)
    if not _matches(spec, names):
        return False
    excl = cfg.get("exclude_modules")
    if excl and excl != "all-linear" and _matches(excl, names):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else list(layers)
        idx = _layer_index(names, cfg.get("layers_pattern"))
        if idx is None or idx not in layers:
            return False
    return True


def _listed(paths: list[str], model: nn.Module) -> str:
    names = sorted(peft_path(model, p) for p in paths)
    return ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")


def check_against_tensors(model: nn.Module, cfg: dict[str, Any], lora: dict[str, dict[str, torch.Tensor]],
                          linears: dict[str, nn.Module], where: Path, *, strict: bool) -> bool:
    """adapter_config.json against the adapter's tensors, before anything changes: tensor dtypes,
    ranks (r / rank_pattern), DoRA magnitudes, and the modules target_modules selects against the
    modules the tensors adapt (every selected linear of this model covered, no tensors outside the
    selection). The first three always raise AdapterError; a selection mismatch raises with
    `strict`, else warns (a partial adapter loads what it has). Returns whether the selection matched."""
    dora = bool(cfg.get("use_dora"))
    for path, parts in lora.items():
        for part, t in parts.items():
            if not t.is_floating_point():
                raise AdapterError(f"{where}: {peft_path(model, path)}.{part} has dtype {t.dtype}; adapter weights "
                                   "must be floating point (float32, bfloat16 or float16)")
        if "lora_magnitude_vector" in parts and not dora:
            raise AdapterError(f"{where}: holds DoRA magnitudes ({peft_path(model, path)}.lora_magnitude_vector) but "
                               f"{CONFIG} says use_dora=false; PEFT would not load them either")
        a = parts.get("lora_A")
        if a is not None and a.dim() == 2:
            want = pattern_value(cfg.get("rank_pattern"), peft_path(model, path), cfg["r"])
            if a.shape[0] != want:
                src = "rank_pattern" if want != cfg["r"] else f"r={cfg['r']}"
                raise AdapterError(
                    f"{where}: {CONFIG} gives {peft_path(model, path)} rank {want} ({src}), but its lora_A tensor has "
                    f"rank {a.shape[0]}; the scaling lora_alpha / r would be wrong (PEFT refuses this adapter too)"
                )
    selected = {p: config_selects(model, cfg, p) for p in linears}
    if cfg.get("target_modules") is None:
        return False
    problems = []
    outside = [p for p in lora if not selected.get(p)]
    if outside:
        problems.append(f"it holds weights for {len(outside)} module(s) that target_modules "
                        f"{cfg['target_modules']!r} does not select ({_listed(outside, model)}), which PEFT leaves out")
    uncovered = [p for p, sel in selected.items() if sel and p not in lora]
    if uncovered:
        problems.append(f"target_modules {cfg['target_modules']!r} selects {len(uncovered)} module(s) of this model "
                        f"that it holds no weights for ({_listed(uncovered, model)}): an adapter trained on a model "
                        "with fewer layers, or with other targets?")
    if not problems:
        return True
    msg = f"{where}: the adapter does not match this model as its {CONFIG} describes: " + "; and ".join(problems)
    if strict:
        raise AdapterError(msg + "; pass strict=False to load it anyway (modules without weights stay unadapted)")
    warnings.warn(msg + "; loading it anyway (strict=False): modules without weights stay unadapted", stacklevel=3)
    return False


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
