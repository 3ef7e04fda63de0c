"""What the cross-entropy ops and their chunked reference share: input checks, the token-chunk
size, chunking and the reduction (a module of its own so reference.py needs nothing from the
kernels' module, which imports reference.py)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError

REDUCTIONS = ("mean", "sum", "none")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# Budget for one token chunk of logits in linear_cross_entropy, in the model dtype (the grad_weight
# pass uses vocabulary slabs of the same size). 256 MiB keeps each GEMM large enough to run at speed.
CHUNK_BYTES = 256 << 20


def _check_labels(labels: Tensor, n: int, device: torch.device) -> Tensor:
    if labels.shape != (n,):
        raise InputError(f"labels must have shape ({n},) to match the {n} rows, got {tuple(labels.shape)}")
    if labels.dtype not in _INT_DTYPES:
        raise InputError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.device != device:
        raise InputError(f"labels are on {labels.device} but the inputs are on {device}")
    return labels.long().contiguous()


def _check_options(softcap: float | None, reduction: str) -> float:
    """The softcap as the custom ops take it: 0.0 means off."""
    if reduction not in REDUCTIONS:
        raise InputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap is None:
        return 0.0
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap > 0):
        raise InputError(f"softcap must be None or a finite number > 0, got {softcap}")
    return softcap


def _reduce(rows: Tensor, labels: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Reduce fp32 per-row losses; 'mean' over non-ignored rows, 0 (not NaN) when there are none."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


def default_chunk_size(n: int, v: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so that one chunk of logits in `dtype` fits CHUNK_BYTES (GEMM-friendly sizes)."""
    rows = max(1, CHUNK_BYTES // (v * dtype.itemsize))
    rows = rows // 128 * 128 if rows >= 128 else 1 << (rows.bit_length() - 1)
    return max(1, min(rows, n))


def _chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield s, min(s + chunk, n)


def _check_linear(hidden: Tensor, weight: Tensor, labels: Tensor, softcap: float | None, reduction: str,
                  chunk_size: int | None) -> tuple[Tensor, float, int]:
    if hidden.dim() != 2:
        raise InputError(f"hidden must be 2-D (N, H) (flatten batch and sequence), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise InputError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise InputError(f"hidden's last dim {hidden.shape[1]} != weight's last dim {weight.shape[1]} (weight is (V, H))")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise InputError(f"hidden and weight must share one float dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device:
        raise InputError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if weight.shape[0] == 0:
        raise InputError("weight must have at least one row (V >= 1)")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    cap = _check_options(softcap, reduction)
    labels = _check_labels(labels, hidden.shape[0], hidden.device)
    n, v = hidden.shape[0], weight.shape[0]
    return labels, cap, chunk_size or default_chunk_size(n, v, hidden.dtype)
