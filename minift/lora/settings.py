"""What add_lora / load_adapter set up (written as adapter_config.json by `minift.lora.peft`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import AdapterError

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


def settings_of(model: nn.Module) -> LoraSettings | None:
    """The settings add_lora / load_adapter recorded on `model` (None: it has no adapters)."""
    return getattr(model, "lora_settings", None)
