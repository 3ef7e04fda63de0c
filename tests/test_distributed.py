"""Data-parallel training under torchrun on CPU (gloo): N ranks x batch b give the loss sequence
and final adapter of 1 process x N*b, with DDP and FSDP2; a 4-bit base under DDP and FSDP2; resuming a
2-rank checkpoint on 1 rank and back; each rank's RNG resumed (LoRA dropout); an FSDP2 full
fine-tune's sharded (DCP) checkpoints resumed on 1 process and 2 ranks; a failing rank ends the job
with its error; packing, offloaded checkpoints and merged micro-batches; Gemma 3 vision with ranks
whose micro-batch has no image."""

from __future__ import annotations

import json
import re
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


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The saved result: the adapter, or a full fine-tune's model.safetensors."""
    adapter = run_dir / "final" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else run_dir / "final" / "model.safetensors"))


def assert_same_run(dir_a: Path, dir_b: Path, ra: dict, rb: dict, tol: float = 1e-6, loss_tol: float = 1e-6) -> None:
    """Same tokens, losses (<= loss_tol relative) and final adapter or weights (<= tol relative)."""
    assert ra["tokens"] == rb["tokens"]
    assert len(ra["losses"]) == len(rb["losses"])
    for x, y in zip(ra["losses"], rb["losses"]):
        assert abs(x - y) <= loss_tol * max(1.0, abs(y)), (ra["losses"], rb["losses"])
    wa, wb = final_weights(dir_a), final_weights(dir_b)
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
    """FSDP2 over an NF4 base: the packed weights are sharded (frozen parameters: the uint8 bytes
    in a 1-byte float view); save_steps writes the one-process checkpoint format (trainable parameters and optimizer state gathered
    whole onto rank 0), which 2 FSDP ranks resume to the losses and final adapter of one 4-bit
    process."""
    import minift

    one = result(tmp_path, "q1", run(tmp_path, "q1", 1, model, dict(BASE, batch_size=4, distributed=None),
                                     quant="4bit"))
    fsdp = dict(BASE, batch_size=2, distributed="fsdp", save_steps=2)
    first = result(tmp_path, "q2", run(tmp_path, "q2", 2, model, fsdp, quant="4bit", stop_after=2))
    assert first["sharded_4bit"] is True and one["sharded_4bit"] is False
    assert first["packed_params_floating"] is True  # what torch 2.11's fully_shard needs (a CUDA failure)
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
    import peft  # the FSDP2 run's final adapter, gathered from the shards, is one PEFT loads
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft.PeftModel.from_pretrained(base, tmp_path / "q2" / "final")


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


def test_resume_with_dropout_gives_each_rank_its_own_rng(model, tmp_path):
    """LoRA dropout under DDP: every rank's RNG states go into the checkpoint, so 2 ranks resumed
    from step 2 draw the masks the uninterrupted 2-rank run drew (same losses and adapter); ranks
    restarted from rank 0's state would draw rank 0's masks on both ranks."""
    cfg = dict(BASE, batch_size=2, distributed="ddp", save_steps=2)
    whole = result(tmp_path, "w", run(tmp_path, "w", 2, model, cfg, dropout=0.3))
    first = result(tmp_path, "d", run(tmp_path, "d", 2, model, cfg, dropout=0.3, stop_after=2))
    assert first["losses"] == pytest.approx(whole["losses"][:2], rel=1e-6)
    rng = load_file(str(tmp_path / "d" / "checkpoint-2" / "rng.safetensors"))
    assert {"rank.0.torch", "rank.1.torch"} <= rng.keys() and not torch.equal(rng["rank.0.torch"], rng["rank.1.torch"])
    again = result(tmp_path, "d", run(tmp_path, "d", 2, model, dict(cfg, resume_from="latest"), dropout=0.3))
    assert_same_run(tmp_path / "d", tmp_path / "w", again, whole)


