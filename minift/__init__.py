"""minift: fast, memory-lean fine-tuning of Llama, Mistral and Gemma (1/2/3, vision) in pure PyTorch.

The pipeline, one package a stage (imports only go down this list):
  io      hub ids, local directories, safetensors, HF names ↔ minift names, atomic writes
  templates  chat templates by name (rendering, end-of-turn tokens, Ollama's form)
  ops     Triton kernels with custom autograd beside their plain-PyTorch references
  arch    the one config-driven decoder, attention, RoPE, the Gemma 3 vision tower
  quant   bitsandbytes NF4: Linear4bit and the quantising loader
  lora    LoRA / DoRA layers, target selection, PEFT's adapter format
  export  merged checkpoints, GGUF, Ollama Modelfiles, hub uploads
  infer   generation (KV cache, sampling, chat)
  models  `load` and the model classes it returns (arch + the user-facing methods)
  train   the training loop
"""

from . import errors, ops
from .errors import MiniftError
from .export import ollama_modelfile, push_folder, push_to_hub, save_gguf, save_merged
from .infer import chat, generate
from .lora import add_lora, load_adapter, save_adapter
from .models import load
from .templates import chat_templates, get_chat_template
from . import train

__version__ = "0.1.0"

__all__ = [
    "load", "add_lora", "load_adapter", "save_adapter", "save_merged", "save_gguf", "ollama_modelfile", "push_to_hub",
    "push_folder", "generate", "chat", "get_chat_template",
    "chat_templates", "ops", "errors", "train", "MiniftError",
    "__version__",
]
