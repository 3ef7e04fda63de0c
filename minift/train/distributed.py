"""Data-parallel training on PyTorch's own engine: `torch.distributed` under `torchrun`.

`TrainConfig.distributed`: "auto" (DDP when the process was launched by torchrun, else one
process), "ddp", "fsdp" (FSDP2's `fully_shard` per decoder layer, then the whole model; a 4-bit
base's packed weights are sharded too, see `_packed_as_parameters`) or None.

Every rank reads the whole dataset and computes the same step schedule (a pure function of seed
and step); rank r takes its own slice of every global micro-batch (`Schedule(world=, rank=)`).
Each rank divides its summed loss by the global target count over the world size, so after
DDP's (or FSDP's) gradient average the gradient is exactly the one-process gradient of the
global batch: N ranks x batch b equal 1 rank x N*b. The logged loss is the all-reduced one.
A rank whose slice of a micro-batch is empty still runs one (weighted zero) so every rank joins
every gradient reduction: nothing hangs on a ragged last batch or on a batch without images.

Checkpoints under FSDP2 (see `shards_checkpoints`): an adapter run's trainable state is gathered
onto rank 0 and saved in the one-process format; a full fine-tune's is saved as each rank's
shards through torch.distributed.checkpoint. Either resumes on any world size, in any mode.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError, TrainConfigError
from ..io.files import read_json_object
from ..lora import has_adapters
from .optim import trainable_parameters

MODES = ("auto", "ddp", "fsdp", None)
PATH_MAX = 4096
TIMEOUT = datetime.timedelta(minutes=10)  # a rank that dies ends the job instead of hanging it


@dataclass
class World:
    """This process's place in the job (mode None: a single process)."""

    mode: str | None = None
    rank: int = 0
    size: int = 1
    owns_group: bool = False  # this Trainer initialised the process group (and destroys it)
    device: torch.device | None = None  # where the collectives' tensors live (CUDA under NCCL)

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, shows the progress bar and writes files."""
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.mode is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.mode is not None:
            dist.barrier()

    def share_path(self, path: Path | None) -> Path:
        """Rank 0's `path` on every rank (a collective; the other ranks pass None): how the ranks
        agree on the temporary directory of a checkpoint they all write into, whose name rank 0's
        atomic writer made up (its pid and a random suffix). Sent as bytes, not pickled."""
        if self.mode is None:
            assert path is not None
            return path
        buf = torch.zeros(PATH_MAX, dtype=torch.uint8, device=self.device)
        if self.main:
            raw = os.fsencode(path)
            if not 0 < len(raw) < PATH_MAX:
                raise CheckpointError(f"{path}: too long to share with the other ranks (>= {PATH_MAX} bytes)")
            buf[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(buf.device)
        dist.broadcast(buf, src=0)
        return Path(os.fsdecode(bytes(buf.cpu().tolist()).rstrip(b"\0")))

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def launched() -> bool:
    """Whether torchrun (torchelastic) started this process, or a process group already exists."""
    return dist.is_available() and (dist.is_torchelastic_launched() or dist.is_initialized())


def setup(mode: str | None, device: torch.device) -> World:
    """The World for `mode`, initialising the default process group (NCCL on CUDA, gloo on CPU)."""
    if mode not in MODES:
        raise TrainConfigError(f"TrainConfig.distributed={mode!r}: must be one of {MODES}")
    if mode is None or (mode == "auto" and not launched()):
        return World()
    if not launched():
        raise TrainConfigError(
            f"TrainConfig.distributed={mode!r} needs a torchrun launch (torchrun --nproc_per_node N script.py); "
            "use distributed='auto' or None for one process"
        )
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
        owns = True
    return World("ddp" if mode == "auto" else mode, dist.get_rank(), dist.get_world_size(), owns, device)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards one at a time: decoder layers and the vision encoder's layers."""
    units = list(model.language_model.layers)
    tower = getattr(getattr(model, "model", None), "vision_tower", None)
    if tower is not None:
        units += list(tower.vision_model.encoder.layers)
    return units


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The module the loop calls: DDP around the model, or the model itself sharded in place by
    FSDP2 (fp32 gradient reduction; parameters keep their dtypes: a 16-bit or 4-bit base, fp32
    adapters)."""
    if world.mode is None:
        return model
    if world.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        vision = hasattr(model, "image_features")
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
                   # a micro-batch without images leaves the vision tower's adapters without gradients
                   find_unused_parameters=vision)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _packed_as_parameters(model)
    mesh = init_device_mesh(device.type, (world.size,))
    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for unit in _decoder_layers(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _packed_as_parameters(model: nn.Module) -> None:
    """Each 4-bit layer's packed weight and block scales become frozen parameters
    (`Linear4bit.hold_packed_as_parameters`), so FSDP2 shards them; a MixedPrecisionPolicy without
    param_dtype leaves their dtypes alone, the all-gather moves them as bytes. Forward and backward
    read them between FSDP2's unshard and reshard, whole."""
    from ..quant.linear4bit import Linear4bit

    for mod in model.modules():
        if isinstance(mod, Linear4bit):
            mod.hold_packed_as_parameters()