def test_fsdp_full_fine_tune_writes_sharded_checkpoints_that_resume_on_any_world_size(model, tmp_path):
    """A full fine-tune under FSDP2: save_steps writes each rank's shards (torch.distributed.checkpoint,
    nothing gathered); one process (no process group) and 2 FSDP2 ranks resume them to the losses
    and final weights of the uninterrupted one-process run; broken copies raise CheckpointError."""
    import shutil

    from torch.distributed.checkpoint import FileSystemReader

    ref = result(tmp_path, "one", run(tmp_path, "one", 1, model, dict(BASE, batch_size=4, distributed=None),
                                      full=True))
    fsdp = dict(BASE, batch_size=2, distributed="fsdp", save_steps=2)
    first = result(tmp_path, "f", run(tmp_path, "f", 2, model, fsdp, full=True, stop_after=2))
    assert first["losses"] == pytest.approx(ref["losses"][:2], rel=1e-6)
    saved = tmp_path / "f" / "checkpoint-2"
    assert not (saved / "trainable.safetensors").exists() and not (saved / "optimizer.pt").exists()
    # all ranks wrote into rank 0's one temporary directory, renamed into place whole
    assert json.loads((saved / ".minift-files.json").read_text())["files"] == [
        "optimizer.json", "rng.safetensors", "scheduler.json", "sharded", "trainer_state.json"]
    assert [p.name for p in (tmp_path / "f").iterdir() if p.name.startswith(".")] == []
    shards = saved / "sharded"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = FileSystemReader(shards).read_metadata()
    files: dict[str, set[str]] = {}
    for index, info in meta.storage_data.items():
        files.setdefault(index.fqn, set()).add(info.relative_path)
    params = {k: md for k, md in meta.state_dict_metadata.items() if k.startswith("model.")}
    assert sum(md.size.numel() for md in params.values()) == first["params"]  # every weight, once
    for key, md in meta.state_dict_metadata.items():
        if md.size.numel() > 1:  # a weight or an Adam moment (not a step count): half on each rank
            assert all(c.sizes[0] < md.size[0] for c in md.chunks), key  # no whole copy anywhere
            assert files[key] == {"__0_0.distcp", "__1_0.distcp"}, key
    assert len(params) > 0 and any(k.endswith(".exp_avg_sq") for k in meta.state_dict_metadata)
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken / "checkpoint-2")

    one = result(tmp_path, "f1", run(tmp_path, "f1", 1, model, dict(BASE, batch_size=4, distributed=None,
                                                                      resume_from=str(saved)), full=True))
    assert_same_run(tmp_path / "f1", tmp_path / "one", one, ref)
    two = result(tmp_path, "f", run(tmp_path, "f", 2, model, dict(fsdp, resume_from="latest"), full=True))
    assert_same_run(tmp_path / "f", tmp_path / "one", two, ref)
    assert (tmp_path / "f" / "checkpoint-4" / "sharded" / ".metadata").is_file()

    _broken_sharded_checkpoints_raise(model, broken)


def test_shards_round_trip_without_a_process_group_and_stateless_parameters_stay_stateless(tmp_path):
    """save_shards / load_shards in one process (DCP without a process group): weights, AdamW state
    and param groups come back exactly; a parameter that never had a gradient (no AdamW state)
    has none after loading either, rather than a refused checkpoint or a made-up step count."""
    from minift.train import distributed

    def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        m = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 4), "unused": torch.nn.Linear(4, 4)})
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.8, 0.9), foreach=True)

    torch.manual_seed(0)
    model, opt = make()
    for _ in range(2):
        model["used"](torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    (tmp_path / "groups.json").write_text(distributed.save_shards(model, opt, tmp_path / "s"))
    model2, opt2 = make()
    distributed.load_shards(model2, opt2, tmp_path / "s", tmp_path / "groups.json")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    want, got = opt.state_dict(), opt2.state_dict()
    assert got["param_groups"] == want["param_groups"] and got["param_groups"][0]["betas"] == (0.8, 0.9)
    assert sorted(got["state"]) == sorted(want["state"]) == [0, 1]  # "unused" has none
    assert all(torch.equal(got["state"][i][k], v) for i, st in want["state"].items() for k, v in st.items())


def _broken_sharded_checkpoints_raise(model: Path, good: Path) -> None:
    """Resuming a copy of the sharded checkpoint with a rank's file missing or truncated, its index
    cut, or on another model (adapters) raises CheckpointError naming the file or what differs."""
    import shutil

    import minift
    from minift.errors import CheckpointError
    from minift.train import TrainConfig, Trainer
    from train_utils import text_rows

    def resume(name: str, break_it, match: str, lora: bool = False) -> None:
        out = good.parent / name
        shutil.copytree(good, out)
        target = break_it(out / "checkpoint-2" / "sharded")
        m, tok = minift.load(model, full_finetuning=not lora)
        if lora:
            minift.add_lora(m, r=4, alpha=8, dropout=0.0, seed=5)
        cfg = TrainConfig(output_dir=str(out), resume_from="latest", progress_bar=False, plot=False, seed=11,
                          gradient_checkpointing=False, **dict(BASE, batch_size=4))
        trainer = Trainer(m, tok, text_rows(13, seed=3, max_words=12), config=cfg)
        with pytest.raises(CheckpointError, match=match.format(target=re.escape(target))):
            trainer.train()

    def truncate(d: Path) -> str:
        f = d / "__1_0.distcp"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return str(f)

    def cut_index(d: Path) -> str:
        f = d / ".metadata"
        f.write_bytes(f.read_bytes()[:100])
        return str(f)

    resume("missing", lambda d: (d / "__1_0.distcp").unlink() or str(d / "__1_0.distcp"), "{target}: missing")
    resume("truncated", truncate, "{target}: truncated")
    resume("index", cut_index, "{target}: unreadable")
    resume("lora", lambda d: str(d), "{target}: holds other tensors than this model", lora=True)


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
    spec.write_text(json.dumps({"model": str(model), "out": str(out), "slow": 1.0,
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
    assert (out / "RESULT.json").is_file(), f"torchrun exited {proc.returncode} without a result:\n{text[-5000:]}"
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
