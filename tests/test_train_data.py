"""Formatting, responses-only masking, packing and collation, and the up-front input checks."""

from __future__ import annotations

import pytest
import torch
from train_utils import chat_rows, llama, load_full, one_thread, single_thread, text_rows, tiny_llama  # noqa: F401 (fixtures)

from minift.testing import tiny_tokenizer
from minift.errors import DataError, TrainConfigError
from minift.train import TrainConfig, Trainer
from minift.train.data import Schedule, collate, pack
from minift.train.formats import normalize_row
from minift.train.tokenize import IGNORE, make_encoder

END = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>\n", "chatml": "<|im_end|>\n"}




def label_runs(tok, ex) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs, cur = [], []
    for i, l in zip(ex.input_ids.tolist(), ex.labels.tolist()):
        if l == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert l == i
            cur.append(i)
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("template", ["llama3", "gemma", "chatml"])
def test_responses_only_masks_all_but_assistant_turns(template):
    tok = tiny_tokenizer(template=template)
    enc = make_encoder(tok, max_length=512, responses_only=True)
    ex = enc.encode(normalize_row(chat_rows(3)[2], 0))
    assert label_runs(tok, ex) == ["It is 4." + END[template], "8." + END[template]]
    # without masking every token is a target, and the ids are the template's rendering
    full = make_encoder(tok, max_length=512, responses_only=False).encode(normalize_row(chat_rows(3)[2], 0))
    assert torch.equal(full.input_ids, ex.input_ids) and torch.equal(full.labels, full.input_ids)
    rendered = tok.apply_chat_template(chat_rows(3)[2]["messages"], tokenize=False)
    assert tok.decode(ex.input_ids) == rendered


@pytest.mark.parametrize("template", ["llama3", "gemma", "chatml"])
def test_responses_only_slow_path_matches_offsets(template):
    """The prefix-tokenising path (slow tokenizers) labels the same tokens as the offsets path."""
    tok = tiny_tokenizer(template=template)
    enc = make_encoder(tok, max_length=512, responses_only=True)
    row = normalize_row(chat_rows(5)[4], 0)
    fast = enc.encode(row)
    enc.has_offsets = False
    slow = enc.encode(row)
    assert torch.equal(fast.labels, slow.labels)


def test_sharegpt_and_prompt_completion_formats():
    tok = tiny_tokenizer(template="chatml")
    enc = make_encoder(tok, max_length=512, responses_only=True)
    share = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                               {"from": "gpt", "value": "Hello."}]}
    msgs = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}]}
    a, b = enc.encode(normalize_row(share, 0)), enc.encode(normalize_row(msgs, 0))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    pc = enc.encode(normalize_row({"prompt": "Two plus two is", "completion": " four."}, 0))
    assert label_runs(tok, pc) == [" four.<eos>"]
    conv_pc = enc.encode(normalize_row({"prompt": msgs["messages"][:2], "completion": msgs["messages"][2:]}, 0))
    assert torch.equal(conv_pc.labels, b.labels)
    text = make_encoder(tok, max_length=512, responses_only=False).encode(normalize_row({"text": "a cat"}, 0))
    assert tok.decode(text.input_ids) == "a cat<eos>" and torch.equal(text.labels, text.input_ids)


def test_formatting_func_and_arrow_content_parts():
    tok = tiny_tokenizer(template="llama3")
    enc = make_encoder(tok, max_length=512, responses_only=True)
    row = normalize_row({"q": "Hi?", "a": "Yo."}, 0, lambda r: {"messages": [
        {"role": "user", "content": [{"type": "text", "text": r["q"], "image": None}]},  # Arrow's None fields
        {"role": "assistant", "content": r["a"]}]})
    assert label_runs(tok, enc.encode(row)) == ["Yo.<|eot_id|>"]
    assert normalize_row({"x": 1}, 0, lambda r: "plain text")["kind"] == "text"


