"""Cross-entropy losses. (Placeholder dispatch to the reference until the Triton kernels land.)"""
from __future__ import annotations

import torch

from . import reference as ref


def cross_entropy(logits, labels, *, ignore_index=-100, softcap=None, reduction="mean") -> torch.Tensor:
    return ref.cross_entropy(logits, labels, ignore_index=ignore_index, softcap=softcap, reduction=reduction)


def linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, softcap=None, reduction="mean") -> torch.Tensor:
    return ref.linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, softcap=softcap, reduction=reduction)
