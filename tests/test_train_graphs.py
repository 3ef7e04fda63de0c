"""TrainConfig(cuda_graphs): micro-batches right-padded to bucket lengths and replayed as CUDA
graphs. On CPU: the padding changes no loss or gradient (every family, masks, packing, images),
the layout of a capture's host buffers (the offloader's trace, the arena), the bucket lengths'
bounds, and the switch's off-CPU behaviour. On CUDA (gpu): the Trainer's losses and final weights with graphs
equal those without; "auto" turns them on, or off under a tight memory budget."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from train_utils import load_full, rel, single_thread, text_rows, tiny_llama  # noqa: F401 (fixtures)

import minift
from minift.errors import TrainConfigError
from minift.testing import write_tiny_checkpoint, write_tiny_gemma3_vision
from minift.train import TrainConfig, Trainer
from minift.train.data import bucket_length, collate, pad_batch


@given(n=st.integers(1, 300_000), cap=st.one_of(st.none(), st.integers(1, 300_000)))
def test_bucket_length_bounds(n, cap):
    b = bucket_length(n, cap)
    assert b >= n
    assert b <= max(n, cap) if cap is not None else True
    if cap is None or cap >= bucket_length(n):
        assert b - n < max(32, n / 8 + 1)  # at most 12.5% (or 31 tokens) of padding
        assert b % 32 == 0
    # lengths in one bucket share it: the graph count grows with log(n), not n
    assert bucket_length(b, cap) == b


def _loss_and_grads(model, tensors: dict, normalizer: float):
    model.zero_grad(set_to_none=True)
    loss = model(**tensors, loss_normalizer=normalizer).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(model, batch, pad_id: int, extra: int, tol: float = 1e-5) -> None:
    n = batch.tensors["input_ids"].shape[1]
    lu, gu = _loss_and_grads(model, batch.tensors, float(batch.n_targets))
    padded = pad_batch(batch.tensors, n + extra, pad_id)
    assert padded["input_ids"].shape[1] == n + extra
    lp, gp = _loss_and_grads(model, padded, float(batch.n_targets))
    assert abs(lu.item() - lp.item()) <= 1e-6 * abs(lu.item())
    assert gu.keys() == gp.keys()
    # per tensor, relative to its norm; a gradient that is zero in exact arithmetic (a key bias:
    # softmax ignores it) is compared with the whole gradient's norm instead
    total = torch.stack([g.norm() for g in gu.values()]).norm()
    for k in gu:
        assert (gp[k] - gu[k]).norm() <= tol * max(gu[k].norm(), 1e-4 * total), k


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("layout", ["ragged", "equal", "packed"])
def test_bucket_padding_changes_no_loss_or_gradient(tmp_path, family, layout):
    """Rows of several lengths (attention_mask), of one length (no mask: the pads are causal
    future), packed rows (position_ids); sliding windows shorter than the rows and soft-capping
    included (mistral, gemma2, gemma3_text's tiny configs)."""
    model, tok = load_full(write_tiny_checkpoint(tmp_path / "m", family))
    model.train()
    cfg = TrainConfig(output_dir=str(tmp_path / "o"), packing=layout == "packed", max_seq_length=48,
                      progress_bar=False, plot=False)
    rows = text_rows(8, seed=3, min_words=6, max_words=14)
    if layout == "equal":
        rows = [{"text": "the quick brown fox jumps over the lazy dog"}] * 3
    tr = Trainer(model, tok, rows, config=cfg)
    batch = tr._batch(tr.train_units, list(range(min(3, len(tr.train_units)))))
    assert ("attention_mask" in batch.tensors) == (layout == "ragged")
    assert ("position_ids" in batch.tensors) == (layout == "packed")
    _assert_same(model, batch, tr.pad_id, extra=21)


def test_bucket_padding_with_images(tmp_path):
    """Gemma 3 vision: image tokens attend both ways, the pads are text after them."""
    from test_train_vision import rows as image_rows

    model, processor = minift.load(write_tiny_gemma3_vision(tmp_path / "v"), full_finetuning=True)
    model.train()
    tr = Trainer(model, processor, image_rows(3), config=TrainConfig(output_dir=str(tmp_path / "o"),
                                                                     progress_bar=False, plot=False))
    batch = tr._batch(tr.train_units, [0, 1, 2])
    assert "pixel_values" in batch.tensors and "token_type_ids" in batch.tensors
    # fp32 summation-order noise: the tower's first layers' gradients pass through every layer
    _assert_same(model, batch, tr.pad_id, extra=13, tol=5e-5)


def test_image_features_replace_pixel_values(tmp_path):
    """The tower's output passed as image_features gives the logits of passing the pixels; bad
    features are typed errors."""
    from test_train_vision import rows as image_rows

    from minift.errors import InputError

    model, processor = minift.load(write_tiny_gemma3_vision(tmp_path / "v"), full_finetuning=True)
    tr = Trainer(model, processor, image_rows(2), config=TrainConfig(output_dir=str(tmp_path / "o"),
                                                                     progress_bar=False, plot=False))
    t = tr._batch(tr.train_units, [0, 1]).tensors
    with torch.no_grad():
        ref = model(**t, return_logits=True).logits
        feats = model.image_features(t["pixel_values"])
        rest = {k: v for k, v in t.items() if k != "pixel_values"}
        got = model(**rest, image_features=feats, return_logits=True).logits
        assert rel(got, ref) <= 1e-6
        with pytest.raises(InputError, match="not both"):
            model(**t, image_features=feats)
        with pytest.raises(InputError, match="image_features has shape"):
            model(**rest, image_features=feats[:, :-1])


def test_offloader_trace_lays_out_a_capture(tmp_path):
    """What a capture's host buffers are laid out from: the tower's offloader records each tensor it
    sent to the host in the last forward, in order (one image's input to each encoder layer, then
    the post-LayerNorm's), and the same forward again records the same trace."""
    from test_train_vision import rows as image_rows

    from minift.train.offload import Slot

    model, processor = minift.load(write_tiny_gemma3_vision(tmp_path / "v"))
    minift.add_lora(model, r=4, alpha=8, vision=True, language=True, seed=0)
    tr = Trainer(model, processor, image_rows(3), config=TrainConfig(output_dir=str(tmp_path / "o"),
                                                                     progress_bar=False, plot=False))
    t = tr._batch(tr.train_units, [0, 1, 2]).tensors
    model.train()
    old, offloaders = tr._set_checkpointing()  # the tower checkpointed and offloaded, as in training
    assert len(offloaders) == 1
    vcfg = model.model.vision_tower.vision_model.cfg
    try:
        traces = []
        for _ in range(2):
            model(**t).loss.backward()
            traces.append(list(offloaders[0].trace))
    finally:
        for off in offloaders:
            off.remove()
        tr._restore_checkpointing(old)
    n_img = t["pixel_values"].shape[0]
    # each image's rows, contiguous (the tower's activations are row-major from the patch embedding on)
    p, h = vcfg.num_patches, vcfg.hidden_size
    one = Slot((1, p, h), (p * h, h, 1), torch.float32)
    assert traces[0] == traces[1] and traces[0][:vcfg.num_hidden_layers] == [one] * vcfg.num_hidden_layers
    assert len(traces[0]) == n_img * vcfg.num_hidden_layers + 1  # + the post-LayerNorm's input, all images


def test_pad_batch_layout():
    t = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 1]]), "labels": torch.tensor([[5, 6, 7], [8, 9, -100]]),
         "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "position_ids": torch.tensor([[0, 1, 0], [0, 1, 2]])}
    p = pad_batch(t, 5, pad_id=1)
    assert p["input_ids"].tolist() == [[5, 6, 7, 1, 1], [8, 9, 1, 1, 1]]
    assert p["labels"][:, 3:].eq(-100).all() and p["attention_mask"][:, 3:].eq(0).all()
    assert p["position_ids"][:, 3:].tolist() == [[0, 1], [0, 1]]
    assert pad_batch(t, 3, 1)["input_ids"] is t["input_ids"]
    with pytest.raises(ValueError, match="length 2 < the batch's 3"):
        pad_batch(t, 2, 1)
    with pytest.raises(ValueError, match="no padding rule for 'foo'"):
        pad_batch({**t, "foo": t["labels"]}, 4, 1)
    assert collate  # the collated dict is what pad_batch takes


