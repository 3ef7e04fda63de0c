"""Tiny random-weight checkpoints and tokenizers, built offline (transformers writes them), for
the tests, where transformers on the same checkpoint is the numerical reference, and the demo,
since nothing may be downloaded. Not used by minift's own modelling."""

from .tiny import tiny_hf_model, tiny_tokenizer, write_tiny_checkpoint
from .tiny_vision import tiny_gemma3_processor, write_tiny_gemma3_vision

__all__ = ["tiny_hf_model", "tiny_tokenizer", "write_tiny_checkpoint", "tiny_gemma3_processor",
           "write_tiny_gemma3_vision"]
