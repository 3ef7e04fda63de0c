"""Checkpoints: trainable weights, optimizer, scheduler, RNG states and the data position; and
the final save of a full fine-tune (`save_full`).

Both are written through minift's atomic directory writer (`minift.io.files.atomic_dir`): into a
temporary directory beside the destination that records the writer's pid, fsynced, then renamed
into place, so a crash mid-save never leaves a half-written checkpoint-N: it is either absent or
complete, and the next save (or `clean_partial`) removes what a killed writer left. Old
checkpoints past save_total_limit are renamed away before they are deleted.
Tensors go to safetensors and everything else to JSON; only the optimizer state uses torch.save,
and it is read back with `weights_only=True` (no arbitrary pickle).

An FSDP2 full fine-tune (`distributed.shards_checkpoints`) writes its trainable parameters and
optimizer state as shards instead: every rank writes its own file into `sharded/` (through
torch.distributed.checkpoint, see distributed.py) inside the one temporary directory that rank 0's
atomic writer made, whose path rank 0 shares with them; after the collective save rank 0 writes
the rest (optimizer.json: the param groups; scheduler, RNG, trainer state) and renames it into
place, so checkpoint-N is still complete or absent. It resumes on any world size, one process
included. DCP's index, `sharded/.metadata`, is a pickle that torch writes and reads itself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, TrainConfigError
from ..io.files import atomic_dir, pid_alive, remove_dir, remove_stale, write_tokenizer_files
from ..lora import has_adapters
from ..lora.targets import hf_path
from . import distributed
from .optim import trainable_parameters

logger = logging.getLogger("minift.train")

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
SHARDED_OPTIMIZER = "optimizer.json"  # beside sharded/: the param groups (the shards hold tensors only)
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def before_commit(output_dir: Path, step: int) -> None:
    """Called while checkpoint-`step` is half-written (weights and optimizer state in, trainer
    state not yet): does nothing; the crash tests replace it to kill the process there."""


def has_lora(model: nn.Module) -> bool:
    """Adapters (LoRA layers or modules_to_save) added by minift.add_lora / load_adapter."""
    return has_adapters(model)


def save_trainable(model: nn.Module, path: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Every trainable parameter (tied ones once) as a safetensors file, by parameter name
    (`tensors`: those already gathered whole, under FSDP)."""
    from safetensors.torch import save_file

    if tensors is None:
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in trainable_parameters(model)}
    else:
        tensors = {name: tensors[name].detach().to("cpu").contiguous() for name, _ in trainable_parameters(model)}
    save_file(tensors, str(path), metadata={"format": "pt", "source": "minift.train"})


