"""Gated activations. (Placeholder dispatch to the reference until the Triton kernels land.)"""
from __future__ import annotations

import torch

from . import reference as ref


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return ref.swiglu(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return ref.geglu(gate, up, approximate)
