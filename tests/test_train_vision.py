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
    assert ex.n_images == 1 and ex.pixels() is not None
    assert tok.decode(ex.labels[ex.labels != -100]) == "\\color{red}<end_of_turn>\n"
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
    graph of its own), with merged micro-batches of several images; each traced in one attempt."""
    from torch._dynamo.utils import counters

    path = write_tiny_gemma3_vision(tmp_path / "v")
    model, processor = minift.load(path)
    minift.add_lora(model, r=4, alpha=8, vision=True, language=True, seed=0)
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=1, batch_size=2, grad_accum=2, compile=True,
                      merge_micro_batches=True, progress_bar=False, plot=False)
    from torch._dynamo.utils import compilation_time_metrics

    torch._dynamo.reset()
    counters.clear()
    compilation_time_metrics.clear()
    Trainer(model, processor, rows(4), config=cfg).train()
    assert counters["stats"]["unique_graphs"] == 2
    # traced once: Python floats are constants (trainer.compile_settings), so no restart specialises them
    assert "compile_attempt_0" in compilation_time_metrics and "compile_attempt_1" not in compilation_time_metrics


def _two_images(i: int) -> dict:
    a, b = Image.new("RGB", (16, 40), (i, 0, 0)), Image.new("RGB", (40, 16), (0, i, 0))
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "and"},
                                     {"type": "image", "image": b}]},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
        {"role": "user", "content": [{"type": "text", "text": "again?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]}


def _processed(processor, row: dict) -> dict:
    """What the processor itself makes of a row: the reference for ids, token types and pixels."""
    from minift.train.formats import images_of, normalize_row

    msgs = normalize_row(row, 0)["messages"]
    text = processor.apply_chat_template(msgs, tokenize=False)
    return processor(text=[text], images=[images_of(msgs)], return_tensors="pt", add_special_tokens=False)


@pytest.mark.parametrize("fast", [True, False], ids=["text-expansion", "processor-each-row"])
def test_vision_rows_hold_no_pixels_until_collated(tmp_path, fast, monkeypatch):
    """A vision dataset keeps token ids only: each row's pixels are made by the processor when its
    batch is collated (a list of dicts, or a datasets.Dataset whose images are decoded again), and
    equal the processor's own output, as do the ids and token types; with or without the
    text-only expansion of image placeholders (checked against the processor on probes)."""
    from datasets import Dataset

    from minift.train.data import collate

    path = write_tiny_gemma3_vision(tmp_path / "v")
    model, processor = minift.load(path)
    minift.add_lora(model, r=4, alpha=8, vision=True, language=True, seed=0)
    if not fast:  # no fixed expansion known: the processor runs on each row
        from minift.train.tokenize import Encoder

        monkeypatch.setattr(Encoder, "_image_text", lambda self: None)
    data = rows(5) + [_two_images(1), _two_images(2)]
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=1, batch_size=2, progress_bar=False, plot=False,
                      train_on_responses_only=True)
    for ds in (data, Dataset.from_list(data)):
        trainer = Trainer(model, processor, ds, config=cfg)
        assert (trainer.encoder._image_text() is not None) == fast
        units = trainer.train_units
        assert all(u.pixel_values is None for u in units) and [u.n_images for u in units] == [1] * 5 + [2, 2]
        want = [_processed(processor, r) for r in data]
        for u, w in zip(units, want):
            assert torch.equal(u.input_ids, w["input_ids"][0])
            assert torch.equal(u.token_type_ids, w["token_type_ids"][0])
            assert torch.equal(u.labels[u.token_type_ids == 1], torch.full_like(u.labels[u.token_type_ids == 1], -100))
        batch = collate(units[4:], trainer.pad_id).tensors
        assert torch.equal(batch["pixel_values"], torch.cat([w["pixel_values"] for w in want[4:]]))
    # the responses-only labels of a two-image row: both assistant turns, nothing else
    tok = processor.tokenizer
    assert tok.decode(units[5].labels[units[5].labels != -100]) == "two<end_of_turn>\nyes<end_of_turn>\n"


def test_pan_and_scan_processes_each_row(tmp_path):
    """Pan-and-scan crops depend on each image's size, so a processor set to crop gets no text-only
    expansion: every row goes through the processor, and its ids are the processor's."""
    from minift.train.tokenize import make_encoder

    _, processor = minift.load(write_tiny_gemma3_vision(tmp_path / "v"))
    assert make_encoder(processor, max_length=512, responses_only=False)._image_text() is not None
    processor.image_processor.do_pan_and_scan = True
    enc = make_encoder(processor, max_length=512, responses_only=False)
    assert enc._image_text() is None
    from minift.train.formats import normalize_row

    row = rows(1)[0]
    assert torch.equal(enc.encode(normalize_row(row, 0)).input_ids, _processed(processor, row)["input_ids"][0])


def test_vision_row_with_a_wrong_image_count_is_refused(tmp_path):
    from minift.errors import DataError

    path = write_tiny_gemma3_vision(tmp_path / "v")
    model, processor = minift.load(path)
    minift.add_lora(model, r=4, alpha=8, seed=0)
    row = rows(1)[0]
    row["messages"][0]["content"].append({"type": "text", "text": "<start_of_image>"})  # a placeholder too many
    with pytest.raises(DataError, match="2 image placeholders.*1 images"):
        Trainer(model, processor, [row], config=TrainConfig(output_dir=str(tmp_path / "o"), max_steps=1))


def test_an_image_that_cannot_be_decoded_names_its_row(tmp_path):
    """Pixels are made when a batch is collated, so a corrupt image surfaces there: as a DataError
    naming the dataset row, not the image library's own error."""
    import io

    from minift.errors import DataError

    path = write_tiny_gemma3_vision(tmp_path / "v")
    model, processor = minift.load(path)
    minift.add_lora(model, r=4, alpha=8, seed=0)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    broken = Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))  # the header reads, the data does not
    data = rows(3)
    data[2]["messages"][0]["content"][1]["image"] = broken
    cfg = TrainConfig(output_dir=str(tmp_path / "o"), max_steps=3, batch_size=1, grad_accum=1, shuffle=False,
                      progress_bar=False, plot=False)  # row 2 is step 3's, collated on the thread during step 2
    trainer = Trainer(model, processor, data, config=cfg)
    with pytest.raises(DataError, match="train_dataset row 2: its images could not be processed"):
        trainer.train()
    assert trainer.step == 2  # the steps before the one that needs the row ran