@contextlib.contextmanager
def parameters_replaced(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """For the block, each trainable parameter named in `tensors` is that tensor on every module
    holding it (tied ones too); then the model's own parameters (FSDP2's shards) are back. Lets
    rank 0 save an adapter from gathered tensors with the one-process code, no forward run."""
    named = dict(trainable_parameters(model))
    by_id = {id(named[n]): nn.Parameter(t, requires_grad=True) for n, t in tensors.items() if n in named}
    swapped = []
    try:
        for mod in model.modules():
            for attr, p in list(mod._parameters.items()):
                if p is not None and id(p) in by_id:
                    swapped.append((mod, attr, p))
                    mod._parameters[attr] = by_id[id(p)]
        yield
    finally:
        for mod, attr, p in reversed(swapped):
            mod._parameters[attr] = p


def read_trainable(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """trainable.safetensors, checked against the model's trainable parameters (names, shapes)."""
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
    for name, p in named.items():
        t = saved[name]
        if t.shape != p.shape:  # (an FSDP2 shard's shape is the whole parameter's)
            raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
    return saved


def load_trainable(model: nn.Module, path: Path) -> None:
    saved = read_trainable(model, path)
    with torch.no_grad():
        for name, p in trainable_parameters(model):
            p.copy_(saved[name].to(p.device, p.dtype))


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


def set_rng_state(tensors: dict[str, torch.Tensor], js: dict[str, Any], rank: int = 0,
                  device: torch.device | None = None) -> None:
    """Restores rank 0's states (the process that wrote them), then, for rank `rank` of a
    data-parallel job, that rank's own torch states if the checkpoint holds them (same world
    size); a rank it holds none for continues from rank 0's."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if rank and f"rank.{rank}.torch" in tensors:
        torch.set_rng_state(tensors[f"rank.{rank}.torch"])
        if f"rank.{rank}.cuda" in tensors and device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(tensors[f"rank.{rank}.cuda"], device)
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
    gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    write_shards: Callable[[Path], str] | None = None,
    rank_rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes output_dir/checkpoint-{step} atomically and applies save_total_limit. `gathered`:
    the trainable parameters and optimizer state dict already gathered whole (FSDP2), written
    in place of the model's and optimizer's own (the same files as one process writes).
    `write_shards(tmp)`: FSDP2's sharded format instead; called with the temporary directory, it
    has every rank write its shards there and returns the optimizer's param groups as JSON.
    `rank_rng`: every rank's RNG states (distributed.gather_rng), saved beside rank 0's."""
    from safetensors.torch import save_file

    final = Path(output_dir) / f"checkpoint-{step}"
    params, optim_state = gathered if gathered is not None else (None, None)
    # re-saving a step (after a resume) replaces it; a checkpoint-N holding foreign files is refused
    with atomic_dir(final, overwrite=True, what=f"checkpoint-{step}", error=CheckpointError) as tmp:
        if write_shards is not None:
            (tmp / SHARDED_OPTIMIZER).write_text(write_shards(tmp))
        else:
            save_trainable(model, tmp / "trainable.safetensors", params)
            if has_lora(model):
                with parameters_replaced(model, params) if params is not None else contextlib.nullcontext():
                    model.save_adapter(tmp / "adapter")
            torch.save(optim_state if optim_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        rng_t, rng_js = rng_state()
        save_file({**rng_t, **(rank_rng or {})}, str(tmp / "rng.safetensors"))
        before_commit(output_dir, step)
        full_state = dict(state, step=step, rng=rng_js, saved_at=time.time())
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1))
    if total_limit is not None:
        for old_step, path in list_checkpoints(output_dir)[:-total_limit]:
            if old_step != step:
                remove_dir(path)
    return final


def _saved_config(model: nn.Module, dtype: torch.dtype) -> dict[str, Any] | None:
    """config.json for a full fine-tune: the source checkpoint's (model.load_info.source_path), or
    the model's own config for a text-only load of a vision checkpoint (its weights are the
    language model's alone), with the dtype the weights are saved in."""
    info = model.load_info
    src = Path(info.source_path) / "config.json" if info.source_path is not None else None
    if src is not None and src.is_file() and not info.text_of_vision:
        cfg = json.loads(src.read_text())
    else:
        raw = getattr(model.config, "raw", None)
        if not raw:
            return None
        cfg = copy.deepcopy(raw)
    cfg.pop("quantization_config", None)
    name = str(dtype).replace("torch.", "")
    for c in (cfg, cfg.get("text_config")):
        if isinstance(c, dict):
            for k in ("dtype", "torch_dtype"):
                if k in c or c is cfg:
                    c[k] = name
    return cfg


def full_state_tensors(model: nn.Module, gathered: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every persistent tensor of the model (tied ones once), on the CPU, under transformers' names
    (`gathered`: the model's state dict already gathered whole onto this CPU, under FSDP2)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        mod, _, attr = name.rpartition(".")
        key = f"{hf_path(model, mod)}.{attr}" if mod else attr
        src = gathered[name] if gathered is not None else t
        out[key] = src.detach().to("cpu", copy=gathered is None).contiguous()
    return out


def save_full(model: nn.Module, tokenizer: Any, out: str | os.PathLike, *, trainable_only: bool = False,
              overwrite: bool = True, gathered: dict[str, torch.Tensor] | None = None) -> Path:
    """The result of full fine-tuning as a checkpoint `minift.load` and transformers read:
    model.safetensors (every weight), config.json (the source's, see `_saved_config`),
    generation_config.json (the source's) and the tokenizer / processor, written atomically (the
    same writer as every save). `trainable_only` writes only trainable.safetensors (the trained
    parameters of a partly frozen model, not loadable alone). A tokenizer that cannot save is
    replaced by the source checkpoint's tokenizer files, with a warning. `gathered`: the model's
    state dict gathered whole (FSDP2, `distributed.gather_full_state`), saved in place of its own."""
    from safetensors.torch import save_file

    if has_lora(model):
        raise CheckpointError("save_full: the model has adapters; save them with model.save_adapter(dir) or a merged "
                              "checkpoint with model.save_merged(dir)")
    out = Path(out).expanduser()
    src = model.load_info.source_path
    with atomic_dir(out, overwrite=overwrite, what="fine-tuned model", error=CheckpointError) as tmp:
        if trainable_only:
            save_trainable(model, tmp / "trainable.safetensors", gathered)
        else:
            tensors = full_state_tensors(model, gathered)
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
            del tensors
            cfg = _saved_config(model, dtype)
            if cfg is not None:
                (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            gen = Path(src) / "generation_config.json" if src is not None else None
            if gen is not None and gen.is_file():
                shutil.copyfile(gen, tmp / "generation_config.json")
        try:
            write_tokenizer_files(tmp, tokenizer, src)
        except Exception as e:  # a tokenizer that cannot save should not lose the weights
            if isinstance(e, OSError) and getattr(e, "errno", None) is not None:
                raise  # a full disk is the writer's to report
            logger.warning("could not save the tokenizer/processor (%s); copying the source checkpoint's files", e)
            write_tokenizer_files(tmp, None, src)
    return out


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first."""
    out = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = _CKPT.match(p.name)
            if m and (p / STATE_FILE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


_LEGACY_TEMP = re.compile(r"^\.(?:tmp|old)-checkpoint-\d+-(\d+)$")  # written before the shared writer


def clean_partial(output_dir: Path) -> None:
    """Removes the temporary directories that killed saves left in output_dir (checkpoints, the
    final save; only those whose writing process is gone)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    remove_stale(output_dir)
    for p in output_dir.iterdir():
        m = _LEGACY_TEMP.match(p.name)
        if m and p.is_dir() and not (int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1)))):
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


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    load_sharded: Any = None, rank: int = 0) -> dict[str, Any]:
    """Restores weights, optimizer, scheduler and RNG states; returns the trainer state.
    `load_sharded(model, optimizer, params, optimizer_state)`: hands the whole tensors to FSDP2
    (distributed.load_train_state) instead of copying them into the parameters. A sharded
    checkpoint (sharded/, an FSDP2 full fine-tune's) is read by every rank through
    torch.distributed.checkpoint, in any mode (`distributed.load_shards`)."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable: {e}") from e
    # torch optimizers move state to each parameter's device themselves (and keep AdamW's step
    # counters on the CPU unless fused, avoiding a sync per step); bitsandbytes' do not.
    dev = next((p.device for _, p in trainable_parameters(model)), torch.device("cpu"))
    bnb = type(optimizer).__module__.startswith("bitsandbytes")
    if (path / distributed.SHARDED_DIR).is_dir():
        distributed.load_shards(model, optimizer, path / distributed.SHARDED_DIR, path / SHARDED_OPTIMIZER)
    elif not (path / "trainable.safetensors").is_file():
        raise CheckpointError(f"{path}: holds neither trainable.safetensors (the weights as one process saves them) "
                              f"nor {distributed.SHARDED_DIR}/ (an FSDP2 full fine-tune's shards)")
    elif load_sharded is not None:
        params = read_trainable(model, path / "trainable.safetensors")
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        load_sharded(model, optimizer, params, opt)
    else:
        load_trainable(model, path / "trainable.safetensors")
        opt = torch.load(path / "optimizer.pt", map_location=dev if bnb else "cpu", weights_only=True)
        optimizer.load_state_dict(opt)
    sched = json.loads((path / "scheduler.json").read_text())
    scheduler.load_state_dict(sched)
    set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"], rank, dev)
    return state
