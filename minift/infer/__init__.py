"""Trying a model: generation with a static KV cache (generation), the next-token rules
(sampling), and text-level `generate` / `chat` through a tokenizer or processor (text)."""

from .text import TextStreamer, chat, generate
from .generation import generate as generate_ids
from .sampling import Sampling

__all__ = ["chat", "generate", "generate_ids", "Sampling", "TextStreamer"]
