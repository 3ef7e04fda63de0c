"""`add_lora` / `load_adapter`: LoRA / rsLoRA / DoRA adapters on minift's models, in place, and
the switches on them (disable / enable, merge / unmerge, fused or plain kernels).

The layers are in `layers`, target selection in `targets`, PEFT's file format in `peft`, merged
checkpoints in `minift.export`. The model classes `minift.load` returns call these from their
methods (`model.save_adapter(...)`, `model.merge_lora()`, ...); nothing is bound onto instances.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError
from . import peft
from .fused import set_fused
from .layers import LoraLinear, ModulesToSave, init_adapter, is_4bit, make_layer
from .settings import LoraSettings, check_settings
from .targets import (
    add_modules_to_save, has_adapters, linear_modules, lora_layers, match_modules_to_save, minift_path, peft_modules_to_save,
    peft_path, peft_target_modules, select_targets, set_module,
)


def add_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: str | list[str] = "all-linear",
    vision: bool = True,
    language: bool = True,
    attention: bool = True,
    mlp: bool = True,
    rslora: bool = False,
    dora: bool = False,
    init: str = "default",
    modules_to_save: list[str] | None = None,
    seed: int = 3407,
    fuse: bool = False,
) -> nn.Module:
    """Adds LoRA adapters to `model` in place (and returns it); everything else is frozen.

    targets: "all-linear" (every decoder / vision-tower linear, not lm_head or the projector),
    module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, out_proj, fc1,
    fc2), or a regex fullmatched on the module path. vision / language / attention / mlp narrow
    it the way unsloth's get_peft_regex does. scaling = alpha / r (alpha / sqrt(r) with rslora).
    init: "default" (PEFT's Kaiming A, zero B), "gaussian", or "pissa" (16-bit bases; the base
    becomes the SVD residual, and the adapter is saved as plain rank-2r LoRA over the original).
    modules_to_save: modules trained in full (e.g. ["embed_tokens", "lm_head"]), as copies in
    the model's dtype; a name selects the modules whose path ends with it as whole components
    (PEFT 0.22's rule: "norm" is model.norm, not q_norm). A tied lm_head / embedding stays tied: naming either trains one shared
    copy (PEFT's ensure_weight_tying=True), saved under both names. seed: a local generator;
    the global RNG is untouched. fuse: run the adapters through the fused custom ops
    (`ops.lora_linear`, `ops.lora_mlp`) instead of plain matmuls; the same function, off by
    default because compiled plain matmuls measured as fast (see `set_fused`).

    Then `model.disable_adapters()` (also a context manager), `enable_adapters()`,
    `merge_lora()` / `unmerge_lora()` (16-bit bases), `save_adapter(dir)` and
    `save_merged(dir, dtype)` apply. With PiSSA, disabled adapters leave the residual model.
    """
    _check_add_lora_args(model, dropout=dropout, targets=targets, modules_to_save=modules_to_save, seed=seed,
                         vision=vision, language=language, attention=attention, mlp=mlp, rslora=rslora, dora=dora,
                         fuse=fuse)
    init = check_settings(r, alpha, dropout, init)
    if has_adapters(model):
        raise AdapterError("model already has adapters; add_lora / load_adapter work on a model without them")
    all_paths = [n for n, _ in model.named_modules() if n]
    chosen = select_targets(model, targets, vision=vision, language=language, attention=attention, mlp=mlp)
    cands = linear_modules(model)
    if init == "pissa":
        bad = [p for p in chosen if is_4bit(cands[p])]
        if bad:
            raise AdapterError(f"init='pissa' needs 16-bit bases ({bad[0]} is 4-bit): PiSSA rewrites the base "
                               "weight; load the model in 16-bit, or use init='default'")
        if dora:
            raise AdapterError("init='pissa' with dora=True is not supported: the adapter could not be saved as "
                               "plain LoRA over the original base")
    wrapped = match_modules_to_save(model, list(modules_to_save or []), chosen)
    settings = LoraSettings(r=r, alpha=float(alpha), dropout=float(dropout), rslora=rslora, dora=dora, init=init)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed))
    for p in chosen:
        layer = make_layer(cands[p], r, settings.scaling, dropout, dora=dora)
        init_adapter(layer, init, gen)
        set_module(model, p, layer)
    add_modules_to_save(model, wrapped)
    settings.target_modules = peft_target_modules(model, chosen, all_paths)
    settings.modules_to_save = peft_modules_to_save(model, wrapped, all_paths) if wrapped else []
    model.lora_settings = settings
    if fuse:
        set_fused(model, True)
    return model


def _check_add_lora_args(model: Any, *, dropout: Any, targets: Any, modules_to_save: Any, seed: Any,
                         **flags: Any) -> None:
    """add_lora's arguments that check_settings (r, alpha, dropout range, init) does not cover."""
    peft.check_model(model, "add_lora")
    for name, v in flags.items():
        peft.check_flag(v, name, "add_lora")
    if isinstance(dropout, bool):
        raise AdapterError(f"dropout: must be a number in [0, 1), got {dropout!r}")
    if not isinstance(targets, str) and not (isinstance(targets, (list, tuple, set)) and targets
                                             and all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"targets: expected 'all-linear', a list of module names or a regex string, got {targets!r}")
    if modules_to_save is not None and (isinstance(modules_to_save, str) or not isinstance(modules_to_save, (list, tuple))
                                        or not all(isinstance(n, str) for n in modules_to_save)):
        raise AdapterError(f"modules_to_save: expected None or a list of module names, got {modules_to_save!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise AdapterError(f"seed: expected a non-negative integer, got {seed!r}")


# ---- switches ---------------------------------------------------------------------------------------


class _AdaptersOff:
    """Returned by `model.disable_adapters()`: adapters are already off; leaving a `with`
    block turns them back on."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc: Any) -> None:
        enable_adapters(self.model)


def _set_disabled(model: nn.Module, off: bool) -> None:
    for m in model.modules():
        if isinstance(m, (LoraLinear, ModulesToSave)):
            m.disabled = off


def disable_adapters(model: nn.Module) -> _AdaptersOff:
    """The base model's outputs (merged layers are unmerged first); usable as a context manager."""
    unmerge_lora(model)
    _set_disabled(model, True)
    return _AdaptersOff(model)


def enable_adapters(model: nn.Module) -> None:
    _set_disabled(model, False)


def merge_lora(model: nn.Module) -> None:
    """Folds every adapter into its 16-bit base (in float32, cast once); the forward then skips them."""
    layers = list(lora_layers(model))
    bad = [n for n, m in layers if is_4bit(m.base_layer)]
    if bad:
        raise AdapterError(f"merge_lora: {bad[0]} has a 4-bit base that cannot hold merged weights; "
                           "use save_merged(dir) to write a merged checkpoint instead")
    for _, m in layers:
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.unmerge()


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *, fuse: bool = False,
                 strict: bool = True) -> nn.Module:
    """Adds the LoRA layers a minift or PEFT adapter describes and loads its weights; returns the
    model (changed in place, all base weights frozen). Module paths may use transformers 5's
    names or the original Hub layout's. `fuse` as in add_lora.

    adapter_config.json is checked against the tensors before the model changes (AdapterError
    naming the file and module): shapes against the base layers, floating dtypes, each module's
    rank against r / rank_pattern, DoRA magnitudes against use_dora, and the modules that
    target_modules (with layers_to_transform, exclude_modules) selects in this model against the
    modules the tensors adapt. With `strict=False` a selection mismatch (an adapter covering only
    some of the selected layers, e.g. trained on a shallower model) loads what it has, with a
    warning."""
    peft.check_model(model, "load_adapter")
    adapter_dir = peft.check_dir_arg(adapter_dir, "adapter_dir", "load_adapter")
    peft.check_flag(fuse, "fuse", "load_adapter")
    peft.check_flag(strict, "strict", "load_adapter")
    cfg, tensors = peft.read_adapter(adapter_dir)
    if has_adapters(model):
        raise AdapterError("load_adapter: the model already has adapters; load into a freshly loaded model")
    all_paths = [n for n, _ in model.named_modules() if n]
    lin = linear_modules(model)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        k = peft.normalise_key(key)
        for part in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"):
            if k.endswith(part):
                path = minift_path(model, k[: -len(part)])
                if path not in lin:
                    unknown.append(k[: -len(part)])
                else:
                    lora.setdefault(path, {})[part.split(".")[1]] = t
                break
        else:
            other[k] = t
    if unknown:
        names = sorted(set(unknown))
        raise AdapterError(f"{adapter_dir}: adapter targets modules this model has no linear layer for: "
                           f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    dora = bool(cfg.get("use_dora"))
    rslora = bool(cfg.get("use_rslora"))
    for path, parts in lora.items():
        peft.check_shapes(path, parts, lin[path], dora, adapter_dir)
    matched = peft.check_against_tensors(model, cfg, lora, lin, adapter_dir, strict=strict)
    mts = peft.plan_modules_to_save(model, cfg, other, list(lora), adapter_dir)
    # everything checked: now change the model
    for p in model.parameters():
        p.requires_grad_(False)
    alpha = cfg.get("lora_alpha", cfg["r"])
    for path, parts in lora.items():
        r = parts["lora_A"].shape[0]
        a = peft.pattern_value(cfg.get("alpha_pattern"), peft_path(model, path), alpha)
        layer = make_layer(lin[path], r, a / (math.sqrt(r) if rslora else r), float(cfg.get("lora_dropout") or 0.0),
                           dora=dora)
        with torch.no_grad():
            layer.lora_A.weight.copy_(parts["lora_A"])
            layer.lora_B.weight.copy_(parts["lora_B"])
            if dora:
                layer.lora_magnitude_vector.copy_(parts["lora_magnitude_vector"])
        set_module(model, path, layer)
    add_modules_to_save(model, list(mts))
    peft.fill_modules_to_save(model, mts)
    # the config's own target_modules when they describe exactly these modules, else what was loaded
    targets = cfg.get("target_modules") if matched else (peft_target_modules(model, list(lora), all_paths) if lora else [])
    settings = LoraSettings(
        r=cfg["r"], alpha=float(alpha), dropout=float(cfg.get("lora_dropout") or 0.0), rslora=rslora, dora=dora,
        init="default", target_modules=sorted(targets) if isinstance(targets, (list, set)) else targets,
        modules_to_save=peft_modules_to_save(model, list(mts), all_paths) if mts else [],
        rank_pattern=dict(cfg.get("rank_pattern") or {}), alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
    )
    model.lora_settings = settings
    if fuse:
        set_fused(model, True)
    return model
