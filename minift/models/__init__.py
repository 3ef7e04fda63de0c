"""What users hold: `minift.load` (hub or directory → model and tokenizer / processor) and the
model classes it builds, minift.arch's decoders with the methods of `ModelAPI`."""

from .classes import CausalLM, Gemma3VisionLM, ModelAPI, build_model
from .loader import load

__all__ = ["load", "CausalLM", "Gemma3VisionLM", "ModelAPI", "build_model"]
