"""torchrun on one CUDA GPU: NCCL with a world of one rank under DDP and FSDP2 gives the one-process
run's losses and adapter (the collectives, the sharding and the loss normalisation are the
identity there), eager on a 16-bit base, and with compiled layers, offloaded activation
checkpoints and an NF4 base; an FSDP2 full fine-tune's sharded (DCP) checkpoint written on NCCL
resumes in one process."""

from __future__ import annotations

import pytest
from test_distributed import BASE, assert_same_run, result, run
from train_utils import tiny_llama

pytestmark = pytest.mark.gpu
# cuda_graphs off: a one-process CUDA run would replay graphs over bucket-padded rows, which torchrun
# runs never do; these tests compare the collectives, not the graphs (tests/test_train_graphs.py)
CFG = dict(BASE, batch_size=4, compile=False, cuda_graphs=False)
# torch.compile'd decoder layers, checkpoints offloaded to the CPU, a 4-bit (NF4) base whose packed
# weights FSDP2 holds as DTensors; fp32 compute (the 4-bit weights dequantised to fp32)
HEAVY = dict(BASE, batch_size=4, compile=True, gradient_checkpointing="offload", cuda_graphs=False)
HEAVY_SPEC = dict(quant="4bit", dtype="float32")
# At one rank the collectives copy and the normaliser is the same, so what may differ is the order in
# which compiled kernels reduce (Inductor can pick other kernels for FSDP2's unsharded parameters, views
# into its all-gather buffer, than for plain ones): ~1e-6 relative in fp32. 1e-3 stays far below what
# a real fault gives (a normaliser off by the world size, a gradient not reduced, a step lost: > 1e-2).
HEAVY_TOL = 1e-3


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The tiny model and its one-process run (no process group), shared by both modes."""
    tmp = tmp_path_factory.mktemp("nccl")
    model = tiny_llama(tmp / "m")
    return tmp, model, result(tmp, "one", run(tmp, "one", 1, model, dict(CFG, distributed=None)))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_nccl_one_rank_equals_one_process(one, mode):
    tmp, model, ref = one
    got = result(tmp, mode, run(tmp, mode, 1, model, dict(CFG, distributed=mode)))
    assert got["world"] == 1
    assert_same_run(tmp / mode, tmp / "one", got, ref)


@pytest.fixture(scope="module")
def one_heavy(one):
    """The one-process run with compiled layers, offloaded checkpoints and the NF4 base."""
    tmp, model, _ = one
    ref = result(tmp, "one-heavy", run(tmp, "one-heavy", 1, model, dict(HEAVY, distributed=None), **HEAVY_SPEC))
    assert ref["compiled"] is True and ref["fsdp_4bit"] is False
    return ref


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_nccl_one_rank_compiled_offloaded_4bit_equals_one_process(one, one_heavy, mode):
    """torchrun --nproc_per_node 1 on NCCL with compile=True, gradient_checkpointing="offload" and
    load_in_4bit=True: the one-process run's losses and adapter, within HEAVY_TOL."""
    tmp, model, _ = one
    name = f"{mode}-heavy"
    got = result(tmp, name, run(tmp, name, 1, model, dict(HEAVY, distributed=mode), **HEAVY_SPEC))
    assert got["world"] == 1 and got["compiled"] is True
    assert got["fsdp_4bit"] is (mode == "fsdp")  # FSDP2 took the packed weights as (one-shard) DTensors
    assert got["params"] == one_heavy["params"]
    assert_same_run(tmp / name, tmp / "one-heavy", got, one_heavy, tol=HEAVY_TOL, loss_tol=HEAVY_TOL)


def test_nccl_fsdp_full_fine_tune_sharded_checkpoint_resumes_in_one_process(one):
    """A full fine-tune (fp32) under FSDP2 on NCCL writes its checkpoint as DCP shards (CUDA DTensors,
    the temporary directory's path broadcast as a CUDA tensor); one process resumes it to the
    uninterrupted run's losses and weights. (The grad-norm all-reduce may round differently: 1e-5.)"""
    tmp, model, _ = one
    full = dict(full=True, dtype="float32")
    ref = result(tmp, "one-full", run(tmp, "one-full", 1, model, dict(CFG, distributed=None), **full))
    first = result(tmp, "fsdp-full", run(tmp, "fsdp-full", 1, model, dict(CFG, distributed="fsdp", save_steps=2),
                                         stop_after=2, **full))
    shards = tmp / "fsdp-full" / "checkpoint-2" / "sharded"
    assert first["world"] == 1 and (shards / "__0_0.distcp").is_file() and (shards / ".metadata").is_file()
    again = result(tmp, "resumed-full", run(tmp, "resumed-full", 1, model,
                                            dict(CFG, distributed=None, resume_from=str(shards.parent)), **full))
    assert_same_run(tmp / "resumed-full", tmp / "one-full", again, ref, tol=1e-5, loss_tol=1e-5)
