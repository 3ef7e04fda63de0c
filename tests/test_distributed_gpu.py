"""torchrun on one CUDA GPU: NCCL with a world of one rank under DDP and FSDP2 gives the one-process
run's losses and adapter (the collectives, the sharding and the loss normalisation are the
identity there)."""

from __future__ import annotations

import pytest
from test_distributed import BASE, assert_same_run, result, run
from train_utils import tiny_llama

pytestmark = pytest.mark.gpu
CFG = dict(BASE, batch_size=4, compile=False)


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