@pytest.mark.parametrize("value", [True, "auto"])
def test_cuda_graphs_setting(tmp_path, caplog, value):
    """Off on CPU: said when the user asked for True, quiet for the default "auto"."""
    with pytest.raises(TrainConfigError, match="cuda_graphs"):
        TrainConfig(cuda_graphs="yes").validate()
    assert TrainConfig().cuda_graphs == "auto"
    model, tok = minift.load(tiny_llama(tmp_path / "m"))
    minift.add_lora(model, r=4, alpha=8, seed=0)
    cfg = TrainConfig(output_dir=str(tmp_path / "o"), max_steps=2, cuda_graphs=value, progress_bar=False, plot=False)
    with caplog.at_level(logging.INFO, logger="minift"):
        tr = Trainer(model, tok, text_rows(8), config=cfg)
        tr.train()
    said = "cuda_graphs=True is off for this run: the model is not on CUDA" in caplog.text
    assert said is (value is True) and "cuda_graphs='auto'" not in caplog.text
    assert tr.uses_cuda_graphs is False and tr.graph_stats is None
    assert all(p.grad is None for p in model.parameters())


# -- CUDA ---------------------------------------------------------------------------------------
def _run(path, tmp_path, name: str, *, graphs: bool, compile_: bool, vision: bool = False, **kw):
    torch._dynamo.reset()
    if vision:
        from test_train_vision import rows as image_rows

        model, proc = minift.load(path, dtype=torch.float32, device="cuda")
        minift.add_lora(model, r=8, alpha=16, vision=True, language=True, seed=0)
        data = image_rows(12)
    else:
        model, proc = minift.load(path, dtype=torch.float32, device="cuda")
        minift.add_lora(model, r=8, alpha=16, seed=0)
        data = text_rows(24, seed=5, min_words=3, max_words=40)
    cfg = TrainConfig(output_dir=str(tmp_path / name), max_steps=8, lr=5e-3, seed=1, compile=compile_,
                      cuda_graphs=graphs, progress_bar=False, plot=False, **kw)
    tr = Trainer(model, proc, data, config=cfg)
    summary = tr.train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return summary.losses, weights, tr.graph_stats


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [False, True])
@pytest.mark.parametrize("merge", [False, True])
def test_trainer_with_cuda_graphs_equals_without(tmp_path, compile_, merge):
    """fp32 on CUDA, rows of many lengths (several buckets), 2 micro-batches a step, merged or
    not: the same losses and LoRA weights, and most micro-batches replayed."""
    path = write_tiny_checkpoint(tmp_path / "m", "llama", hidden_size=256, intermediate_size=512,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    kw = dict(batch_size=2, grad_accum=2, merge_micro_batches=merge, gradient_checkpointing=True)
    ref, wref, _ = _run(path, tmp_path, "eager", graphs=False, compile_=compile_, **kw)
    got, wgot, stats = _run(path, tmp_path, "graphs", graphs=True, compile_=compile_, **kw)
    assert stats["failure"] is None and stats["graphs"] >= 1 and stats["replays"] >= 1, stats
    assert stats["replays"] + stats["eager_runs"] == 8 * (1 if merge else 2)
    for a, b in zip(ref, got):
        assert abs(a - b) <= 1e-4 * abs(a), (ref, got)
    for n in wref:
        assert rel(wgot[n], wref[n]) <= 1e-4, n


@pytest.mark.gpu
def test_offloader_replays_its_copies(tmp_path):
    """The offloading copies alone, without the Trainer: three micro-batches of one shape through
    MicroBatchGraphs (eager, captured + replayed, replayed) with every decoder layer's input sent to
    the host and back; each one's loss and gradients equal an eager run's on the same data, and
    the host buffers hold the last replay's layer inputs."""
    from minift.train.graphs import MicroBatchGraphs
    from minift.train.offload import ActivationOffloader

    path = write_tiny_checkpoint(tmp_path / "m", "llama", hidden_size=128, intermediate_size=256,
                                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    g = torch.Generator().manual_seed(0)
    batches = [dict(input_ids=(ids := torch.randint(3, 250, (2, 64), generator=g)), labels=ids.clone())
               for _ in range(3)]
    runs = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        model, _ = minift.load(path, dtype=torch.float32, device="cuda")
        minift.add_lora(model, r=4, alpha=8, seed=0)
        torch.manual_seed(0)
        with torch.no_grad():  # B = 0 at init: move it so every gradient is non-trivial
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn_like(p))
        model.train()
        model.model.gradient_checkpointing = "offload"
        off = ActivationOffloader(model.config.hidden_size).install(model.model)
        params = [p for p in model.parameters() if p.requires_grad]
        mbg = MicroBatchGraphs(model, params, torch.device("cuda"), pad_id=0, offloaders=[off]) if graphs else None
        out = []
        for b in batches:
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()
            if mbg is not None:
                loss = mbg.run(b, 100.0)
            else:
                loss = model(**{k: v.cuda() for k, v in b.items()}, loss_normalizer=100.0).loss
                loss.backward()
            out.append((loss.item(), [p.grad.clone() for p in params]))
        if mbg is not None:
            assert mbg.stats()["replays"] == 2 and mbg.failure is None, mbg.stats()
            assert off.unused_fetches == 0  # every copy brought back was unpacked
            host = off._arena.views(off.trace)
            assert len(host) == 3 and all(h.abs().sum() > 0 for h in host)
            with torch.no_grad():  # the first layer's input of the last batch: its scaled embeddings
                first = model.model.embed(batches[-1]["input_ids"].cuda()).cpu()
            assert torch.equal(host[0], first)
            mbg.release()
        off.remove()
        runs[graphs] = out
    for (le, ge), (lg, gg) in zip(runs[False], runs[True]):
        assert abs(le - lg) <= 1e-5 * abs(le)
        for a, b in zip(ge, gg):
            assert rel(b, a) <= 1e-5


@pytest.mark.gpu
def test_failed_capture_falls_back_cleanly():
    """A capture that fails (here: a host sync inside the forward) turns graphs off with its own
    error as the reason, and leaves CUDA usable: random draws work (torch leaves the generator
    registered with a capture that did not end cleanly) and the micro-batch runs eagerly."""
    from types import SimpleNamespace

    from minift.train.graphs import MicroBatchGraphs

    class Syncing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(8, device="cuda"))

        def forward(self, input_ids, loss_normalizer, **kw):
            x = self.w * input_ids.float().mean()
            if torch.cuda.is_current_stream_capturing():
                float(x.sum())  # a host sync: not allowed in a capture
            return SimpleNamespace(loss=x.sum() / loss_normalizer)

    model = Syncing()
    mbg = MicroBatchGraphs(model, [model.w], torch.device("cuda"), pad_id=0)
    ones = torch.ones(2, 32, dtype=torch.long)  # 32: a bucket length, so no padding changes the mean
    batch = dict(input_ids=ones, labels=ones.clone())
    for _ in range(2):  # eager (warm), then the failing capture and its eager run
        loss = mbg.run(batch, 1.0)
    assert not mbg.enabled and mbg.failure is not None and "captur" in mbg.failure.lower(), mbg.failure
    assert loss.item() == 8.0 and mbg.eager_runs == 2
    torch.randn(4, device="cuda")  # the generator draws again


