"""Choosing the next token: repetition penalty, then (when sampling) temperature, top-k, top-p and
min-p, in that order and with the same definitions as transformers' logits processors, so a
setting means what users know it to mean. Each works on a (batch, vocab) float32 score tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class Sampling:
    """The decoding settings of one generate call (transformers' names and defaults, except
    top_k, which is off unless set)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def check(self) -> None:
        def bad(name: str, want: str) -> None:
            raise InputError(f"generate: {name}={getattr(self, name)!r}; expected {want}")

        if not isinstance(self.do_sample, bool):
            bad("do_sample", "True or False")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            bad("temperature", "a number > 0")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", "a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0: off)")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1):
            bad("min_p", "a number in [0, 1)")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            bad("repetition_penalty", "a number > 0 (1.0: off)")


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores of tokens in `seen` (batch, n) divided by `penalty` where positive, multiplied where
    negative (CTRL's rule, as transformers applies it, prompt included)."""
    picked = scores.gather(1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seen, picked)


def penalize_present(scores: torch.Tensor, present: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """`repetition_penalty` with the seen tokens as a (batch, vocab) mask: the same scores (a token
    seen several times is penalised once either way), from a buffer a decode step updates in place."""
    return torch.where(present, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps the k highest scores (ties with the k-th kept)."""
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, _NEG_INF)


def top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose probability adds up to at least p."""
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - p)
    drop[..., -1:] = False  # always keep the most likely token
    return scores.masked_fill(drop.scatter(1, order, drop), _NEG_INF)


def min_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Drops tokens less likely than p times the most likely one's probability."""
    probs = scores.softmax(dim=-1)
    drop = probs < p * probs.amax(dim=-1, keepdim=True)
    best = scores.argmax(dim=-1, keepdim=True)
    drop = drop.scatter(1, best, False)
    return scores.masked_fill(drop, _NEG_INF)


def process(scores: torch.Tensor, seen: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The scores `next_token` draws from (float32), after every processor `s` turns on."""
    scores = scores.float()
    if s.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seen, s.repetition_penalty)
    if not s.do_sample:
        return scores
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k:
        scores = top_k(scores, s.top_k)
    if s.top_p < 1.0:
        scores = top_p(scores, s.top_p)
    if s.min_p > 0.0:
        scores = min_p(scores, s.min_p)
    return scores


def next_token(scores: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(batch,) next tokens from processed scores: the argmax, or a draw from their softmax."""
    if not s.do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
