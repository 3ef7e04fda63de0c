"""The training loop: exact gradient accumulation, packing end to end, checkpointing modes,
schedules, metrics, the NaN guard."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_utils import chat_rows, llama, load_full, one_thread, rel, single_thread, text_rows, tiny_llama, trainable_state  # noqa: F401 (fixtures)

from minift.train import NonFiniteLossError, TrainConfig, Trainer
from minift.train.optim import make_scheduler




def run(path, rows, tmp, **kw):
    model, tok = load_full(path)
    base = dict(output_dir=str(tmp), lr=3e-3, warmup_steps=1, weight_decay=0.01, seed=5, progress_bar=False,
                plot=False, gradient_checkpointing=False)
    base.update(kw)
    summary = Trainer(model, tok, rows, config=TrainConfig(**base)).train()
    return summary, model


def test_grad_accum_equals_big_batch(llama, tmp_path):
    rows = text_rows(10, seed=3)  # different lengths: padding differs per micro-batch
    a, ma = run(llama, rows, tmp_path / "a", batch_size=4, grad_accum=1, max_steps=4)
    b, mb = run(llama, rows, tmp_path / "b", batch_size=1, grad_accum=4, max_steps=4)
    c, mc = run(llama, rows, tmp_path / "c", batch_size=2, grad_accum=2, max_steps=4, gradient_checkpointing=True)
    assert len(a.losses) == 4 and a.tokens == b.tokens == c.tokens
    for x, y in zip(a.losses, b.losses):
        assert abs(x - y) <= 1e-6 * abs(x)
    for x, y in zip(a.losses, c.losses):
        assert abs(x - y) <= 1e-6 * abs(x)
    sa, sb, sc = trainable_state(ma), trainable_state(mb), trainable_state(mc)
    for n in sa:
        assert rel(sb[n], sa[n]) <= 1e-6, n
        assert rel(sc[n], sa[n]) <= 1e-6, n
    rec = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "tokens"} <= set(r) for r in rec)
    assert rec[-1]["loss"] == a.losses[-1] and rec[-1]["tokens"] == a.tokens


def test_packing_end_to_end_equals_unpacked(llama, tmp_path):
    """One step over the whole dataset: the same loss and the same update packed or not (SGD, whose
    update is the gradient itself; Adam's first step is sign(g) and amplifies rounding noise)."""
    rows = text_rows(8, seed=4)
    kw = dict(batch_size=8, grad_accum=1, max_steps=2, shuffle=False, warmup_steps=0, optimizer="sgd", lr=0.5)
    u, mu = run(llama, rows, tmp_path / "u", **kw)
    p, mp = run(llama, rows, tmp_path / "p", packing=True, max_seq_length=64, **kw)
    assert u.losses[1] < u.losses[0]
    assert u.losses == pytest.approx(p.losses, rel=1e-6)
    su, sp = trainable_state(mu), trainable_state(mp)
    for n in su:
        assert rel(sp[n], su[n]) <= 1e-5, n


def test_offload_checkpointing_matches_plain(llama, tmp_path):
    rows = chat_rows(6)
    plain, mp = run(llama, rows, tmp_path / "p", batch_size=3, grad_accum=1, max_steps=3)
    off, mo = run(llama, rows, tmp_path / "o", batch_size=3, grad_accum=1, max_steps=3, gradient_checkpointing="offload")
    assert plain.losses == pytest.approx(off.losses, rel=1e-6)
    sp, so = trainable_state(mp), trainable_state(mo)
    for n in sp:
        assert rel(so[n], sp[n]) <= 1e-6, n
    assert mo.model.gradient_checkpointing is False  # restored after training


def test_offloader_sees_layer_inputs(llama):
    from minift.train.offload import ActivationOffloader

    model, _ = load_full(llama)
    model.train()
    model.model.gradient_checkpointing = "offload"
    off = ActivationOffloader(model.config.hidden_size).install(model.model)
    ids = torch.randint(3, 200, (2, 9))
    model(ids, labels=ids).loss.backward()
    assert off.offloaded == model.config.num_hidden_layers  # exactly one input per checkpointed layer
    off.remove()


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
def test_schedules_match_transformers(name):
    import transformers

    total, warm = 17, 4
    ref_fn = {"linear": transformers.get_linear_schedule_with_warmup,
              "cosine": transformers.get_cosine_schedule_with_warmup,
              "constant": transformers.get_constant_schedule_with_warmup}[name]
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    o1, o2 = torch.optim.SGD([p1], lr=0.1), torch.optim.SGD([p2], lr=0.1)
    ours = make_scheduler(o1, TrainConfig(scheduler=name, warmup_steps=warm), total)
    ref = ref_fn(o2, warm, total) if name != "constant" else ref_fn(o2, warm)
    for _ in range(total + 2):
        assert ours.get_last_lr() == ref.get_last_lr()
        o1.step(), o2.step(), ours.step(), ref.step()
    r = TrainConfig(scheduler="linear", warmup_ratio=0.1)
    from minift.train.optim import warmup_steps

    assert warmup_steps(r, 25) == math.ceil(2.5)


def test_epochs_eval_and_param_groups(llama, tmp_path):
    model, tok = load_full(llama)
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=2, batch_size=2, grad_accum=2, eval_steps=2, lr=1e-3,
                      embedding_lr=1e-4, weight_decay=0.1, progress_bar=False, gradient_checkpointing=False,
                      logging_steps=2)
    t = Trainer(model, tok, text_rows(9), eval_dataset=text_rows(3, seed=9), config=cfg)
    groups = {g["group"]: g for g in t.optimizer.param_groups}
    assert groups["embedding"]["lr"] == 1e-4 and groups["body"]["lr"] == 1e-3
    assert groups["body_no_decay"]["weight_decay"] == 0.0 and groups["body"]["weight_decay"] == 0.1
    s = t.train()
    assert s.steps == 6 and len(s.losses) == 6 and s.eval_loss is not None
    rec = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec if r.get("eval")] == [2, 4, 6]
    assert [r["step"] for r in rec if not r.get("eval")] == [1, 2, 4, 6]
    assert (tmp_path / "final" / "model.safetensors").is_file()
    import minift

    reloaded, _ = minift.load(tmp_path / "final")
    for (n, p), (_, q) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p.detach(), q), n