@pytest.mark.gpu
def test_offloaded_checkpoints_inside_cuda_graphs(tmp_path):
    """gradient_checkpointing="offload" with graphs: each decoder layer's input is copied to the
    host and back inside the captured step; the same losses and LoRA weights as without graphs."""
    path = write_tiny_checkpoint(tmp_path / "m", "llama", hidden_size=256, intermediate_size=512,
                                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    kw = dict(batch_size=2, grad_accum=2, gradient_checkpointing="offload")
    ref, wref, _ = _run(path, tmp_path, "eager", graphs=False, compile_=True, **kw)
    got, wgot, stats = _run(path, tmp_path, "graphs", graphs=True, compile_=True, **kw)
    assert stats["failure"] is None and stats["replays"] >= 1 and stats["host_arena_bytes"] > 0, stats
    for a, b in zip(ref, got):
        assert abs(a - b) <= 1e-4 * abs(a), (ref, got)
    for n in wref:
        assert rel(wgot[n], wref[n]) <= 1e-4, n


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_chunked_mlps_inside_cuda_graphs(tmp_path, family):
    """mlp_chunk_tokens with offloaded checkpoints, compiled layers and graphs: the chunk loop (a
    graph break, its chunks one compiled function; the layers' recomputes skip it) is captured with
    the rest; the same losses and LoRA weights as without graphs."""
    path = write_tiny_checkpoint(tmp_path / "m", family, hidden_size=256, intermediate_size=512,
                                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    kw = dict(batch_size=2, grad_accum=2, gradient_checkpointing="offload", mlp_chunk_tokens=16)
    ref, wref, _ = _run(path, tmp_path, "eager", graphs=False, compile_=True, **kw)
    got, wgot, stats = _run(path, tmp_path, "graphs", graphs=True, compile_=True, **kw)
    assert stats["failure"] is None and stats["replays"] >= 1 and stats["unused_fetches"] == 0, stats
    for a, b in zip(ref, got):
        assert abs(a - b) <= 1e-4 * abs(a), (ref, got)
    for n in wref:
        assert rel(wgot[n], wref[n]) <= 1e-4, n


@pytest.mark.gpu
def test_vision_trainer_with_cuda_graphs_equals_without(tmp_path):
    """Gemma 3 vision, images in every row, the tower checkpointed: its checkpoints go to the host
    and back inside the graphs (page-locked buffers the replays reuse)."""
    path = write_tiny_gemma3_vision(tmp_path / "v")
    kw = dict(batch_size=2, grad_accum=2, gradient_checkpointing=True, train_on_responses_only=True)
    ref, wref, _ = _run(path, tmp_path, "eager", graphs=False, compile_=True, vision=True, **kw)
    got, wgot, stats = _run(path, tmp_path, "graphs", graphs=True, compile_=True, vision=True, **kw)
    assert stats["failure"] is None and stats["replays"] >= 1 and stats["host_arena_bytes"] > 0, stats
    assert stats["unused_fetches"] == 0, stats  # every checkpoint brought back was used
    for a, b in zip(ref, got):
        assert abs(a - b) <= 1e-4 * abs(a), (ref, got)
    for n in wref:
        assert rel(wgot[n], wref[n]) <= 1e-4, n


@pytest.mark.gpu
def test_cuda_graphs_auto_on_cuda(tmp_path, caplog):
    """The default ("auto") replays graphs on one GPU, and stays off when the step's estimated
    peak is over half the memory budget (said in the log): a budget the plan fits in at 80%."""
    from minift.train import memory

    path = write_tiny_checkpoint(tmp_path / "m", "llama")

    def trainer(name: str, **kw) -> Trainer:
        model, tok = minift.load(path, dtype=torch.bfloat16, device="cuda")
        minift.add_lora(model, r=4, alpha=8, seed=0)
        cfg = TrainConfig(output_dir=str(tmp_path / name), max_steps=3, progress_bar=False, plot=False, **kw)
        return Trainer(model, tok, text_rows(8), config=cfg)

    tr = trainer("on")
    assert tr.uses_cuda_graphs
    tr.train()
    assert tr.graph_stats["replays"] >= 1 and tr.graph_stats["failure"] is None, tr.graph_stats
    roomy = trainer("plan", gradient_checkpointing="auto", memory_budget_gb=64.0)
    est = roomy.memory_plan.estimate
    with caplog.at_level(logging.INFO, logger="minift"):
        tr = trainer("off", gradient_checkpointing="auto", memory_budget_gb=est / 0.8 / memory.GIB)
        assert tr.memory_plan.estimate == est and not tr.uses_cuda_graphs
        tr.train()
    assert tr.graph_stats is None and "over 1/2 of the memory budget" in caplog.text


def test_host_arena_views():
    """The page-locked buffers captured copies write: one per offloaded tensor of a forward, page
    aligned, disjoint, with the eager host copy's strides, carved from one flat buffer that several
    graphs' traces share."""
    from minift.train.offload import ActivationOffloader, HostArena, Slot

    patch_major = torch.empty(1, 8, 5).transpose(1, 2)  # (1, 5, 8) as a conv's flatten + transpose lays it out
    trace = [Slot((2, 3, 8), (24, 8, 1), torch.bfloat16), Slot.of(patch_major),
             Slot((1, 1, 8), (8, 8, 1), torch.float16)]
    assert trace[1] == Slot((1, 5, 8), (40, 1, 5), torch.float32)
    arena = HostArena(HostArena.size(trace))
    views = arena.views(trace)
    assert [Slot(tuple(v.shape), v.stride(), v.dtype) for v in views] == trace
    assert all(v.data_ptr() % 4096 == 0 for v in views)
    for i, v in enumerate(views):
        v.fill_(i + 1)
    assert [v.float().unique().tolist() for v in views] == [[1.0], [2.0], [3.0]]
    assert [tuple(v.shape) for v in arena.views(trace[1:])] == [(1, 5, 8), (1, 1, 8)]  # a smaller trace fits too
    with pytest.raises(ValueError, match="bytes asked"):
        arena.views(trace * 2)
    # under capture the offloader hands out the arena's buffers in pack order, and refuses a tensor
    # the eager run did not offload, or offloaded with other strides (the capture then fails and
    # the run goes on without graphs)
    off = ActivationOffloader(8)
    off._hosts = arena.views(trace)
    for t, view in zip((torch.zeros(2, 3, 8, dtype=torch.bfloat16), patch_major), views):
        off.trace.append(Slot.of(t))
        assert off._host_buffer(t).data_ptr() == view.data_ptr()
    t = torch.zeros(1, 8, 1, dtype=torch.float16).transpose(1, 2)
    off.trace.append(Slot.of(t))
    with pytest.raises(RuntimeError, match=r"tensor 2 is Slot\(shape=\(1, 1, 8\), stride=\(8, 1, 1\)"):
        off._host_buffer(t)
    arena.close()