def gather_rng(world: World) -> dict[str, torch.Tensor] | None:
    """Every rank's torch RNG states (CPU, and its CUDA device's) on rank 0, as tensors named
    `rank.<r>.torch` / `rank.<r>.cuda`, so a checkpoint resumed on the same world size gives each
    rank back its own dropout stream; a collective (None on the other ranks, {} in one process)."""
    if world.mode is None:
        return {}
    cpu = torch.get_rng_state()
    on_cuda = world.device is not None and world.device.type == "cuda"
    dev = torch.cuda.get_rng_state(world.device) if on_cuda else cpu.new_empty(0)
    mine = torch.cat([cpu, dev]).to(world.device if on_cuda else "cpu")
    every = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)
    if not world.main:
        return None
    out: dict[str, torch.Tensor] = {}
    for r, t in enumerate(every):
        t = t.cpu()
        out[f"rank.{r}.torch"] = t[: cpu.numel()].clone()
        if dev.numel():
            out[f"rank.{r}.cuda"] = t[cpu.numel():].clone()
    return out


def no_sync(module: nn.Module, world: World, last: bool) -> Any:
    """A context in which a non-last micro-batch's backward skips the gradient reduction."""
    if world.mode == "ddp" and not last:
        return module.no_sync()
    if world.mode == "fsdp":
        module.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


@contextlib.contextmanager
def unsharded(model: nn.Module, world: World) -> Iterator[None]:
    """FSDP2: every parameter gathered whole on every rank for the block (a collective: all ranks
    enter it), so rank 0 can save from the modules as in one process (an adapter, a merged
    checkpoint); then sharded again. The whole model is then held once per rank; under DDP or one
    process this does nothing. Not for code that takes a module's state_dict() of an FSDP2 unit:
    FSDP2 reshards it first (a full fine-tune's final save gathers with `gather_full_state`)."""
    if world.mode != "fsdp":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()


# ---- FSDP2 checkpoints ------------------------------------------------------------------------
# Two formats, chosen by `shards_checkpoints`:
# - gathered (adapter runs): what one process would save, every trainable parameter whole, by
#   name, and the optimizer state as `optimizer.state_dict()` has it (keyed by parameter index
#   over the param groups). torch's distributed state-dict API does the gathering and sharding;
#   these convert between its parameter names and the optimizer's indices (the same order: the
#   param groups' parameters, one after another).
# - sharded (full fine-tunes): each rank writes its own shards through torch.distributed.checkpoint
#   (DCP), nothing gathered; DCP re-splits them on load for any world size, one process included.
# Both resume on any world size and in any mode.


def shards_checkpoints(model: nn.Module, world: World) -> bool:
    """The rule for FSDP2 checkpoints: a model without adapters (a full fine-tune, whose trainable
    state is the base's weights plus two fp32 Adam moments each: more than one host should hold)
    writes sharded checkpoints; an adapter run's small state is gathered onto rank 0 and written
    in the one-process format, with its loadable adapter/. DDP and one process never shard."""
    return world.mode == "fsdp" and not has_adapters(model)


