"""Vision fine-tuning: tiny Gemma 3 vision model, 4-bit base on CPU, LoRA on the vision tower and
the language model, a synthetic image → text dataset in the LaTeX-OCR row shape."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from train_utils import one_thread, single_thread  # noqa: F401 (fixtures)

import minift
from minift.testing import write_tiny_gemma3_vision
from minift.train import TrainConfig, Trainer

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}



def rows(n: int) -> list[dict]:
    """unsloth's LaTeX-OCR conversation shape: user text + image, assistant text."""
    out = []
    for i in range(n):
        name = list(COLORS)[i % len(COLORS)]
        img = Image.new("RGB", (24 + i % 3 * 8, 32), COLORS[name])
        out.append({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "Write the color."}, {"type": "image", "image": img}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"\\color{{{name}}}"}]},
        ]})
    return out


def test_vision_4bit_lora_trains_saves_and_reloads(tmp_path):
    path = write_tiny_gemma3_vision(tmp_path / "v")
    model, processor = minift.load(path, load_in_4bit=True)
    minift.add_lora(model, r=8, alpha=16, vision=True, language=True, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=12, batch_size=4, grad_accum=1, lr=1e-2,
                      train_on_responses_only=True, gradient_checkpointing="offload", progress_bar=False, plot=False,
                      save_steps=6)
    data = rows(16)
    trainer = Trainer(model, processor, data, eval_dataset=rows(4), config=cfg)
    ex = trainer.train_units[0]
    tok = processor.tokenizer
    assert ex.pixel_values is not None and tok.decode(ex.labels[ex.labels != -100]) == "\\color{red}<end_of_turn>\n"
    summary = trainer.train()
    assert sum(summary.losses[-3:]) < sum(summary.losses[:3]) - 0.5
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any("vision_tower" in n for n in moved) and any("language_model" in n for n in moved)
    final = tmp_path / "out" / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "checkpoint-6" / "adapter" / "adapter_model.safetensors").is_file()

    reloaded, _ = minift.load(path, load_in_4bit=True)
    minift.load_adapter(reloaded, final)
    cfg2 = TrainConfig(output_dir=str(tmp_path / "eval"), max_steps=1, batch_size=4, train_on_responses_only=True,
                       progress_bar=False)
    again = Trainer(reloaded, processor, data, eval_dataset=rows(4), config=cfg2).evaluate()
    assert again == pytest.approx(summary.eval_loss, rel=1e-5)


def test_compiled_vision_trainer_compiles_one_graph_per_stack(tmp_path):
    """compile=True on a vision model: every decoder layer shares one compiled graph and every
    tower layer another (each stack's first layer's input made to require grad, so it is no
    graph of its own), with merged micro-batches of several images."""
    from torch._dynamo.utils import counters

    path = write_tiny_gemma3_vision(tmp_path / "v")
    model, processor = minift.load(path)
    minift.add_lora(model, r=4, alpha=8, vision=True, language=True, seed=0)
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=1, batch_size=2, grad_accum=2, compile=True,
                      merge_micro_batches=True, progress_bar=False, plot=False)
    torch._dynamo.reset()
    counters.clear()
    Trainer(model, processor, rows(4), config=cfg).train()
    assert counters["stats"]["unique_graphs"] == 2
