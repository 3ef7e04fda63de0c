"""minift: fast, memory-lean fine-tuning of Llama, Mistral and Gemma (1/2/3, vision) in pure PyTorch."""

from . import errors, ops
from .errors import MiniftError
from .loading import load
from .lora import add_lora
from .adapters import load_adapter
from . import train

__version__ = "0.1.0"

__all__ = ["load", "add_lora", "load_adapter", "ops", "errors", "MiniftError", "__version__"]
