"""LoRA / rsLoRA / DoRA adapters, minift's own (PEFT is not used at run time).

settings (LoraSettings), layers (LoraLinear, DoraLinear, ModulesToSave, PEFT's inits), targets
(which modules, and their transformers / PEFT names), fused (the fused-kernel MLP), peft (PEFT's
adapter format, read and written), api (add_lora, load_adapter, the switches)."""

from .api import (
    add_lora, disable_adapters, enable_adapters, has_adapters, load_adapter, merge_lora, unmerge_lora,
)
from .fused import set_fused
from .layers import DoraLinear, LoraLinear, ModulesToSave
from .peft import save_adapter
from .settings import LoraSettings
from .targets import hf_path

__all__ = [
    "add_lora", "load_adapter", "save_adapter", "disable_adapters", "enable_adapters", "has_adapters",
    "merge_lora", "unmerge_lora", "set_fused", "LoraLinear", "DoraLinear", "ModulesToSave", "LoraSettings",
    "hf_path",
]
