"""torchrun on one CUDA GPU: NCCL with a world of one rank under DDP and FSDP2 gives the one-process
run's losses and adapter (the collectives, the sharding and the loss normalisation are the
identity there)."""

from __future__ import annotations

import pytest
from test_distributed import BASE, assert_same_run, result, run
from train_utils import tiny_llama

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_nccl_one_rank_equals_one_process(tmp_path, mode):
    model = tiny_llama(tmp_path / "m")
    cfg = dict(BASE, batch_size=4, compile=False)
    one = result(tmp_path, "one", run(tmp_path, "one", 1, model, dict(cfg, distributed=None)))
    nccl = result(tmp_path, mode, run(tmp_path, mode, 1, model, dict(cfg, distributed=mode)))
    assert nccl["world"] == 1
    assert_same_run(tmp_path / mode, tmp_path / "one", nccl, one)
