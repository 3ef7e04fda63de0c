"""Data-parallel training under torchrun on CPU (gloo): N ranks x batch b give the loss sequence
and final adapter of 1 process x N*b, with DDP and FSDP2; a 4-bit base under DDP and FSDP2; resuming a
2-rank checkpoint on 1 rank and back; a failing rank ends the job with its error; packing, offloaded
checkpoints and merged micro-batches; Gemma 3 vision with ranks whose micro-batch has no image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_utils import tiny_llama

HERE = Path(__file__).parent
TIMEOUT = 300


def run(tmp: Path, name: str, nproc: int, model: Path, config: dict, **extra) -> subprocess.CompletedProcess:
    out = tmp / name
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"model": str(model), "out": str(out), "config": config, **extra}))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if nproc == 1 and config.get("distributed") is None:
        cmd = [sys.executable, str(HERE / "dist_worker.py"), str(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(HERE / "dist_worker.py"), str(spec)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def result(tmp: Path, name: str, proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((tmp / name / "RESULT.json").read_text())


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def assert_same_run(dir_a: Path, dir_b: Path, ra: dict, rb: dict, tol: float = 1e-6) -> None:
    """Same tokens, losses and final adapter (fp32, <= tol relative)."""
    assert ra["tokens"] == rb["tokens"]
    assert len(ra["losses"]) == len(rb["losses"])
    for x, y in zip(ra["losses"], rb["losses"]):
        assert abs(x - y) <= 1e-6 * max(1.0, abs(y)), (ra["losses"], rb["losses"])
    wa, wb = adapter(dir_a), adapter(dir_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert ((wa[k] - wb[k]).norm() / wb[k].norm().clamp_min(1e-12)).item() <= tol, k


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("dist") / "m")


# 13 rows, 2 x 2 x 2 per step: the 4th step is ragged (one rank's slice of a micro-batch is empty)
BASE = dict(max_steps=4, grad_accum=2)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    return tmp, result(tmp, "one", run(tmp, "one", 1, model, dict(BASE, batch_size=4, distributed=None)))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(model, reference, tmp_path, mode):
    tmp, ref = reference
    got = result(tmp_path, mode, run(tmp_path, mode, 2, model, dict(BASE, batch_size=2, distributed=mode)))
    assert got["world"] == 2
    assert_same_run(tmp_path / mode, tmp / "one", got, ref)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_packing_offload_and_merged_micro_batches_equal_one_process(model, tmp_path, mode):
    """Packed rows, checkpoints offloaded, each rank's micro-batches of a step merged into one forward:
    2 ranks x 2 rows equal 1 process x 4 rows."""
    cfg = dict(BASE, packing=True, max_seq_length=40, gradient_checkpointing="offload", merge_micro_batches=True)
    extra = dict(rows=30, max_words=20)
    ref = result(tmp_path, "one", run(tmp_path, "one", 1, model, dict(cfg, batch_size=4, distributed=None), **extra))
    got = result(tmp_path, mode, run(tmp_path, mode, 2, model, dict(cfg, batch_size=2, distributed=mode), **extra))
    assert got["world"] == 2
    assert_same_run(tmp_path / mode, tmp_path / "one", got, ref)


@pytest.mark.parametrize("mode", ["fsdp"])  # DDP wraps the same compiled layers unsharded (and costs CI ~80 s)
def test_compiled_layers_under_two_ranks_equal_one_process(model, tmp_path, mode):
    """compile=True (each decoder layer torch.compile'd, as on CUDA) with FSDP2's sharded layers."""
    cfg = dict(BASE, max_steps=2, compile=True)
    ref = result(tmp_path, "one", run(tmp_path, "one", 1, model, dict(cfg, batch_size=4, distributed=None)))
    got = result(tmp_path, mode, run(tmp_path, mode, 2, model, dict(cfg, batch_size=2, distributed=mode)))
    assert_same_run(tmp_path / mode, tmp_path / "one", got, ref, tol=1e-5)


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    from minift.testing import write_tiny_gemma3_vision

    return write_tiny_gemma3_vision(tmp_path_factory.mktemp("vis") / "v")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_vision_with_ranks_without_images_equals_one_process(vision_model, tmp_path, mode):
    """Gemma 3 vision, LoRA on the tower too, rows where only every third has an image (a rank's
    micro-batch often has none): no hang, and 2 ranks x 1 row equal 1 process x 2 rows."""
    cfg = dict(BASE, max_steps=3, gradient_checkpointing=True)
    extra = dict(rows=12, vision=True)
    ref = result(tmp_path, "one", run(tmp_path, "one", 1, vision_model, dict(cfg, batch_size=2, distributed=None),
                                      **extra))
    got = result(tmp_path, mode, run(tmp_path, mode, 2, vision_model, dict(cfg, batch_size=1, distributed=mode),
                                     **extra))
    # the tower sees its images in other groupings than the one process: AdamW lifts the rounding
    assert_same_run(tmp_path / mode, tmp_path / "one", got, ref, tol=1e-5)


def test_ddp_on_a_4bit_base_trains_and_saves_an_adapter_peft_loads(model, tmp_path):
    import peft
    import transformers

    got = result(tmp_path, "q", run(tmp_path, "q", 2, model, dict(BASE, batch_size=2, distributed="ddp"),
                                    quant="4bit"))
    assert all(x == x for x in got["losses"])
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft.PeftModel.from_pretrained(base, tmp_path / "q" / "final")


def test_fsdp_on_a_4bit_base_shards_checkpoints_and_resumes_exactly(model, tmp_path):
    """FSDP2 over an NF4 base: the packed weights are sharded (frozen uint8 parameters); save_steps
    writes the one-process checkpoint format (trainable parameters and optimizer state gathered
    whole onto rank 0), which 2 FSDP ranks resume to the losses and final adapter of one 4-bit
    process."""
    import minift

    one = result(tmp_path, "q1", run(tmp_path, "q1", 1, model, dict(BASE, batch_size=4, distributed=None),
                                     quant="4bit"))
    fsdp = dict(BASE, batch_size=2, distributed="fsdp", save_steps=2)
    first = result(tmp_path, "q2", run(tmp_path, "q2", 2, model, fsdp, quant="4bit", stop_after=2))
    assert first["sharded_4bit"] is True and one["sharded_4bit"] is False
    assert first["params"] == one["params"]  # 4-bit weights counted unpacked, sharded or not
    assert first["losses"] == pytest.approx(one["losses"][:2], rel=1e-6)
    saved = tmp_path / "q2" / "checkpoint-2"
    trainable = load_file(str(saved / "trainable.safetensors"))
    assert trainable and all(t.dtype == torch.float32 for t in trainable.values())  # adapters only, no base
    # the checkpoint's adapter/ is the adapter of its trainable tensors, loadable as any adapter
    fresh, _ = minift.load(model, load_in_4bit=True)
    minift.load_adapter(fresh, saved / "adapter")
    got = {n: p.detach() for n, p in fresh.named_parameters() if p.requires_grad}
    assert got.keys() == trainable.keys() and all(torch.equal(got[n], trainable[n]) for n in got)
    again = result(tmp_path, "q2", run(tmp_path, "q2", 2, model, dict(fsdp, resume_from="latest"), quant="4bit"))
    assert_same_run(tmp_path / "q2", tmp_path / "q1", again, one)


def test_resume_across_world_sizes(model, reference, tmp_path):
    tmp, ref = reference
    # 2 ranks stop after step 2 (a checkpoint), 1 process continues to step 4: the same losses
    first = result(tmp_path, "r", run(tmp_path, "r", 2, model, dict(BASE, batch_size=2, distributed="ddp",
                                                                      save_steps=2), stop_after=2))
    assert first["losses"] == pytest.approx(ref["losses"][:2], rel=1e-6)
    again = result(tmp_path, "r", run(tmp_path, "r", 1, model, dict(BASE, batch_size=4, distributed=None,
                                                                      save_steps=2, resume_from="latest")))
    assert again["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    # and back: a 1-process checkpoint (step 2) resumed on 2 ranks
    one = result(tmp_path, "s", run(tmp_path, "s", 1, model, dict(BASE, batch_size=4, distributed=None,
                                                                   save_steps=2), stop_after=2))
    assert one["losses"] == pytest.approx(ref["losses"][:2], rel=1e-6)
    two = result(tmp_path, "s", run(tmp_path, "s", 2, model, dict(BASE, batch_size=2, distributed="ddp",
                                                                   save_steps=2, resume_from="latest")))
    assert two["losses"] == pytest.approx(ref["losses"], rel=1e-6)


def test_a_failing_rank_ends_the_job_with_its_error(model, tmp_path):
    proc = run(tmp_path, "f", 2, model, dict(BASE, batch_size=2, distributed="ddp"), fail_rank=1)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stdout + proc.stderr


def test_ctrl_c_under_torchrun_fsdp_saves_once_and_one_process_resumes(model, reference, tmp_path):
    """SIGINT to torchrun (which forwards it to each rank): the ranks agree on one step, rank 0
    writes its checkpoint (no save_steps), every rank exits 130; one process resumes it exactly."""
    import signal
    import time

    tmp, ref = reference
    out = tmp_path / "c"
    spec = tmp_path / "c.json"
    spec.write_text(json.dumps({"model": str(model), "out": str(out), "slow": 0.4,
                                "config": dict(BASE, batch_size=2, distributed="fsdp")}))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(HERE / "dist_worker.py"), str(spec)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.time() + TIMEOUT
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None, proc.stdout.read()[-5000:]
            assert time.time() < deadline, "no step was logged"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    got = json.loads((out / "RESULT.json").read_text())
    step = got["interrupted"]
    assert 1 <= step < BASE["max_steps"], text[-3000:]
    assert got["checkpoint"] == str(out / f"checkpoint-{step}")
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert text.count("training interrupted after step") == 1  # rank 0 speaks
    assert got["losses"] == pytest.approx(ref["losses"][:step], rel=1e-6)
    one = result(tmp_path, "c", run(tmp_path, "c", 1, model, dict(BASE, batch_size=4, distributed=None,
                                                                   resume_from="latest")))
    assert_same_run(out, tmp / "one", one, ref)
