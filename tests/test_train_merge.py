"""TrainConfig.merge_micro_batches: the grad_accum micro-batches of a step run as one forward
compute bit for bit one batch of batch_size x grad_accum rows, and the unmerged run's losses and
LoRA updates up to the order of float sums (fp32, CPU: text rows of many lengths, packed rows,
Gemma 3 vision with images, its tower checkpointed one image at a time); the checkpointed tower's
backward holds one image's activations however many images a merged step has; "auto" resolves
as documented."""

from __future__ import annotations

import weakref

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from train_utils import llama, rel, single_thread, text_rows, trainable_state  # noqa: F401

import minift
from minift.errors import TrainConfigError
from minift.testing import write_tiny_gemma3_vision
from minift.train import TrainConfig, Trainer
from minift.train.offload import ActivationOffloader


def run(path, rows, tmp_path, merge, batch_size=2, grad_accum=3, **cfg):
    model, proc = minift.load(path)
    vision = cfg.pop("vision", False)
    minift.add_lora(model, r=4, alpha=8, seed=1, **({"vision": True, "language": True} if vision else {}))
    cfg.setdefault("gradient_checkpointing", False)
    before = trainable_state(model)
    layer0 = model.language_model.layers[0]
    calls, seen = [], []
    layer0.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    if vision:  # images a vision layer call takes, and whether the tower's offloading hooks are on
        tower = model.model.vision_tower
        tower.vision_model.encoder.layers[0].register_forward_pre_hook(
            lambda m, a: seen.append((a[0].shape[0], len(tower._forward_pre_hooks))))
    tr = Trainer(model, proc, rows, config=TrainConfig(
        output_dir=str(tmp_path / f"m{merge}{grad_accum}"), max_steps=3, batch_size=batch_size, grad_accum=grad_accum, lr=0.5,
        optimizer="sgd", merge_micro_batches=merge, progress_bar=False, plot=False, seed=5, **cfg))
    assert tr.merge is (merge and grad_accum > 1)
    losses = tr.train().losses
    if vision:
        assert not tower._forward_pre_hooks  # the offloader is removed after training
    # SGD: the update is the gradient itself (AdamW would blow rounding up in near-zero gradients)
    return losses, {n: p - before[n] for n, p in trainable_state(model).items()}, (calls, seen)


def check_same(path, rows, tmp_path, **cfg):
    """Merged: one forward of all six rows a step, bit for bit the step of one batch of six; the
    unmerged three micro-batches of two differ from both only in the order of float sums."""
    (l0, w0, (c0, _)), (l1, w1, (c1, s1)), (l2, w2, _) = (
        run(path, rows, tmp_path, m, **k, **dict(cfg))
        for m, k in ((False, {}), (True, {}), (False, dict(batch_size=6, grad_accum=1))))
    twice = 2 if cfg.get("gradient_checkpointing") else 1  # a checkpointed layer runs again in the backward
    assert c0 == [2] * 9 * twice and c1 == [6] * 3 * twice
    if cfg.get("gradient_checkpointing") and cfg.get("vision"):
        # one image a tower pass (forward and recompute), the offloading hooks on around the tower
        assert s1 and all(s == (1, 1) for s in s1), s1
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


@pytest.mark.parametrize("ckpt", [False, True])
def test_merged_vision_steps_equal_unmerged(tmp_path, ckpt):
    """Checkpointed, the tower runs one image at a time (its inputs offloaded), merged or not."""
    path = write_tiny_gemma3_vision(tmp_path / "v")
    check_same(path, vision_rows(18), tmp_path, vision=True, train_on_responses_only=True,
               gradient_checkpointing=ckpt)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages made under it that are still alive, and their peak since
    `reset` (exact on CPU: each storage counted once, until it is freed). `on_host(t)` stops
    counting t's storage: an offloaded tensor, which on a GPU lives in host memory."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if id(st) not in self.sizes:
            self.sizes[id(st)] = st.nbytes()
            self.live += st.nbytes()
            weakref.finalize(st, self._free, id(st))

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def on_host(self, t: torch.Tensor) -> None:
        key = id(t.untyped_storage())
        self.live -= self.sizes.get(key, 0)
        self.sizes[key] = 0

    def reset(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.peak = max(self.peak, self.live)
        return out


def vision_backward_peak(model, images: int, per_image: bool, offload: bool) -> int:
    """Peak bytes alive on the 'device' during the tower's backward of one checkpointed step over
    `images` images (what the offloader holds counted as host memory, as on a GPU)."""
    tower = model.model.vision_tower
    tower.vision_model.encoder.per_image = per_image
    off = ActivationOffloader(tower.vision_model.cfg.hidden_size).install(tower) if offload else None
    cfg = model.config
    ids = torch.full((images, cfg.mm_tokens_per_image + 6), 5)
    ids[:, 2:2 + cfg.mm_tokens_per_image] = cfg.image_token_index
    pixels = torch.randn(images, 3, cfg.vision.image_size, cfg.vision.image_size)
    live = LiveBytes()

    def at_features(mod, args, out):  # the decoder's backward is done when the features' grad comes
        out.register_hook(lambda g: live.reset())

    hook = model.model.multi_modal_projector.register_forward_hook(at_features)
    with live:
        loss = model(ids, pixel_values=pixels, labels=ids).loss
        for h in off.handles if off is not None else []:
            live.on_host(h.host)
        loss.backward()
    hook.remove()
    if off is not None:
        off.remove()
    model.zero_grad(set_to_none=True)
    return live.peak


def test_checkpointed_tower_backward_holds_one_image(tmp_path):
    """A merged step's tower (four images, checkpointed, LoRA on it) holds during its backward
    what one image's step holds, plus a gradient per extra image: its saved layer inputs are one
    image each and offloaded, and each layer's recompute takes one image. All four images at
    once (before) kept every layer's input of every image and recomputed four images a layer."""
    path = write_tiny_gemma3_vision(tmp_path / "v", vision=dict(hidden_size=128, intermediate_size=256,
                                                                num_hidden_layers=4, image_size=128))
    model, _ = minift.load(path)
    minift.add_lora(model, r=4, alpha=8, seed=1, vision=True, language=True)
    model.train()
    model.model.gradient_checkpointing = True
    v = model.config.vision
    one = v.num_patches * v.hidden_size * 4  # one image's input to one encoder layer, fp32
    n, layers = 4, v.num_hidden_layers
    single = vision_backward_peak(model, 1, True, True)
    merged = vision_backward_peak(model, n, True, True)
    before = vision_backward_peak(model, n, False, False)
    assert merged <= single + (n - 1) * 2 * one, (single / one, merged / one)
    assert before >= single + (n - 1) * layers * one, (single / one, before / one)


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