def test_template_mismatch_is_found():
    """A template whose prefixes are not prefixes of the whole (a marker on the last turn) falls
    back to locating each turn's content; one that renders turns out of order is an error."""
    tok = tiny_tokenizer(template="chatml")
    tok.chat_template = ("{% for message in messages %}{{ message['role'] + ': ' + message['content'] }}"
                         "{% if loop.last %} [end]{% endif %}{{ '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    enc = make_encoder(tok, max_length=512, responses_only=True)
    assert label_runs(tok, enc.encode(normalize_row(chat_rows(2)[1], 0))) == ["It is 2.", "4."]
    tok.chat_template = ("{% for message in messages|reverse %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="template mismatch"):
        enc.encode(normalize_row(chat_rows(2)[1], 0))


def test_packing_layout_and_boundaries():
    tok = tiny_tokenizer()
    enc = make_encoder(tok, max_length=40, responses_only=False)
    exs = [enc.encode(normalize_row(r, i)) for i, r in enumerate(text_rows(9))]
    rows = pack(exs, 40)
    assert len(rows) < len(exs) and sum(len(r) for r in rows) == sum(len(e) for e in exs)
    assert all(len(r) <= 40 for r in rows)
    for r in rows:  # the first token of every packed sequence has no label, positions restart there
        starts = (r.position_ids == 0).nonzero().flatten()
        assert (r.labels[starts] == IGNORE).all()
    b = collate(rows[:2], pad_id=0)
    assert "attention_mask" not in b.tensors and "position_ids" in b.tensors
    # the same examples unpacked: same target count, padding masked
    u = collate(exs, pad_id=0)
    p = collate(rows, pad_id=0)
    assert u.n_targets == p.n_targets == sum(e.n_targets for e in exs)
    assert (u.tensors["labels"][u.tensors["attention_mask"] == 0] == IGNORE).all()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
def test_packed_loss_and_grads_equal_unpacked(tmp_path, family):
    """Also with sliding windows (shorter than the sequences) and soft-capping."""
    from minift.testing import write_tiny_checkpoint

    model, tok = load_full(write_tiny_checkpoint(tmp_path, family))
    model.train()
    enc = make_encoder(tok, max_length=48, responses_only=False)
    exs = [enc.encode(normalize_row(r, i)) for i, r in enumerate(text_rows(7, seed=1))]
    rows = pack(exs, 48)
    assert len(rows) < len(exs)

    def run(batch):
        model.zero_grad(set_to_none=True)
        out = model(**batch.tensors, loss_normalizer=float(batch.n_targets))
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    lu, gu = run(collate(exs, tok.pad_token_id))
    lp, gp = run(collate(rows, tok.pad_token_id))
    assert abs(lu.item() - lp.item()) <= 1e-6 * abs(lu.item())
    for n in gu:
        assert ((gu[n] - gp[n]).norm() / gu[n].norm()).item() <= 1e-5, n
    # without the first-token masking a sequence would be trained to predict the next one's start
    bad = [r for r in rows if (r.position_ids == 0).sum() > 1][0]
    fixed = bad.labels.clone()
    bad.labels[bad.position_ids == 0] = bad.input_ids[bad.position_ids == 0]
    bad.labels[0] = IGNORE
    assert collate([bad], 0).n_targets > int((fixed[1:] != IGNORE).sum())


def test_schedule_order_independent_of_micro_batching():
    a = Schedule(10, batch_size=4, grad_accum=1, seed=7)
    b = Schedule(10, batch_size=1, grad_accum=4, seed=7)
    for step in range(7):
        assert sum(a.step_units(step), []) == sum(b.step_units(step), [])
    assert a.steps_per_epoch == 3 and a.step_units(2) == [a.order(0)[8:]]
    assert a.order(0) != a.order(1)


# -- bad inputs: clear errors before any step -----------------------------------------------
def test_bad_inputs(llama, tmp_path):
    model, tok = load_full(llama)
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=1)
    with pytest.raises(DataError, match=r"hold no supported format.*'text'.*'messages'.*'conversations'"):
        Trainer(model, tok, [{"question": "a", "answer": "b"}], config=cfg)
    with pytest.raises(DataError, match="empty"):
        Trainer(model, tok, [], config=cfg)
    from PIL import Image

    img_row = {"messages": [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (8, 8))},
                                                          {"type": "text", "text": "What?"}]},
                            {"role": "assistant", "content": "A square."}]}
    with pytest.raises(DataError, match="processor"):
        Trainer(model, tok, [img_row], config=cfg)
    ocr_row = {"image": Image.new("RGB", (8, 8)), "text": "x^2"}  # LaTeX_OCR's columns, not yet a chat
    with pytest.raises(DataError, match=r"image column \(image\) beside text rows.*formatting_func"):
        Trainer(model, tok, [ocr_row], config=cfg)
    for field, value in [("grad_accum", 0), ("batch_size", 0), ("batch_size", -2), ("max_steps", 0),
                         ("scheduler", "poly"), ("optimizer", "adam"), ("gradient_checkpointing", "yes")]:
        with pytest.raises(TrainConfigError, match=field):
            Trainer(model, tok, text_rows(2), config=TrainConfig(output_dir=str(tmp_path / "o"), **{field: value}))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(TrainConfigError, match="output_dir"):
        Trainer(model, tok, text_rows(2), config=TrainConfig(output_dir=str(blocker / "out")))
    no_assistant = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}]}]
    with pytest.raises(DataError, match="all labels are -100.*template"):
        Trainer(model, tok, no_assistant, config=TrainConfig(output_dir=str(tmp_path / "o"), train_on_responses_only=True))
    with pytest.raises(DataError, match="plain 'text' rows"):
        Trainer(model, tok, text_rows(2), config=TrainConfig(output_dir=str(tmp_path / "o"), train_on_responses_only=True))
    frozen, tok2 = __import__("minift").load(llama)
    with pytest.raises(TrainConfigError, match="no trainable parameters"):
        Trainer(frozen, tok2, text_rows(2), config=cfg)


def test_truncation_is_counted(llama, tmp_path, caplog):
    model, tok = load_full(llama)
    rows = text_rows(6, min_words=10, max_words=12) + text_rows(2, min_words=1, max_words=1)
    import logging

    with caplog.at_level(logging.INFO, logger="minift"):
        t = Trainer(model, tok, rows, config=TrainConfig(output_dir=str(tmp_path), max_seq_length=16, max_steps=1))
    assert t.truncated == 6 and all(len(u) <= 16 for u in t.train_units)
    assert "6 of 8 examples were longer than max_seq_length=16" in caplog.text


def test_datasets_dataset_and_trl_image_layout(llama, tmp_path):
    from datasets import Dataset

    model, tok = load_full(llama)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=1, train_on_responses_only=True)
    a = Trainer(model, tok, chat_rows(5), config=cfg).train_units
    b = Trainer(model, tok, Dataset.from_list(chat_rows(5)), config=cfg).train_units
    assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels) for x, y in zip(a, b))
    from PIL import Image

    img = Image.new("RGB", (8, 8))
    row = normalize_row({"images": [img], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A square."}]}, 0)
    assert row["messages"][0]["content"][0]["image"] is img
