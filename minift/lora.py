"""`add_lora`: LoRA / rsLoRA / DoRA adapters on minift's models, in place.

The layers are in `minift.lora_layers`, target selection in `minift.lora_targets`, saving and
loading in `minift.adapters` / `minift.merged`. `add_lora` binds a few methods to the model
instance (`disable_adapters`, `enable_adapters`, `merge_lora`, `unmerge_lora`, `save_adapter`,
`save_merged`): bound to this one object rather than patched onto any class, so other models
and libraries are untouched.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import AdapterError
from .lora_layers import LoraLinear, ModulesToSave, init_adapter, is_4bit
from .lora_targets import (
    add_modules_to_save, hf_path, linear_modules, lora_layers, match_modules_to_save, peft_modules_to_save,
    peft_target_modules, select_targets, set_module,
)

__all__ = ["add_lora", "LoraLinear", "LoraSettings", "ModulesToSave", "hf_path"]

INITS = ("default", "gaussian", "pissa")


@dataclass
class LoraSettings:
    """What add_lora / load_adapter set up; save_adapter writes it as adapter_config.json.

    target_modules: as PEFT will read it for the transformers model (module-name suffixes, or
    a regex fullmatched on module paths). modules_to_save: the same, for the full copies.
    rank_pattern / alpha_pattern: PEFT's per-module overrides, kept from a loaded adapter."""

    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "default"
    target_modules: list[str] | str = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


# ---- add_lora ---------------------------------------------------------------------------------------


def check_settings(r: Any, alpha: Any, dropout: Any, init: Any) -> str:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"r: the LoRA rank must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"alpha: must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise AdapterError(f"dropout: must be in [0, 1), got {dropout!r}")
    if init is True:
        init = "default"
    if init not in INITS:
        raise AdapterError(f"init: must be one of {INITS}, got {init!r}")
    return init


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, (LoraLinear, ModulesToSave)) for m in model.modules())


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
) -> nn.Module:
    """Adds LoRA adapters to `model` in place (and returns it); everything else is frozen.

    targets: "all-linear" (every decoder / vision-tower linear, not lm_head or the projector),
    module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, out_proj, fc1,
    fc2), or a regex fullmatched on the module path. vision / language / attention / mlp narrow
    it the way unsloth's get_peft_regex does. scaling = alpha / r (alpha / sqrt(r) with rslora).
    init: "default" (PEFT's Kaiming A, zero B), "gaussian", or "pissa" (16-bit bases; the base
    becomes the SVD residual, and the adapter is saved as plain rank-2r LoRA over the original).
    modules_to_save: modules trained in full (e.g. ["embed_tokens", "lm_head"]), as copies in
    the model's dtype. A tied lm_head / embedding stays tied: naming either trains one shared
    copy (PEFT's ensure_weight_tying=True), saved under both names. seed: a local generator;
    the global RNG is untouched.

    The model gains `disable_adapters()` (also a context manager), `enable_adapters()`,
    `merge_lora()` / `unmerge_lora()` (16-bit bases), `save_adapter(dir)` and
    `save_merged(dir, dtype)`. With PiSSA, disabled adapters leave the residual model.
    """
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
        layer = LoraLinear(cands[p], r, settings.scaling, dropout, dora).train(cands[p].training)
        init_adapter(layer, init, gen)
        set_module(model, p, layer)
    add_modules_to_save(model, wrapped)
    settings.target_modules = peft_target_modules(model, chosen, all_paths)
    settings.modules_to_save = peft_modules_to_save(model, wrapped, all_paths) if wrapped else []
    attach(model, settings)
    return model


# ---- methods bound to the model -------------------------------------------------------------------


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


def attach(model: nn.Module, settings: LoraSettings) -> None:
    """Records the settings and binds the adapter methods to this model instance."""
    from . import adapters, merged

    model.lora_settings = settings
    for fn in (disable_adapters, enable_adapters, merge_lora, unmerge_lora,
               adapters.save_adapter, merged.save_merged):
        object.__setattr__(model, fn.__name__, types.MethodType(fn, model))
