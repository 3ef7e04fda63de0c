"""Rotary position embedding. (Placeholder dispatch to the reference until the Triton kernel lands.)"""
from __future__ import annotations

import torch

from . import reference as ref


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ref.rope(q, k, cos, sin)
