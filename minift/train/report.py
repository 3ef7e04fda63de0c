"""Logging, metrics.jsonl (and TensorBoard / Weights & Biases beside it), memory readings, MFU
and the loss plot."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import resource
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import TrainConfigError
from ..quant.linear4bit import BYTE_VIEW, PACKED

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


# ---- parameters and FLOPs ------------------------------------------------------------------


def _packed_4bit(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dtype in (torch.uint8, BYTE_VIEW)
            and hasattr(mod, "in_features") and hasattr(mod, "out_features"))


def count_parameters(model: nn.Module) -> int:
    """Every weight of the model, once (tied weights once), 4-bit weights counted unpacked
    (in_features x out_features, not their packed bytes), LoRA adapters included. (Under FSDP2 a
    4-bit layer's packed weight and block scales are parameters: they are not counted as such.)"""
    packed = [m for m in model.modules() if _packed_4bit(m)]
    skip = {id(getattr(m, k, None)) for m in packed for k in PACKED}
    n = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return n + sum(m.in_features * m.out_features for m in packed)


def flop_parameters(model: nn.Module) -> int:
    """The N of the 6 * N FLOPs-per-token rule: every weight a token's forward multiplies by, i.e.
    count_parameters minus an input embedding that is not tied to the LM head (a lookup, no FLOPs)."""
    n = count_parameters(model)
    head = getattr(model, "lm_head", None)
    hw = getattr(head, "weight", None)
    for name, mod in model.named_modules():
        if name.endswith("embed_tokens") and isinstance(getattr(mod, "weight", None), torch.Tensor):
            if hw is None or mod.weight is not hw:
                n -= mod.weight.numel()
            break
    return n


def mfu(flop_params: int, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: 6 * N * tokens/s over the peak FLOP/s (None without a peak)."""
    if not peak_tflops:
        return None
    return 6.0 * flop_params * tokens_per_s / (peak_tflops * 1e12)


# ---- TensorBoard and Weights & Biases ---------------------------------------------------------

REPORTERS = ("tensorboard", "wandb")
_INSTALL = {"tensorboard": "pip install tensorboard (or minift[tensorboard])",
            "wandb": "pip install wandb (or minift[wandb])"}
# record field -> (section, name) of the scalar it is logged as
_TRAIN_KEYS = {"loss": "loss", "lr": "learning_rate", "grad_norm": "grad_norm", "epoch": "epoch",
               "tokens": "tokens", "tokens_per_s": "tokens_per_s", "mfu": "mfu", "peak_memory_gb": "peak_memory_gb"}
_EVAL_KEYS = {"eval_loss": "loss", "eval_tokens": "tokens"}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve_report_to(report_to: str | Sequence[str]) -> list[str]:
    """TrainConfig.report_to as a list of integrations ("all": those installed), checked to be
    importable; raises TrainConfigError naming the missing package."""
    kinds = [report_to] if isinstance(report_to, str) else list(report_to)
    out: list[str] = []
    for k in kinds:
        if k == "none":
            continue
        if k == "all":
            found = [r for r in REPORTERS if _installed(r)]
            if not found:
                log.info("report_to='all': neither tensorboard nor wandb is installed; metrics go to metrics.jsonl only")
            out += found
            continue
        if k not in REPORTERS:
            raise TrainConfigError(f"TrainConfig.report_to={report_to!r}: {k!r} is not one of none, "
                                   f"{', '.join(REPORTERS)}, all")
        if not _installed(k):
            raise TrainConfigError(f"TrainConfig.report_to={report_to!r} needs the {k} package: {_INSTALL[k]}")
        out.append(k)
    return list(dict.fromkeys(out))


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    keys, section = (_EVAL_KEYS, "eval") if record.get("eval") else (_TRAIN_KEYS, "train")
    out = {}
    for k, name in keys.items():
        v = record.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{section}/{name}"] = float(v)
    return out


class TensorBoardReporter:
    """Scalars under train/* and eval/* through torch.utils.tensorboard, flushed every record (so
    a run that stops keeps what it logged). purge_step: on resume, events from this step on are
    dropped, as metrics.jsonl drops its records past the checkpoint."""

    def __init__(self, log_dir: Path, purge_step: int | None = None, hparams: dict[str, Any] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        if hparams:
            self.writer.add_text("config", "\n".join(f"    {k}: {v!r}" for k, v in hparams.items()), 0)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for tag, v in _scalars(record).items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """The same scalars to Weights & Biases (`wandb.init(dir=output_dir, ...)`; it reads WANDB_MODE,
    WANDB_PROJECT, WANDB_API_KEY itself: WANDB_MODE=offline writes the run under output_dir/wandb
    with no network). A run this reporter did not start (wandb.run already set) is logged to and
    left open."""

    def __init__(self, output_dir: Path, config: dict[str, Any], project: str | None, name: str | None):
        import wandb

        self.wandb = wandb
        self.owned = wandb.run is None
        self.run = wandb.init(project=project, name=name, dir=str(output_dir), config=config) if self.owned else wandb.run
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, record: dict[str, Any]) -> None:
        data = _scalars(record)
        if data:
            self.run.log({**data, "train/global_step": int(record.get("step", 0))})

    def close(self) -> None:
        if self.owned:
            self.run.finish()


def make_reporters(kinds: Sequence[str], *, output_dir: Path, logging_dir: str | None, config: dict[str, Any],
                   resume_step: int | None, project: str | None = None, run_name: str | None = None) -> list[Any]:
    out: list[Any] = []
    for k in kinds:
        if k == "tensorboard":
            d = Path(logging_dir) if logging_dir else Path(output_dir) / "runs"
            out.append(TensorBoardReporter(d, purge_step=resume_step + 1 if resume_step else None, hparams=config))
            log.info("TensorBoard: tensorboard --logdir %s", d)
        elif k == "wandb":
            out.append(WandbReporter(Path(output_dir), config, project, run_name))
    return out


# ---- metrics.jsonl ----------------------------------------------------------------------------


class Metrics:
    """Appends one JSON object per line to output_dir/metrics.jsonl, and hands each record to the
    reporters (TensorBoard, W&B) too."""

    def __init__(self, path: Path, keep_until_step: int | None, reporters: Sequence[Any] = ()):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.reporters = list(reporters)
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
        for r in self.reporters:
            try:
                r.log(record)
            except Exception as e:  # a logging service must not stop training
                log.warning("report_to: %s failed to log step %s: %s", type(r).__name__, record.get("step"), e)

    def close(self) -> None:
        for r in self.reporters:
            try:
                r.close()
            except Exception as e:  # pragma: no cover
                log.warning("report_to: closing %s failed: %s", type(r).__name__, e)
        self.reporters = []


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
