"""Shared pieces of the training tests: tiny checkpoints, small datasets, comparisons."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import minift
from minift.testing import write_tiny_checkpoint

WORDS = "the quick brown fox jumps over lazy dog cat sat on mat sun rises east sets west water boils".split()


@contextlib.contextmanager
def one_thread():
    """Tiny matrices gain nothing from threads, and a busy 2-core machine makes them much slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def single_thread():
    """Autouse in every training test module that imports it."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama checkpoint shared by one test module."""
    return tiny_llama(tmp_path_factory.mktemp("llama") / "m")


def text_rows(n: int, seed: int = 0, min_words: int = 2, max_words: int = 12) -> list[dict]:
    """Plain-text rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(min_words, max_words + 1, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        rows.append({"text": " ".join(WORDS[i] for i in idx) + "."})
    return rows


def chat_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
            {"role": "user", "content": "And times two?"},
            {"role": "assistant", "content": f"{4 * i}."},
        ]})
    return rows


def tiny_llama(path: Path, template: str = "llama3", **overrides) -> Path:
    if not (path / "config.json").is_file():
        write_tiny_checkpoint(path, "llama", template=template, **overrides)
    return path


def load_full(path: Path):
    return minift.load(path, full_finetuning=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def build_model(path: Path, seed: int = 0):
    """The model the loop tests train: LoRA (with dropout, so RNG state matters) once
    minift.add_lora exists, else full fine-tuning."""
    if hasattr(minift, "add_lora"):
        model, tok = minift.load(path)
        torch.manual_seed(seed)
        minift.add_lora(model, r=4, alpha=8, dropout=0.1)
        return model, tok
    return load_full(path)
