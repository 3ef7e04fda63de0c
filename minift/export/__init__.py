"""Shipping a trained model: merged transformers checkpoints (16-bit or bitsandbytes 4-bit)."""

from .merged import save_merged

__all__ = ["save_merged"]