def _state_dict_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_train_state(model: nn.Module, optimizer: torch.optim.Optimizer, world: World
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """FSDP2: (the trainable parameters by name, the optimizer state dict) gathered whole onto
    rank 0's CPU, one tensor at a time; a collective (every rank calls it), None on the other
    ranks. The frozen base is not gathered."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _state_dict_options(cpu_offload=True, ignore_frozen_params=True)
    params = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    if not world.main:
        return None
    names = [n for g in optim["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    by_index = {
        "state": {index[n]: st for n, st in optim["state"].items()},
        "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in optim["param_groups"]],
    }
    return params, by_index


def load_train_state(model: nn.Module, optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                     optim_state: dict[str, Any]) -> None:
    """FSDP2: each rank's shards of the trainable parameters and optimizer state from the whole
    tensors of a checkpoint (every rank passes the same ones; a collective)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    by_name = {
        "state": {names[int(i)]: st for i, st in optim_state["state"].items()},
        "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in optim_state["param_groups"]],
    }
    set_model_state_dict(model, params, options=_state_dict_options(strict=False))
    set_optimizer_state_dict(model, optimizer, by_name, options=_state_dict_options())


def gather_full_state(model: nn.Module, world: World) -> dict[str, torch.Tensor] | None:
    """FSDP2: the model's whole state dict (every parameter and persistent buffer, by name)
    gathered onto rank 0's CPU one tensor at a time, for the final save of a full fine-tune (one
    transformers-loadable file, so rank 0's host holds the weights once; no GPU holds more than a
    shard plus one whole tensor); a collective, None on the other ranks. (`unsharded` does not
    serve here: FSDP2 reshards the modules when their state_dict() is taken.)"""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    whole = get_model_state_dict(model, options=_state_dict_options(cpu_offload=True))
    return whole if world.main else None


# ---- sharded checkpoints through torch.distributed.checkpoint ---------------------------------
# The DCP directory holds tensors only, under flat keys "model.<parameter name>" and
# "optim.<parameter name>.<state key>" (exp_avg, exp_avg_sq, step for AdamW): one file per saving
# rank (`__<rank>_0.distcp`, its shards) and `.metadata`, the index of every tensor's chunks
# (global shape, offsets, and the file, offset and length each is stored at), written by rank 0
# last. The optimizer's param groups (hyperparameters, parameter names) and any non-tensor
# per-parameter state go to the caller's JSON file, so DCP never pickles an object into a shard.
# `.metadata` itself is a pickle of torch's Metadata dataclasses, which DCP reads with
# pickle.load: load only checkpoints you (minift) wrote, as with any torch checkpoint.

SHARDED_DIR = "sharded"  # the DCP directory inside checkpoint-N


@dataclass
class _ShardedState:
    """The trainable state as DCP sees it: `tensors` (flat keys, each rank's shards as DTensors
    under FSDP2, whole tensors elsewhere) and what is no tensor (`param_groups`, `other`)."""

    tensors: dict[str, torch.Tensor]
    names: list[str]  # the trainable parameters ("model." keys)
    state_keys: dict[str, list[str]]  # parameter name -> its tensor state keys ("optim." keys)
    param_groups: list[dict[str, Any]]
    other: dict[str, dict[str, Any]]  # parameter name -> its non-tensor state


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> _ShardedState:
    """The live model's and optimizer's state (an optimizer without state yet is given zeros of
    the right shapes by torch, a template for DCP to load into)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(ignore_frozen_params=True)  # not full_state_dict: each rank's own shards
    params = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    names = [n for n, _ in trainable_parameters(model)]
    tensors = {f"model.{n}": params[n] for n in names}
    state_keys: dict[str, list[str]] = {}
    other: dict[str, dict[str, Any]] = {}
    for n, st in optim["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{n}.{k}"] = v
                state_keys.setdefault(n, []).append(k)
            else:
                other.setdefault(n, {})[k] = v
    return _ShardedState(tensors, names, state_keys, optim["param_groups"], other)


@contextlib.contextmanager
def _dcp_without_group_is_meant() -> Iterator[None]:
    """Without a process group DCP saves / loads in one process, as meant here (a sharded
    checkpoint resumed by one process), but warns each time that it assumes so: not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _no_json(v: Any) -> Any:
    raise CheckpointError(f"optimizer param group / state value {v!r} ({type(v).__name__}) cannot be stored as JSON")


def save_shards(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> str:
    """Every rank writes its shards of the trainable parameters and the optimizer state into
    `directory` (the same one on every rank, on a filesystem they share) through
    `torch.distributed.checkpoint.save`; a collective, nothing gathered. Returns the optimizer's
    param groups and non-tensor state as JSON text, for the caller to write beside it."""
    import torch.distributed.checkpoint as dcp

    st = _sharded_state(model, optimizer)
    with _dcp_without_group_is_meant():
        dcp.save(st.tensors, storage_writer=dcp.FileSystemWriter(directory))
    return json.dumps({"param_groups": st.param_groups, "state": st.other}, default=_no_json, indent=1)


def _read_index(directory: Path) -> Any:
    """The DCP index (`.metadata`: torch's Metadata, pickled by torch) of `directory`."""
    from torch.distributed.checkpoint import FileSystemReader

    index = directory / ".metadata"
    if not index.is_file():
        raise CheckpointError(f"{index}: missing; a sharded checkpoint's index of its shard files (written last "
                              "by rank 0 of the saving job)")
    try:
        meta = FileSystemReader(directory).read_metadata()
    except Exception as e:  # a truncated or foreign pickle fails in many ways
        raise CheckpointError(f"{index}: unreadable as a torch.distributed.checkpoint index: {e!r}") from e
    if not (isinstance(getattr(meta, "state_dict_metadata", None), dict)
            and isinstance(getattr(meta, "storage_data", None), dict)):
        raise CheckpointError(f"{index}: not the index of a torch.distributed.checkpoint directory of files")
    return meta


def check_shards(directory: Path, expected: dict[str, torch.Tensor], meta: Any) -> None:
    """CheckpointError unless `directory`, whose index is `meta`, is a complete DCP checkpoint of
    `expected`'s tensors: the same keys and global shapes, every shard file the index names
    present and at least as long as it says (a missing rank's file, a truncated copy)."""
    saved = dict(meta.state_dict_metadata)
    files: dict[str, int] = {}
    for info in meta.storage_data.values():
        files[info.relative_path] = max(files.get(info.relative_path, 0), info.offset + info.length)
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{directory}: holds other tensors than this model and optimizer (missing {missing[:5]}, unexpected "
            f"{extra[:5]}); was it written by a full fine-tune of the same model with the same optimizer?"
        )
    for key, t in expected.items():
        shape = getattr(saved[key], "size", None)
        if shape is None or tuple(shape) != tuple(t.shape):
            raise CheckpointError(f"{directory}: {key} has shape {None if shape is None else tuple(shape)}, "
                                  f"the model's is {tuple(t.shape)}")
    for rel, need in sorted(files.items()):
        f = directory / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; the checkpoint's index lists this shard file ({need} bytes)")
        size = f.stat().st_size
        if size < need:
            raise CheckpointError(f"{f}: truncated: {size} bytes, the checkpoint's index expects at least {need}")


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, groups_file: Path) -> None:
    """Restores a sharded checkpoint (the DCP `directory`, and `groups_file`: the JSON that
    `save_shards` returned) on any world size: FSDP2 ranks (each reads the parts of the shards
    it now holds), DDP ranks or one process without a process group (whole tensors). A
    collective where there is a process group. CheckpointError when the files do not fit the
    model or cannot be read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    saved = read_json_object(groups_file, CheckpointError,
                             what="a sharded checkpoint keeps its optimizer's param groups there")
    st = _sharded_state(model, optimizer)
    meta = _read_index(directory)
    # a parameter that never had a gradient has no optimizer state in the checkpoint: none now
    for n, keys in list(st.state_keys.items()):
        if not any(f"optim.{n}.{k}" in meta.state_dict_metadata for k in keys):
            del st.state_keys[n]
            for k in keys:
                del st.tensors[f"optim.{n}.{k}"]
    check_shards(directory, st.tensors, meta)
    groups = saved.get("param_groups")
    names = [g.get("params") if isinstance(g, dict) else None for g in groups] if isinstance(groups, list) else None
    if names != [live["params"] for live in st.param_groups]:
        raise CheckpointError(f"{groups_file}: param_groups do not hold this model's trainable parameters in the "
                              "optimizer's groups (by name); was it written for the same model and settings?")
    try:
        with _dcp_without_group_is_meant():
            dcp.load(st.tensors, storage_reader=dcp.FileSystemReader(directory))
    except Exception as e:
        raise CheckpointError(f"{directory}: could not read the shards: {e}") from e
    t = st.tensors
    state: dict[str, dict[str, Any]] = {}
    for n, keys in st.state_keys.items():
        state[n] = {k: t[f"optim.{n}.{k}"] for k in keys}
    for n, extra in (saved.get("state") or {}).items():
        state.setdefault(n, {}).update(extra)
    # JSON gave lists where the optimizer keeps tuples (AdamW's betas)
    groups = [{k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in g.items()}
              for g, live in zip(groups, st.param_groups)]
    set_model_state_dict(model, {n: t[f"model.{n}"] for n in st.names}, options=StateDictOptions(strict=False))
    # strict=False: parameters without state (see above) stay without
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(strict=False))
