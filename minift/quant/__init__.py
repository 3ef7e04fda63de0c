"""Quantisation (bitsandbytes NF4): `Linear4bit` / `FrozenNF4Linear` (linear4bit) and the
quantizer `minift.load` drives, for 16-bit checkpoints quantised while loading and pre-quantised
bitsandbytes checkpoints read as stored (bnb)."""

from .bnb import BnbQuantizer, make_quantizer, model_nbytes, quantize_4bit
from .linear4bit import BLOCKSIZE, FrozenNF4Linear, Linear4bit, bits_per_weight, group_siblings

__all__ = [
    "BnbQuantizer", "make_quantizer", "model_nbytes", "quantize_4bit", "BLOCKSIZE", "FrozenNF4Linear", "Linear4bit",
    "bits_per_weight", "group_siblings",
]
