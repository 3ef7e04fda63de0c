"""Shipping a trained model: merged transformers checkpoints (16-bit or bitsandbytes 4-bit),
llama.cpp GGUF files (+ Gemma 3's mmproj) and Ollama Modelfiles."""

from .gguf import save_gguf
from .merged import save_merged
from .ollama import ollama_modelfile

__all__ = ["save_merged", "save_gguf", "ollama_modelfile"]
