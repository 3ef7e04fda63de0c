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


# ---- Ctrl-C ----------------------------------------------------------------------------------------

INTERRUPT_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {here!r})
torch.set_num_threads(1)
import minift.train.checkpoint as ckpt
from minift.train import Trainer, TrainingInterrupted
from test_train_resume import train
from pathlib import Path

batch = Trainer._batch
def slow_batch(self, units, idx):  # slow steps, so that the signal lands mid-run
    time.sleep(0.1)
    return batch(self, units, idx)
Trainer._batch = slow_batch
if {stall!r}:
    def stall(output_dir, step):  # the interrupt's checkpoint half-written: signal the test, wait
        (output_dir / ".saving").write_text(str(step))
        time.sleep(120)
    ckpt.before_commit = stall
try:
    train(Path({model!r}), Path({out!r}), save_steps=None)
except TrainingInterrupted as e:
    print("INTERRUPTED", e.step, e.checkpoint, e.last_checkpoint, flush=True)
    sys.exit(130)
print("FINISHED")
"""


def _spawn(llama, out: Path, stall: bool = False) -> subprocess.Popen:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    code = INTERRUPT_SCRIPT.format(here=str(HERE), model=str(llama), out=str(out), stall=stall)
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.time() + 120
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"training subprocess exited early: {proc.stdout.read()[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _logged(out: Path) -> int:
    f = out / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.is_file() else 0


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_same_losses(llama, tmp_path, reference):
    out = tmp_path / "run"
    proc = _spawn(llama, out)
    try:
        _wait_for(proc, lambda: _logged(out) >= 2, "step 2 to be logged")
        proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, text[-3000:]
    assert "Ctrl-C: stopping after this step" in text and "Traceback" not in text
    _, step, path, _ = next(ln for ln in text.splitlines() if ln.startswith("INTERRUPTED")).split()
    step = int(step)
    assert 2 <= step < STEPS and Path(path) == out / f"checkpoint-{step}"
    assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert not (out / "final").exists()
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, step + 1))
    resumed = train(llama, out, resume_from="latest", save_steps=None)
    assert resumed.resumed_from.endswith(f"checkpoint-{step}")
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-6, abs=0)
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, STEPS + 1))


def test_second_ctrl_c_while_saving_leaves_no_half_checkpoint(llama, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(llama, out, stall=True)
    try:
        _wait_for(proc, lambda: _logged(out) >= 2, "step 2 to be logged")
        proc.send_signal(signal.SIGINT)
        _wait_for(proc, (out / ".saving").exists, "the interrupt's checkpoint to be half-written")
        assert list(out.glob(".tmp-checkpoint-*"))  # the checkpoint being written, in its temporary
        proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, text[-3000:]
    line = next(ln for ln in text.splitlines() if ln.startswith("INTERRUPTED")).split()
    assert line[2:] == ["None", "None"]  # no checkpoint, none before it
    assert "no checkpoint was saved" in text
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".tmp-*"))  # nothing half-written left


def test_sigint_guard_defers_then_escalates_and_respects_other_handlers():
    from minift.train.interrupt import SigintGuard

    before = signal.getsignal(signal.SIGINT)
    with SigintGuard(escalate=True) as g:
        assert g.active
        signal.raise_signal(signal.SIGINT)  # the first: only recorded
        assert g.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the second: at once
        assert signal.getsignal(signal.SIGINT) is before
    with SigintGuard(escalate=False) as g:  # under torchrun: later signals are ignored
        for _ in range(3):
            signal.raise_signal(signal.SIGINT)
        assert g.requested
    assert signal.getsignal(signal.SIGINT) is before
    seen = []
    old = signal.signal(signal.SIGINT, lambda *a: seen.append(1))  # an application's own handler stays
    try:
        with SigintGuard(escalate=True) as g:
            signal.raise_signal(signal.SIGINT)
            assert not g.active and not g.requested and seen == [1]
    finally:
        signal.signal(signal.SIGINT, old)
