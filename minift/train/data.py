"""Packing, collation and the step → examples schedule.

The schedule is a pure function of (seed, epoch, step), so a resumed run sees exactly the data
an uninterrupted one would, and a step's examples never depend on how it is split into
micro-batches.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from .tokenize import IGNORE, Example


@dataclass
class Batch:
    """Model keyword arguments for one micro-batch plus host-side counts (no device sync)."""

    tensors: dict[str, torch.Tensor]
    n_targets: int
    n_tokens: int

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device.type == "cpu":
            return dict(self.tensors)
        pin = device.type == "cuda"
        return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in self.tensors.items()}


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Best-fit-decreasing packing into rows of at most max_length tokens.

    Each row holds whole sequences back to back; position ids restart at 0 for each, and the
    label of each sequence's first token is -100, so after the model's label shift no token is
    trained to predict the first token of the next sequence. Attention is kept within a sequence
    by the model (position restarts, no attention_mask). Rows list their sequences in dataset
    order, which makes the result deterministic."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin id), sorted
    for i in order:
        n = len(examples[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    rows = []
    for members in bins:
        members.sort()
        seqs = [examples[i] for i in members]
        labels = []
        for ex in seqs:
            lab = ex.labels.clone()
            lab[0] = IGNORE
            labels.append(lab)
        rows.append(Example(
            input_ids=torch.cat([ex.input_ids for ex in seqs]),
            labels=torch.cat(labels),
            position_ids=torch.cat([torch.arange(len(ex)) for ex in seqs]),
        ))
    return rows


def collate(examples: list[Example], pad_id: int, *, mask: bool = False) -> Batch:
    """Dynamic padding to the longest example (right padding, attention_mask, -100 labels on
    pads); packed rows (with position_ids) are padded by an extra segment instead, so they stay
    padding-free for attention. No attention_mask is built when nothing needs padding, unless
    `mask` (then an all-ones one: compiled layers then see the same kind of mask on every batch,
    padded or not, instead of compiling a second graph for the first unpadded one)."""
    lengths = [len(ex) for ex in examples]
    longest = max(lengths)
    b = len(examples)
    ids = torch.full((b, longest), pad_id, dtype=torch.long)
    labels = torch.full((b, longest), IGNORE, dtype=torch.long)
    for r, ex in enumerate(examples):
        ids[r, : len(ex)] = ex.input_ids
        labels[r, : len(ex)] = ex.labels
    out: dict[str, torch.Tensor] = {"input_ids": ids, "labels": labels}
    packed = examples[0].position_ids is not None
    if packed:
        pos = torch.zeros((b, longest), dtype=torch.long)
        for r, ex in enumerate(examples):
            pos[r, : len(ex)] = ex.position_ids
            pos[r, len(ex):] = torch.arange(longest - len(ex))
        out["position_ids"] = pos
    elif mask or min(lengths) != longest:
        am = torch.zeros((b, longest), dtype=torch.long)
        for r, n in enumerate(lengths):
            am[r, :n] = 1
        out["attention_mask"] = am
    if any(ex.token_type_ids is not None for ex in examples):
        tt = torch.zeros((b, longest), dtype=torch.long)
        for r, ex in enumerate(examples):
            if ex.token_type_ids is not None:
                tt[r, : len(ex)] = ex.token_type_ids
        out["token_type_ids"] = tt
    pv = [p for p in (ex.pixels() for ex in examples) if p is not None]  # images processed now, per batch
    if pv:
        out["pixel_values"] = torch.cat(pv)
    n_targets = int((labels[:, 1:] != IGNORE).sum())
    return Batch(out, n_targets, sum(lengths))


def bucket_length(n: int, cap: int | None = None) -> int:
    """The padded length of an n-token batch when each shape needs its own CUDA graph: n rounded
    up to a multiple of 2**(floor(log2 n) - 3) (at least 32), i.e. at most 12.5% more tokens and
    8 lengths per doubling; never above max(n, cap) (the longest row the run allows)."""
    step = max(32, 1 << max(0, n.bit_length() - 4))
    out = -(-n // step) * step
    return min(out, max(n, cap)) if cap is not None else out


def pad_batch(tensors: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a collated batch's rows to `length` tokens without changing any real token's
    result: the model is causal, so tokens after a row's last real one are never attended to by
    it (no attention_mask needed for that); their labels are -100, so they add nothing to the loss;
    packed rows' pads form one more segment (positions from 0), as collate pads them; images and
    their token types are untouched."""
    n = tensors["input_ids"].shape[1]
    if length < n:
        raise ValueError(f"pad_batch: length {length} < the batch's {n} tokens")
    if length == n:
        return dict(tensors)
    extra = length - n
    fill = {"input_ids": pad_id, "labels": IGNORE, "attention_mask": 0, "token_type_ids": 0}
    out = {}
    for k, v in tensors.items():
        if k == "pixel_values":
            out[k] = v
        elif k == "position_ids":
            tail = torch.arange(extra, dtype=v.dtype).expand(v.shape[0], extra)
            out[k] = torch.cat([v, tail], dim=1)
        elif k in fill:
            out[k] = torch.nn.functional.pad(v, (0, extra), value=fill[k])
        else:
            raise ValueError(f"pad_batch: no padding rule for {k!r}")
    return out


@dataclass
class Schedule:
    """Which units (examples or packed rows) each optimizer step takes. With `world` > 1 ranks
    (data parallel) a global step takes batch_size x grad_accum x world units: each global
    micro-batch of batch_size x world units is split into `world` slices, this rank's being the
    `rank`-th, so the step sees the same units as one process with batch_size x world."""

    n_units: int
    batch_size: int
    grad_accum: int
    seed: int
    shuffle: bool = True
    world: int = 1
    rank: int = 0

    @property
    def per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_units / self.per_step)

    def total_steps(self, max_steps: int | None, epochs: float) -> int:
        return max_steps if max_steps is not None else max(1, math.ceil(epochs * self.steps_per_epoch))

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_units))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_units, generator=g).tolist()

    def step_all(self, step: int, _cache: dict | None = None) -> list[int]:
        """Every unit of global step `step` (0-based), over all ranks."""
        epoch, k = divmod(step, self.steps_per_epoch)
        cache = _cache if _cache is not None else {}
        if cache.get("epoch") != epoch:
            cache["epoch"], cache["order"] = epoch, self.order(epoch)
        return cache["order"][k * self.per_step: (k + 1) * self.per_step]

    def step_units(self, step: int, _cache: dict | None = None) -> list[list[int]]:
        """This rank's micro-batches (lists of unit indices) of global step `step`; one per global
        micro-batch, so every rank has as many (a slice may be empty on a ragged last step)."""
        units = self.step_all(step, _cache)
        micro = self.batch_size * self.world
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [units[i: i + micro][lo:hi] for i in range(0, len(units), micro)]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch
