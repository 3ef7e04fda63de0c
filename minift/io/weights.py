"""Reading checkpoint tensors from safetensors, single-file or sharded with an index. Pickle
weights (*.bin / *.pt) are refused: unpickling can run code."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError


def weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name → the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        from .files import read_json_object

        wm = read_json_object(index, CheckpointError, what="a sharded checkpoint needs its index").get("weight_map")
        if not isinstance(wm, dict):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)")
        out = {}
        for k, fname in wm.items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"{f}: shard named by {index.name} for tensor {k!r} is missing")
            out[k] = f
        return out
    if single.is_file():
        return {k: single for k in safetensors_keys(single)}
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(
            f"{path}: holds only pickle weights (*.bin/*.pt); minift loads safetensors only, since pickle can run code"
        )
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def safetensors_keys(f: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as h:
            return list(h.keys())
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        raise CheckpointError(f"{f}: not a readable safetensors file (truncated or corrupted?): {e}") from e


def iter_tensors(files: dict[str, Path], keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) file by file, each tensor read once from its mapped file."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for k in keys if keys is not None else files:
        by_file.setdefault(files[k], []).append(k)
    for f, ks in by_file.items():
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in ks:
                    yield k, h.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: failed reading tensor data (truncated or corrupted?): {e}") from e
