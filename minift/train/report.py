"""Logging, metrics.jsonl, memory readings and the loss plot."""

from __future__ import annotations

import json
import logging
import math
import resource
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("minift.train")


class _TqdmHandler(logging.Handler):
    """Writes log lines through tqdm so they do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record))
        except Exception:  # pragma: no cover
            self.handleError(record)


def ensure_logging() -> None:
    """Shows minift's INFO lines when the application configured no logging at all."""
    root, pkg = logging.getLogger(), logging.getLogger("minift")
    if not root.handlers and not pkg.handlers:
        h = _TqdmHandler()
        h.setFormatter(logging.Formatter("[minift] %(message)s"))
        pkg.addHandler(h)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU (host-side reads)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN / inf
    return v


class Metrics:
    """Appends one JSON object per line to output_dir/metrics.jsonl."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if keep_until_step is not None and path.is_file():  # resuming: drop records past the checkpoint
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if r.get("step", 0) <= keep_until_step:
                    self.records.append(r)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(records: list[dict[str, Any]], path: Path) -> Path | None:
    """loss.png (train, and eval when present) if matplotlib is importable; else logs a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: skipped the loss plot (pip install matplotlib)")
        return None
    train = [(r["step"], r["loss"]) for r in records if not r.get("eval") and r.get("loss") is not None]
    ev = [(r["step"], r["eval_loss"]) for r in records if r.get("eval") and r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    log.info("loss plot: %s", path)
    return path