def test_nan_loss_stops_and_keeps_last_good_checkpoint(llama, tmp_path):
    model, tok = load_full(llama)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=6, batch_size=2, grad_accum=1, optimizer="sgd", lr=1e30,
                      max_grad_norm=None, save_steps=1, progress_bar=False, gradient_checkpointing=False)
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step 2.*checkpoint-1"):
        Trainer(model, tok, text_rows(8), config=cfg).train()
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / "checkpoint-2").exists()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-1" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_sgd_and_8bit_adamw_with_resume(llama, tmp_path):
    import minift

    s, _ = run(llama, text_rows(4), tmp_path / "s", optimizer="sgd", max_steps=2, batch_size=2, grad_accum=1)
    assert all(math.isfinite(v) for v in s.losses)

    def trainer(**kw):
        model, tok = minift.load(llama)
        minift.add_lora(model, r=64, alpha=64)  # 64 x 64 = 4096 elements: bitsandbytes' 8-bit threshold
        cfg = TrainConfig(output_dir=str(tmp_path / "b"), optimizer="adamw_8bit", max_steps=4, batch_size=2, lr=1e-2,
                          save_steps=2, progress_bar=False, plot=False, **kw)
        return Trainer(model, tok, text_rows(8), config=cfg)

    t = trainer()
    full = t.train().losses
    assert type(t.optimizer).__name__ == "AdamW8bit"
    assert any(v.dtype == torch.uint8 for st in t.optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    assert trainer(resume_from=str(tmp_path / "b" / "checkpoint-2")).train().losses == full


def test_lora_modules_to_save_embedding_lr_and_reload(llama, tmp_path):
    import minift

    model, tok = minift.load(llama)
    minift.add_lora(model, r=4, alpha=8, modules_to_save=["embed_tokens", "lm_head"])
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=3, batch_size=2, grad_accum=1, lr=1e-3, embedding_lr=1e-4,
                      progress_bar=False, gradient_checkpointing=True, save_steps=3)
    t = Trainer(model, tok, chat_rows(6), eval_dataset=chat_rows(2), config=cfg)
    emb = [g for g in t.optimizer.param_groups if g["group"].startswith("embedding")]
    assert emb and all(g["lr"] == 1e-4 for g in emb)
    n_emb = sum(p.numel() for g in emb for p in g["params"])
    assert n_emb == 2 * model.config.vocab_size * model.config.hidden_size
    s = t.train()
    assert (tmp_path / "checkpoint-3" / "adapter" / "adapter_model.safetensors").is_file()
    fresh, _ = minift.load(llama)
    minift.load_adapter(fresh, tmp_path / "final")
    cfg2 = TrainConfig(output_dir=str(tmp_path / "e"), progress_bar=False)
    assert Trainer(fresh, tok, chat_rows(6), eval_dataset=chat_rows(2), config=cfg2).evaluate() == pytest.approx(
        s.eval_loss, rel=1e-6)


