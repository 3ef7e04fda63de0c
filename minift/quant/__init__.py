"""Quantisation (bitsandbytes NF4): `Linear4bit` (linear4bit) and the
quantizer `minift.load` drives, for 16-bit checkpoints quantised while loading and pre-quantised
bitsandbytes checkpoints read as stored (bnb)."""

from .bnb import BnbQuantizer, make_quantizer, model_nbytes, quantize_4bit
from .linear4bit import BLOCKSIZE, Linear4bit, bits_per_weight

__all__ = [
    "BnbQuantizer", "make_quantizer", "model_nbytes", "quantize_4bit", "BLOCKSIZE", "Linear4bit",
    "bits_per_weight",
]
