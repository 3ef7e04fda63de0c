"""Typed errors. Every message names the file, tensor or field at fault and what was expected."""

from __future__ import annotations


class MiniftError(Exception):
    """Base class of every error minift raises on purpose."""


class ConfigError(MiniftError, ValueError):
    """config.json is missing, unreadable, or holds a field minift cannot use."""


class UnsupportedModelError(ConfigError):
    """The checkpoint's model_type is not one minift implements."""


class CheckpointError(MiniftError, ValueError):
    """A weights file is missing, truncated, corrupted, or holds missing/unexpected tensors."""


class ShapeMismatchError(CheckpointError):
    """A checkpoint tensor's shape differs from what the config implies."""


class HubError(MiniftError, OSError):
    """A hub id could not be resolved (not cached while offline, no access, no such repo), or an
    upload could not happen (no token, HF_HUB_OFFLINE=1, the hub refused it): the message names
    the staged folder, which is kept for a retry."""


class QuantizationError(MiniftError, ValueError):
    """4-bit loading is impossible here or a quant-state entry is missing or malformed."""


class InputError(MiniftError, ValueError):
    """Bad arguments to a public function, a model or an op: an argument of the wrong type or out
    of range (the message names it and what was expected), shapes, dtypes, label ranges, images vs
    image tokens."""


class AdapterError(MiniftError, ValueError):
    """LoRA targets, adapter files or adapter shapes are wrong."""


class DataError(MiniftError, ValueError):
    """A training dataset cannot be turned into labelled examples."""


class TrainConfigError(MiniftError, ValueError):
    """A TrainConfig field is out of range or the output directory is unusable."""


class ExportError(MiniftError, ValueError):
    """A model or tokenizer cannot be written in the requested export format (GGUF, Ollama
    Modelfile), or the output already exists."""


class WriteError(MiniftError, OSError):
    """An output directory could not be written (disk full, no permission, ...): the write was
    abandoned, its temporary files removed, and what was at the destination before is unchanged."""


class NonFiniteLossError(MiniftError, FloatingPointError):
    """The training loss became NaN or inf; training stopped (the last checkpoint is kept)."""