def test_loss_plot_written_or_skipped(tmp_path, monkeypatch, caplog):
    import logging
    import sys
    from unittest import mock

    from minift.train.report import plot_losses

    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval": True, "eval_loss": 1.7}]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with caplog.at_level(logging.INFO, logger="minift"):
        assert plot_losses(records, tmp_path / "loss.png") is None
    assert "skipped the loss plot" in caplog.text
    fake = mock.MagicMock()
    fig, ax = mock.MagicMock(), mock.MagicMock()
    fake.pyplot.subplots.return_value = (fig, ax)
    monkeypatch.setitem(sys.modules, "matplotlib", fake)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", fake.pyplot)
    assert plot_losses(records, tmp_path / "loss.png") == tmp_path / "loss.png"
    fig.savefig.assert_called_once_with(tmp_path / "loss.png")
    assert ax.plot.call_args_list[0].args == ((1, 2), (2.0, 1.5))


def test_compiled_layers_match_eager(llama, tmp_path):
    """TrainConfig.compile=True (the default on CUDA) compiles each decoder layer; the losses of a
    few steps (with dynamic padding, so shapes change) equal eager's."""
    rows = text_rows(6, seed=7)
    eager, _ = run(llama, rows, tmp_path / "e", batch_size=2, grad_accum=1, max_steps=3, compile=False)
    torch._dynamo.reset()
    comp, mc = run(llama, rows, tmp_path / "c", batch_size=2, grad_accum=1, max_steps=3, compile=True)
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in mc.model.layers)
    assert len({id(layer.mlp.chunk_fn) for layer in mc.model.layers}) == 1  # chunked MLPs' one compiled chunk
    assert mc.model.layers[0].mlp.chunk_fn is not None
    assert eager.losses == pytest.approx(comp.losses, rel=1e-5)


WORDS = ("the quick brown fox jumps over the lazy dog again and again while the sun rises in the east and "
         "sets in the west each day").split()


