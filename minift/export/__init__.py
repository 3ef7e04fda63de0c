"""Shipping a trained model: merged transformers checkpoints (16-bit or bitsandbytes 4-bit),
llama.cpp GGUF files (+ Gemma 3's mmproj), Ollama Modelfiles, and uploads of any of them (or
the adapter) to the Hugging Face Hub."""

from .gguf import save_gguf
from .hub import push_folder, push_to_hub
from .merged import save_merged
from .ollama import ollama_modelfile

__all__ = ["save_merged", "save_gguf", "ollama_modelfile", "push_to_hub", "push_folder"]
