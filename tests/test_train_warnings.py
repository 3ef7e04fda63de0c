"""Loss warnings: a loss that does not move (lr=1e6, lr=0) or explodes warns once with
LossWarning; a normal run warns nothing; the thresholds are checked TrainConfig fields."""

from __future__ import annotations

import warnings

import pytest
from train_utils import build_model, llama, load_full, one_thread, single_thread, text_rows  # noqa: F401 (fixtures)

from minift.errors import TrainConfigError
from minift.train import LossWarning, TrainConfig, Trainer
from minift.train.monitor import LossMonitor


def run(path, tmp, full=False, rows=None, **kw):
    model, tok = load_full(path) if full else build_model(path)
    base = dict(output_dir=str(tmp), max_steps=12, batch_size=2, grad_accum=1, seed=1, progress_bar=False,
                plot=False, gradient_checkpointing=False)
    base.update(kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = Trainer(model, tok, rows or text_rows(16, seed=2), config=TrainConfig(**base)).train()
    return s, [str(w.message) for w in caught if issubclass(w.category, LossWarning)]


def test_huge_lr_loss_not_moving_warns_once(llama, tmp_path):
    s, got = run(llama, tmp_path, lr=1e6, max_steps=16)  # saturates: a constant loss, a zero gradient
    assert max(s.losses[1:]) - min(s.losses[1:]) < 1e-6 * s.losses[-1]
    assert len(got) == 1, got
    assert "not moving" in got[0] and "gradient norm is 0" in got[0] and "learning_rate" in got[0]
    assert "step 11" in got[0]  # steps 2..11: loss_stall_steps=10 constant steps


def test_zero_lr_warns_not_moving(llama, tmp_path):
    s, got = run(llama, tmp_path, lr=0.0, loss_stall_steps=4, max_steps=6)
    assert len(got) == 1 and "learning rate is 0" in got[0], got
    # a whole-dataset batch each step: the loss itself is flat too
    s, got = run(llama, tmp_path / "b", rows=text_rows(4, seed=2), batch_size=4, lr=0.0, max_steps=6,
                 loss_stall_steps=5)
    assert len(got) == 1 and "loss stayed at" in got[0], got


def test_exploding_loss_warns_once(llama, tmp_path):
    s, got = run(llama, tmp_path, full=True, lr=1.0, max_steps=8)  # full fine-tune, AdamW at lr 1
    assert max(s.losses) > 3 * s.losses[0]
    assert len(got) == 1, got
    assert "exploding" in got[0] and "lower learning_rate" in got[0]


def test_normal_run_warns_nothing(llama, tmp_path):
    s, got = run(llama, tmp_path, lr=2e-3, max_steps=14)
    assert s.losses[-1] < s.losses[0]
    assert got == []


def test_monitor_rules():
    m = LossMonitor(3.0, 3, 1e-5)
    # one hard batch after the loss fell far stays below step 1's loss: no warning
    assert [m.observe(i + 1, v, 1.0, 1e-3) for i, v in enumerate([2.0, 1.0, 0.3, 0.2, 0.2, 1.5])] == [[]] * 6
    got = [m.observe(7 + i, v, 1.0, 1e-3) for i, v in enumerate([4.0, 4.5, 5.0, 9.0])]
    assert [len(x) for x in got] == [0, 1, 0, 0]  # the running mean passes step 1's loss at step 8; once
    off = LossMonitor(None, None, 0.0)
    assert all(off.observe(i, v, 0.0, 0.0) == [] for i, v in enumerate([1.0, 9.0, 99.0, 99.0, 99.0]))


@pytest.mark.parametrize("field, value", [("loss_explosion_factor", 1.0), ("loss_explosion_factor", "3"),
                                          ("loss_stall_steps", 1), ("loss_stall_steps", 2.5),
                                          ("loss_stall_tolerance", -1e-3), ("loss_stall_tolerance", True)])
def test_threshold_fields_are_checked(field, value):
    with pytest.raises(TrainConfigError, match=field):
        TrainConfig(**{field: value}).validate()