def compiled_graph_counts(monkeypatch) -> list[int]:
    """A list that each optimizer step appends dynamo's count of compiled graphs to (counters reset)."""
    from torch._dynamo.utils import counters

    graphs: list[int] = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        graphs.append(counters["stats"]["unique_graphs"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    torch._dynamo.reset()
    counters.clear()
    return graphs


def test_no_recompile_when_lengths_vary(llama, tmp_path, monkeypatch):
    """Rows of many lengths (dynamic padding): the compiled decoder layers are compiled with dynamic
    shapes from the first step, so no later step compiles anything, the last step's batch of two
    equal lengths (nothing to pad) included: it gets an all-ones mask like the padded batches'
    instead of a second graph. Every decoder layer, layer 0 included (its input made to require
    grad), shares one compiled graph."""
    # 8 distinct lengths (60-92 tokens), 2 a batch; none equal to a model dimension (64, 128): dynamo
    # would take that size for the same symbol (duck shaping) and specialise it
    rows = [{"text": " ".join(WORDS[: 12 + i])} for i in range(8)] + [{"text": " ".join(WORDS[:14])}] * 2
    graphs = compiled_graph_counts(monkeypatch)
    run(llama, rows, tmp_path / "c", batch_size=2, grad_accum=1, max_steps=5, compile=True, shuffle=False)
    assert len(graphs) == 5 and graphs[0] == 1, graphs
    assert graphs[1:] == [graphs[0]] * 4, graphs


def test_ragged_last_step_runs_the_same_graph(llama, tmp_path, monkeypatch):
    """Five rows, two a batch: the epoch's last step has one row. Compiled, it gets a second row
    without targets (a batch of 1 would be specialised into a second graph), which leaves the
    losses and the adapters' result those of the eager run, whose last batch is the single row."""
    rows = [{"text": " ".join(WORDS[: 12 + i])} for i in range(5)]
    eager, me = run(llama, rows, tmp_path / "e", batch_size=2, grad_accum=1, max_steps=4, compile=False, shuffle=False)
    graphs = compiled_graph_counts(monkeypatch)
    comp, mc = run(llama, rows, tmp_path / "c", batch_size=2, grad_accum=1, max_steps=4, compile=True, shuffle=False)
    assert graphs == [1, 1, 1, 1], graphs
    assert comp.losses == pytest.approx(eager.losses, rel=1e-5)
    for (n, a), (_, b) in zip(me.named_parameters(), mc.named_parameters()):
        if a.requires_grad:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), n


def test_gc_frozen_during_training_only(llama, tmp_path, monkeypatch):
    """After the first step the Trainer moves long-lived objects out of the cyclic GC (whose full
    collections stalled GPU steps) and undoes that when train() returns; a caller's own freeze is kept."""
    import gc

    counts = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        counts.append(gc.get_freeze_count())
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    before = gc.get_freeze_count()
    run(llama, text_rows(6, seed=1), tmp_path, batch_size=2, max_steps=3, optimizer="adamw")
    assert counts[0] == before and all(c > before for c in counts[1:])
    assert gc.get_freeze_count() == before

    gc.freeze()  # the caller's own freeze is left alone, and kept
    try:
        own = gc.get_freeze_count()
        counts.clear()
        run(llama, text_rows(6, seed=1), tmp_path / "b", batch_size=2, max_steps=2, optimizer="adamw")
        # (frozen objects freed by refcount leave the permanent generation: counts only shrink)
        assert len(counts) == 2 and max(counts) <= own and 0 < gc.get_freeze_count() <= own
    finally:
        gc.unfreeze()


def test_step_one_logged_by_default_and_window_means(llama, tmp_path):
    """metrics.jsonl records step 1 by default (logging_first_step=True) even with logging_steps > 1;
    each record's loss is the mean of the step losses since the previous record."""
    assert TrainConfig().logging_first_step is True
    s, _ = run(llama, text_rows(10, seed=2), tmp_path, batch_size=2, grad_accum=1, max_steps=5, logging_steps=3)
    rec = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [1, 3, 5]
    windows = {1: s.losses[0:1], 3: s.losses[1:3], 5: s.losses[3:5]}
    for r in rec:
        assert r["loss"] == pytest.approx(sum(windows[r["step"]]) / len(windows[r["step"]]), rel=1e-9)
