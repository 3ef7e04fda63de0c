"""One training run, as a test's torchrun worker (or a plain process for the reference):

    torchrun --standalone --nproc_per_node 2 dist_worker.py SPEC.json

SPEC holds the checkpoint path, the output dir, TrainConfig fields and `quant`/`full`/`dtype`/
`fail_rank`/`stop_after`/`slow` (seconds each micro-batch sleeps, so a test's signal lands mid-run).
Rank 0 writes RESULT.json in the output dir: losses, tokens, world size, parameter count, whether the
4-bit weights are (sharded) DTensors and the decoder layers compiled (and, after Ctrl-C, the step and
checkpoint)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # train_utils; this checkout's minift
torch.set_num_threads(1)

import minift  # noqa: E402
from minift.train import TrainConfig, Trainer, TrainingInterrupted  # noqa: E402
from minift.quant.linear4bit import Linear4bit  # noqa: E402
from minift.train.report import count_parameters  # noqa: E402
from train_utils import text_rows  # noqa: E402


def image_rows(n: int) -> list[dict]:
    """Chats where only every third row has an image: most micro-batches of a rank have none."""
    from PIL import Image

    rows = []
    for i in range(n):
        user = [{"type": "text", "text": f"Row {i}."}]
        if i % 3 == 0:
            user.append({"type": "image", "image": Image.new("RGB", (32, 24), (20 * i % 255, 99, 7))})
        rows.append({"messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": [{"type": "text", "text": "ok " * (1 + i % 4)}]}]})
    return rows


class _Stop(Exception):
    """Raised after the checkpoint of step `stop_after`, as if the job had been stopped there."""


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("slow"):
        batch = Trainer._batch

        def slow_batch(self, units, idx):
            time.sleep(spec["slow"])
            return batch(self, units, idx)

        Trainer._batch = slow_batch
    full = bool(spec.get("full"))  # full fine-tuning: every weight trained, no adapters
    model, tok = minift.load(spec["model"], load_in_4bit=spec.get("quant") == "4bit", full_finetuning=full,
                             dtype=spec.get("dtype"))
    vision = bool(spec.get("vision"))
    if not full:
        minift.add_lora(model, r=4, alpha=8, dropout=spec.get("dropout", 0.0), seed=5,
                        **({"vision": True, "language": True} if vision else {}))
    cfg = TrainConfig(**{"output_dir": spec["out"], "progress_bar": False, "plot": False,
                         "gradient_checkpointing": False, "lr": 2e-3, "warmup_steps": 1, "seed": 11,
                         **spec["config"]})
    n = spec.get("rows", 13)
    rows = image_rows(n) if vision else text_rows(n, seed=3, max_words=spec.get("max_words", 12))
    trainer = Trainer(model, tok, rows, config=cfg)
    if spec.get("fail_rank") is not None and trainer.world.rank == spec["fail_rank"]:
        raise RuntimeError(f"rank {trainer.world.rank} fails on purpose")
    stop_after = spec.get("stop_after")
    if stop_after is not None:
        save = trainer.save_checkpoint

        def save_then_stop():
            path = save()
            if trainer.step == stop_after:
                raise _Stop
            return path

        trainer.save_checkpoint = save_then_stop
    extra = {}
    try:
        summary = trainer.train()
        losses, tokens = summary.losses, summary.tokens
    except _Stop:
        losses, tokens = trainer.losses, trainer.tokens
    except TrainingInterrupted as e:
        losses, tokens = trainer.losses, trainer.tokens
        extra = {"interrupted": e.step, "checkpoint": str(e.checkpoint)}
    packed = [m.weight for m in model.modules() if isinstance(m, Linear4bit)]
    sharded = all(hasattr(w, "to_local") and w.to_local().numel() < w.numel() for w in packed) if packed else None
    extra["sharded_4bit"] = sharded
    extra["fsdp_4bit"] = all(hasattr(w, "to_local") for w in packed) if packed else None  # DTensors, any world
    # torch 2.11's FSDP2 re-makes each sharded parameter with requires_grad=True before freezing it:
    # the packed bytes must sit in a dtype that allows that (a 1-byte float view, not uint8)
    extra["packed_params_floating"] = all(w.is_floating_point() for w in packed) if packed else None
    lm = getattr(model, "language_model", None)
    extra["compiled"] = lm is not None and all(getattr(m, "_compiled_call_impl", None) is not None for m in lm.layers)
    if trainer.world.main:
        Path(spec["out"], "RESULT.json").write_text(json.dumps(
            {"losses": losses, "tokens": tokens, "world": trainer.world.size, "params": count_parameters(model),
             **extra}))
    if "interrupted" in extra:
        raise SystemExit(130)


if __name__ == "__main__":
    main(sys.argv[1])
