"""Checkpoint / resume: an interrupted run (stopped, or SIGKILLed in the middle of a save) resumes
to the same losses as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_utils import build_model, llama, one_thread, single_thread, text_rows, tiny_llama  # noqa: F401 (fixtures)

from minift.train import TrainConfig, Trainer

HERE = Path(__file__).parent
STEPS = 8




def config(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=STEPS, batch_size=2, grad_accum=2, lr=2e-3, warmup_steps=2,
                scheduler="cosine", weight_decay=0.01, save_steps=2, seed=11, progress_bar=False, plot=False,
                gradient_checkpointing=False)
    base.update(kw)
    return TrainConfig(**base)


def train(path: Path, out: Path, **kw):
    model, tok = build_model(path)
    return Trainer(model, tok, text_rows(12, seed=2), config=config(out, **kw)).train()


@pytest.fixture(scope="module")
def reference(llama, tmp_path_factory):
    with one_thread():
        return train(llama, tmp_path_factory.mktemp("ref"))


class Stop(Exception):
    pass


def test_stop_and_resume_continues_exact_losses(llama, tmp_path, reference, monkeypatch):
    orig = Trainer.save_checkpoint

    def save_then_stop(self):
        p = orig(self)
        if self.step == 4:
            raise Stop
        return p

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        train(llama, tmp_path)
    monkeypatch.setattr(Trainer, "save_checkpoint", orig)
    resumed = train(llama, tmp_path, resume_from="latest")
    assert resumed.resumed_from.endswith("checkpoint-4")
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-6, abs=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    # an explicit directory works the same, and save_total_limit prunes old checkpoints
    again = train(llama, tmp_path, resume_from=str(tmp_path / "checkpoint-6"), save_total_limit=2)
    assert again.losses == pytest.approx(reference.losses, rel=1e-6, abs=0)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]


SCRIPT = """
import sys, time, torch
sys.path.insert(0, {here!r})
torch.set_num_threads(1)
import minift.train.checkpoint as ckpt
from test_train_resume import train
from pathlib import Path

def stall(output_dir, step):  # checkpoint-4 half-written: signal the test, wait to be killed
    if step == 4:
        (output_dir / ".saving").write_text(str(step))
        time.sleep(120)

ckpt.before_commit = stall
train(Path({model!r}), Path({out!r}))
"""


def test_sigkill_during_save_resumes_from_last_complete(llama, tmp_path, reference):
    out = tmp_path / "run"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    code = SCRIPT.format(here=str(HERE), model=str(llama), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (out / ".saving").exists():
            if proc.poll() is not None:
                raise AssertionError(f"training subprocess exited early: {proc.stdout.read().decode()[-3000:]}")
            assert time.time() < deadline, "the save hook was never reached"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = list(out.glob(".tmp-checkpoint-4-*"))
    assert partial and (partial[0] / "trainable.safetensors").is_file()  # killed mid-save
    assert not (out / "checkpoint-4").exists() and (out / "checkpoint-2" / "trainer_state.json").is_file()
    resumed = train(llama, out, resume_from="latest")
    assert resumed.resumed_from.endswith("checkpoint-2")
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-6, abs=0)
    assert not list(out.glob(".tmp-checkpoint-*"))  # the partial save was cleaned up
    assert (out / "checkpoint-8").is_dir()


def test_resume_refuses_changed_batching(llama, tmp_path):
    from minift.errors import TrainConfigError

    train(llama, tmp_path, max_steps=2)
    with pytest.raises(TrainConfigError, match="batch_size"):
        train(llama, tmp_path, resume_from="latest", batch_size=4, grad_accum=1)
