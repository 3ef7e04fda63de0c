"""The small chat dataset shipped with minift (the demo's data): 150 questions and answers about
the made-up creatures of Zorbia, short enough for a tiny model to learn in a few CPU minutes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLE_PATH = Path(__file__).with_name("sample.jsonl")


def load_sample(as_dataset: bool = False) -> Any:
    """The sample rows ({'messages': [user, assistant]}) as a list of dicts, or a datasets.Dataset."""
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines() if line.strip()]
    if as_dataset:
        from datasets import Dataset

        return Dataset.from_list(rows)
    return rows
