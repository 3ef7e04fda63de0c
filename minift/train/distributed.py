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
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import TrainConfigError

MODES = ("auto", "ddp", "fsdp", None)
TIMEOUT = datetime.timedelta(minutes=10)  # a rank that dies ends the job instead of hanging it


@dataclass
class World:
    """This process's place in the job (mode None: a single process)."""

    mode: str | None = None
    rank: int = 0
    size: int = 1
    owns_group: bool = False  # this Trainer initialised the process group (and destroys it)

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
    return World("ddp" if mode == "auto" else mode, dist.get_rank(), dist.get_world_size(), owns)


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


SHARDED_4BIT = ("weight", "absmax")  # a Linear4bit's large buffers (the packed codes, the block scales)


def _packed_as_parameters(model: nn.Module) -> None:
    """Each 4-bit layer's packed weight and block scales become frozen parameters (uint8, or
    fp32 scales without double quantisation), since FSDP2 shards parameters and replicates
    buffers; a MixedPrecisionPolicy without param_dtype leaves their dtypes alone, the
    all-gather moves them as bytes. The small tables (code maps, nested scales, offset) stay
    buffers. Forward and backward read them between FSDP2's unshard and reshard, whole."""
    from ..quant.linear4bit import Linear4bit

    for mod in model.modules():
        if isinstance(mod, Linear4bit):
            for name in SHARDED_4BIT:
                if name in mod._buffers:  # (a second Trainer on the same model finds parameters)
                    t = mod._buffers.pop(name)
                    mod.register_parameter(name, nn.Parameter(t, requires_grad=False))


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
    enter it), so rank 0 can save from the modules as in one process; then sharded again. The
    whole model is then held once per rank; under DDP or one process this does nothing."""
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
# A checkpoint holds what one process would save: every trainable parameter whole, by name, and
# the optimizer state as `optimizer.state_dict()` has it (keyed by parameter index over the
# param groups), so it resumes on any world size and in any mode. torch's distributed
# state-dict API does the gathering and sharding; these convert between its parameter names and
# the optimizer's indices (the same order: the param groups' parameters, one after another).


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

