"""Checkpoints: trainable weights, optimizer, scheduler, RNG states and the data position.

A checkpoint is written into a temporary directory and renamed into place (os.replace), so a
crash mid-save never leaves a half-written checkpoint-N: it is either absent or complete.
Tensors go to safetensors and everything else to JSON; only the optimizer state uses torch.save,
and it is read back with `weights_only=True` (no arbitrary pickle).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, TrainConfigError
from ..lora import has_adapters
from .optim import trainable_parameters

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def before_commit(output_dir: Path, step: int) -> None:
    """Called while checkpoint-`step` is half-written (weights and optimizer state in, trainer
    state not yet): does nothing; the crash tests replace it to kill the process there."""


def has_lora(model: nn.Module) -> bool:
    """Adapters (LoRA layers or modules_to_save) added by minift.add_lora / load_adapter."""
    return has_adapters(model)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as h:
                os.fsync(h.fileno())
    _fsync_dir(path)


def save_trainable(model: nn.Module, path: Path) -> None:
    """Every trainable parameter (tied ones once) as a safetensors file, by parameter name."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().to("cpu").contiguous() for name, p in trainable_parameters(model)}
    save_file(tensors, str(path), metadata={"format": "pt", "source": "minift.train"})


def load_trainable(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    named = dict(trainable_parameters(model))
    missing = sorted(set(named) - set(saved))
    extra = sorted(set(saved) - set(named))
    if missing or extra:
        raise CheckpointError(
            f"{path}: trainable parameters differ from the model's (missing {missing[:5]}, unexpected {extra[:5]}); "
            "was the checkpoint written for the same model and adapters?"
        )
    with torch.no_grad():
        for name, p in named.items():
            t = saved[name]
            if t.shape != p.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
            p.copy_(t.to(p.device, p.dtype))


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for safetensors, JSON-able python/numpy states)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    js = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, js


def set_rng_state(tensors: dict[str, torch.Tensor], js: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    v, st, g = js["python"]
    random.setstate((v, tuple(st), g))
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    tokenizer: Any = None,
    total_limit: int | None = None,
) -> Path:
    """Writes output_dir/checkpoint-{step} atomically and applies save_total_limit."""
    from safetensors.torch import save_file

    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_trainable(model, tmp / "trainable.safetensors")
    if has_lora(model):
        model.save_adapter(tmp / "adapter")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    rng_t, rng_js = rng_state()
    save_file(rng_t, str(tmp / "rng.safetensors"))
    before_commit(output_dir, step)
    full_state = dict(state, step=step, rng=rng_js, saved_at=time.time())
    (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (after a resume): swap the old one out first
        old = output_dir / f".old-checkpoint-{step}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    if total_limit is not None:
        for old_step, path in list_checkpoints(output_dir)[:-total_limit]:
            if old_step != step:
                shutil.rmtree(path, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first."""
    out = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = _CKPT.match(p.name)
            if m and (p / STATE_FILE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def clean_partial(output_dir: Path) -> None:
    """Removes temporary directories a killed save left behind."""
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            if p.name.startswith((".tmp-checkpoint-", ".old-checkpoint-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        (output_dir / ".saving").unlink(missing_ok=True)


def resolve_resume(resume_from: str | os.PathLike, output_dir: Path) -> Path | None:
    """A checkpoint directory, the newest one for "latest" (None when there is none yet)."""
    if str(resume_from) == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    p = Path(resume_from)
    if not (p / STATE_FILE).is_file():
        raise TrainConfigError(
            f"TrainConfig.resume_from={str(resume_from)!r}: not a complete checkpoint directory (no {STATE_FILE})"
        )
    return p


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restores weights, optimizer, scheduler and RNG states; returns the trainer state."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable: {e}") from e
    load_trainable(model, path / "trainable.safetensors")
    # torch optimizers move state to each parameter's device themselves (and keep AdamW's step
    # counters on the CPU unless fused, avoiding a sync per step); bitsandbytes' do not.
    dev = next((p.device for _, p in trainable_parameters(model)), torch.device("cpu"))
    bnb = type(optimizer).__module__.startswith("bitsandbytes")
    opt = torch.load(path / "optimizer.pt", map_location=dev if bnb else "cpu", weights_only=True)
    optimizer.load_state_dict(opt)
    sched = json.loads((path / "scheduler.json").read_text())
    scheduler.load_state_dict(sched)
    set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state
