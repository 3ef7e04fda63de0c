"""TrainConfig.merge_micro_batches: the grad_accum micro-batches of a step run as one forward
compute bit for bit one batch of batch_size x grad_accum rows, and the unmerged run's losses and
LoRA updates up to the order of float sums (fp32, CPU: text rows of many lengths, packed rows,
Gemma 3 vision with images); "auto" resolves as documented."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from train_utils import llama, rel, single_thread, text_rows, trainable_state  # noqa: F401

import minift
from minift.errors import TrainConfigError
from minift.testing import write_tiny_gemma3_vision
from minift.train import TrainConfig, Trainer


def run(path, rows, tmp_path, merge, batch_size=2, grad_accum=3, **cfg):
    model, proc = minift.load(path)
    minift.add_lora(model, r=4, alpha=8, seed=1, **({"vision": True, "language": True} if "vision" in cfg else {}))
    cfg.pop("vision", None)
    before = trainable_state(model)
    layer0 = model.language_model.layers[0]
    calls = []
    layer0.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    tr = Trainer(model, proc, rows, config=TrainConfig(
        output_dir=str(tmp_path / f"m{merge}{grad_accum}"), max_steps=3, batch_size=batch_size, grad_accum=grad_accum, lr=0.5,
        optimizer="sgd",
        gradient_checkpointing=False, merge_micro_batches=merge, progress_bar=False, plot=False, seed=5, **cfg))
    assert tr.merge is (merge and grad_accum > 1)
    losses = tr.train().losses
    # SGD: the update is the gradient itself (AdamW would blow rounding up in near-zero gradients)
    return losses, {n: p - before[n] for n, p in trainable_state(model).items()}, calls


def check_same(path, rows, tmp_path, **cfg):
    """Merged: one forward of all six rows a step, bit for bit the step of one batch of six; the
    unmerged three micro-batches of two differ from both only in the order of float sums."""
    (l0, w0, c0), (l1, w1, c1), (l2, w2, _) = (
        run(path, rows, tmp_path, m, **k, **dict(cfg))
        for m, k in ((False, {}), (True, {}), (False, dict(batch_size=6, grad_accum=1))))
    assert c0 == [2] * 9 and c1 == [6] * 3
    assert l1 == l2 and all(torch.equal(w1[n], w2[n]) for n in w2)
    for a, b in zip(l0, l1):
        assert abs(a - b) <= 1e-6 * abs(a), (l0, l1)
    for n in w0:
        assert rel(w1[n], w0[n]) <= 5e-5, n  # three steps compound the rounding (lr 0.5)


def test_merged_text_steps_equal_unmerged(llama, tmp_path):  # noqa: F811
    check_same(llama, text_rows(18, seed=3, min_words=2, max_words=40), tmp_path)


def test_merged_packed_steps_equal_unmerged(llama, tmp_path):  # noqa: F811
    check_same(llama, text_rows(60, seed=4, min_words=2, max_words=30), tmp_path, packing=True, max_seq_length=60)


def vision_rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        img = Image.new("RGB", (24 + i % 3 * 8, 32), (40 * i % 255, 90, 200))
        words = " ".join(["x"] * (1 + i % 5))
        out.append({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "Describe."}, {"type": "image", "image": img}]},
            {"role": "assistant", "content": [{"type": "text", "text": words}]},
        ]})
    return out


def test_merged_vision_steps_equal_unmerged(tmp_path):
    path = write_tiny_gemma3_vision(tmp_path / "v")
    check_same(path, vision_rows(18), tmp_path, vision=True, train_on_responses_only=True)


def test_auto_resolution(llama, tmp_path):  # noqa: F811
    model, tok = minift.load(llama)
    minift.add_lora(model, r=4, alpha=8)

    def merge(**cfg):
        base = dict(output_dir=str(tmp_path), max_steps=1, progress_bar=False, plot=False)
        return Trainer(model, tok, text_rows(8), config=TrainConfig(**{**base, **cfg})).merge

    assert merge() is False  # "auto" on CPU: off
    assert merge(merge_micro_batches=True) is True
    assert merge(merge_micro_batches=True, grad_accum=1) is False  # nothing to merge
    assert merge(merge_micro_batches=False) is False
    with pytest.raises(TrainConfigError, match="merge_micro_batches"):
        TrainConfig(merge_micro_batches="sometimes").validate()
