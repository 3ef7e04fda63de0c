"""The memory estimate of a loaded model and the `gradient_checkpointing="auto"` planner: plans in
speed order within a budget, partial checkpointing (the first k layers) giving the same loss and
gradients as full and none, the Trainer applying the plan, and (GPU) the peak staying in budget."""

from __future__ import annotations

import pytest
import torch
from train_utils import llama, single_thread, text_rows, tiny_llama  # noqa: F401

import minift
from minift.arch.model import draws_random
from minift.cli.info import describe
from minift.errors import TrainConfigError
from minift.models.loader import read_config
from minift.train import TrainConfig, Trainer
from minift.train import memory
from minift.testing.tiny import write_tiny_checkpoint


def lora_model(path, four_bit=False):
    model, tok = minift.load(path, load_in_4bit=four_bit)
    minift.add_lora(model, r=4, alpha=8, seed=1)
    return model, tok


def loss_and_grads(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward on `ids` (labels = ids): the loss and the trainable grads."""
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_estimate_terms_match_info(llama):  # noqa: F811
    """A loaded model's activation terms are minift info's; weights and adapters are counted from the
    model's own tensors (the LoRA the user added, not info's rank-r all-linear)."""
    model, _ = lora_model(llama)
    est = memory.estimate(model, batch=2, seq=64)
    info = describe(read_config(llama), r=4, seq=64, batch=2)["memory_bytes"]["lora_16bit"]
    for k in ("checkpointed_inputs", "one_layer", "logits_chunk", "pixel_values", "vision_activations"):
        assert est[k] == info[k], k
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est["adapters_and_optimizer"] == 16 * trainable
    assert est["weights"] == sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad) \
        + sum(b.numel() * b.element_size() for b in model.buffers())
    assert est["total"] == sum(v for k, v in est.items() if k != "total")


def test_vision_terms_one_image_at_a_time():
    """Gemma 3's checkpointed tower as the Trainer runs it (one image a pass, its saved inputs
    offloaded): (images + 2) image-layer inputs stay on the device and the backward recomputes one
    image's layer, so a merged step of 4 images adds 3 pooling inputs, not 3 x (L_v + 2) inputs and
    3 recomputed layers; all images a pass (FSDP2) or no offload keep the old terms."""
    from types import SimpleNamespace as NS

    text = NS(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, vocab_size=262208,
              num_attention_heads=8, num_key_value_heads=4, head_dim=256)
    vis = NS(num_patches=4096, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_channels=3,
             image_size=896)
    unit = 4096 * 1152 * 2  # one image's input to one encoder layer
    layer = 4096 * (13 * 1152 + 5 * 4304) * 2  # one image's recomputed encoder layer

    def terms(batch, **kw):
        """(what stays through the decoder's backward, what the tower's backward peaks at beyond
        it = max(the decoder's saved inputs + layer + logits chunk, the recomputed layer))"""
        t = memory.activation_bytes(text, vis, batch=batch, seq=316, **kw)
        decoder = t["checkpointed_inputs"] + t["one_layer"] + t["logits_chunk"]
        return t["vision_activations"], decoder + t["vision_backward"], decoder

    (act1, back1, _), (act4, back4, dec4) = terms(1), terms(4)
    assert (act1, act4) == (3 * unit, 6 * unit)
    assert back1 == layer and back4 == max(dec4, layer)
    assert terms(4, vision_offload=False)[0] == 4 * 29 * unit  # before: every layer's input of every image
    act, back, _ = terms(4, vision_per_image=False)  # FSDP2: 4 images a pass
    assert (act, back) == (12 * unit, 4 * layer)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A tiny Llama of 6 layers: room for partial plans."""
    return tiny_llama(tmp_path_factory.mktemp("deep") / "m", num_hidden_layers=6)


def test_fewer_checkpointed_layers_cost_more_memory(deep):
    """The estimate falls as more of the first L - 1 layers are checkpointed; checkpointing the last
    one too costs its input on top (its recompute comes at once); offload is the leanest."""
    model, _ = lora_model(deep)
    layers = model.config.num_hidden_layers
    est = lambda **k: memory.estimate(model, batch=4, seq=512, **k)["total"]  # noqa: E731
    totals = [est(checkpoint_layers=k) for k in range(layers)]
    assert totals[0] == est(checkpointing=False)
    assert all(a > b for a, b in zip(totals, totals[1:]))
    assert est() > totals[-1] and est() == est(checkpoint_layers=layers)
    assert est(checkpointing="offload") < totals[-1]


def test_plan_is_the_fastest_that_fits(deep):
    model, _ = lora_model(deep)
    kw = dict(batch=4, seq=512)
    est = lambda **k: memory.estimate(model, **kw, **k)["total"]  # noqa: E731
    room = lambda b: int(b / (1 - memory.PLAN_MARGIN)) + 2  # noqa: E731  a budget that just fits b
    p = memory.plan(model, budget_bytes=room(est(checkpointing=False)), **kw)
    assert (p.checkpointing, p.checkpoint_layers, p.fits) == (False, None, True)
    for k in (1, 3, 5):
        p = memory.plan(model, budget_bytes=room(est(checkpoint_layers=k)), **kw)
        assert (p.checkpointing, p.checkpoint_layers) == (True, k)
        assert p.estimate == est(checkpoint_layers=k)
    p = memory.plan(model, budget_bytes=room(est()), **kw)  # all L fit: L - 1 is leaner and faster
    assert (p.checkpointing, p.checkpoint_layers) == (True, 5)
    p = memory.plan(model, budget_bytes=room(est(checkpointing="offload")), **kw)
    assert (p.checkpointing, p.fits) == ("offload", True)
    p = memory.plan(model, budget_bytes=1, **kw)
    assert (p.checkpointing, p.fits) == ("offload", False)
    assert "does not fit" in p.describe()
    for b in range(10**6, 10**8, 3 * 10**6):
        q = memory.plan(model, budget_bytes=b, **kw)
        assert q.estimate <= b * (1 - memory.PLAN_MARGIN) or not q.fits


@pytest.mark.parametrize("k", [0, 1, None])
def test_partial_checkpointing_is_the_same_function(deep, k):
    """Checkpointing the first k layers changes what is kept, not the loss or the gradients."""
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 24))
    results = []
    for ckpt, layers in ((False, None), (True, k)):
        model, _ = lora_model(deep)
        model.model.gradient_checkpointing, model.model.checkpoint_layers = ckpt, layers
        results.append(loss_and_grads(model, ids))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0)


def test_trainer_applies_the_plan(deep, tmp_path):
    """gradient_checkpointing="auto" with a budget: the Trainer sets the planned checkpointing on the
    model while it trains, reports the plan, and trains as the same plan set by hand would."""
    rows = text_rows(8, seed=2)
    model, tok = lora_model(deep)
    probe = Trainer(model, tok, rows, config=TrainConfig(output_dir=str(tmp_path / "probe"), max_steps=1,
                                                        batch_size=2, progress_bar=False, plot=False))
    seq = max(len(u) for u in probe.train_units)
    need = memory.estimate(model, batch=2, seq=seq, checkpoint_layers=2)["total"]
    budget_gb = need / (1 - memory.PLAN_MARGIN) / memory.GIB * 1.0001
    losses = {}
    for name, cfg in {"auto": dict(gradient_checkpointing="auto", memory_budget_gb=budget_gb),
                      "hand": dict(gradient_checkpointing=True)}.items():
        model, tok = lora_model(deep)
        if name == "hand":
            model.model.checkpoint_layers = 2
        seen = []
        layer0 = model.model.layers[0]
        layer0.register_forward_pre_hook(lambda m, a: seen.append((model.model.gradient_checkpointing,
                                                                   model.model.checkpoint_layers)))
        tr = Trainer(model, tok, rows, config=TrainConfig(output_dir=str(tmp_path / name), max_steps=3, batch_size=2,
                                                          progress_bar=False, plot=False, seed=4, **cfg))
        losses[name] = tr.train().losses
        if name == "auto":
            assert tr.memory_plan is not None and tr.memory_plan.checkpoint_layers == 2
            assert seen and all(s == (True, 2) for s in seen)
            assert model.model.checkpoint_layers is None  # restored after train()
    assert losses["auto"] == losses["hand"]


def test_bad_memory_fields():
    for bad in (-1, 0, "8", True):
        with pytest.raises(TrainConfigError, match="memory_budget_gb"):
            TrainConfig(memory_budget_gb=bad, gradient_checkpointing="auto").validate()
    with pytest.raises(TrainConfigError, match="memory_budget_gb"):
        TrainConfig(memory_budget_gb=8, gradient_checkpointing=True).validate()
    with pytest.raises(TrainConfigError, match="gradient_checkpointing"):
        TrainConfig(gradient_checkpointing="sometimes").validate()
    TrainConfig(gradient_checkpointing="auto").validate()


def test_auto_without_budget_off_cuda_checkpoints_every_layer(llama, tmp_path):  # noqa: F811
    model, tok = lora_model(llama)
    tr = Trainer(model, tok, text_rows(4), config=TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2,
                                                             progress_bar=False, plot=False,
                                                             gradient_checkpointing="auto"))
    assert tr.memory_plan is None
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(model.model.gradient_checkpointing))
    tr.train()
    assert seen and all(s is True for s in seen)


@pytest.mark.gpu
@pytest.mark.parametrize("budget_gb", [1.5, 3.0])
def test_peak_stays_within_the_budget(tmp_path, budget_gb):
    """A Llama-shaped model of ~0.5B on CUDA: the plan for `budget_gb` keeps the measured peak of a
    training run within the budget."""
    path = tiny_llama(tmp_path / "m", hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
    model, tok = minift.load(path, dtype=torch.bfloat16, device="cuda")
    minift.add_lora(model, r=16, alpha=16)
    rows = [{"text": " ".join(["the quick brown fox"] * 600)} for _ in range(8)]
    torch.cuda.reset_peak_memory_stats()
    tr = Trainer(model, tok, rows, config=TrainConfig(output_dir=str(tmp_path / "o"), max_steps=2, batch_size=4,
                                                      max_seq_length=2048, progress_bar=False, plot=False,
                                                      gradient_checkpointing="auto", memory_budget_gb=budget_gb))
    tr.train()
    assert tr.memory_plan is not None
    assert torch.cuda.max_memory_allocated() <= budget_gb * memory.GIB, tr.memory_plan.describe()


@pytest.fixture(scope="module")
def sandwich(tmp_path_factory):
    """A tiny Gemma 3 text model: post-feedforward norms after each MLP (sandwich layers)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sandwich") / "m", "gemma3_text", num_hidden_layers=3)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("ckpt", [False, True, "offload"])
def test_chunked_mlp_is_the_same_function(deep, sandwich, family, ckpt):
    """Long context: each MLP over 5 tokens at a time (48 tokens: 10 chunks, the last short), each chunk
    recomputed in the backward, gives the unchunked loss and gradients (fp32; the GEMMs over fewer
    rows may round differently in the last bits). Each chunk runs twice, its forward and its
    recompute: a checkpointed layer's own recompute skips the MLP (`arch.model._chunked`)."""
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 24))
    results = []
    for chunk in (None, 5):
        model, _ = lora_model(deep if family == "llama" else sandwich)
        model.model.gradient_checkpointing, model.model.mlp_chunk_tokens = ckpt, chunk
        calls = []
        model.model.layers[1].mlp.gate_proj.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
        results.append(loss_and_grads(model, ids))
        if chunk:
            assert sorted(calls) == [48 % 5] * 2 + [5] * 18
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


def test_chunked_mlp_without_checkpoint_early_stop(sandwich):
    """With the checkpoints' early stop off, a layer's recompute runs past its MLP: what the skipped
    chunks return reaches only the discarded skip-connection sum, never a saved tensor."""
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    results = []
    for chunk in (None, 5):
        model, _ = lora_model(sandwich)
        model.model.gradient_checkpointing, model.model.mlp_chunk_tokens = True, chunk
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            results.append(loss_and_grads(model, ids))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


def test_chunked_mlp_with_fused_lora(sandwich):
    """add_lora(fuse=True) swaps each MLP for a FusedLoraMLP: it keeps the chunk setting (readable on
    the model, kept when unfused) and runs long batches in chunks, each projection still fused."""
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(4))
    model, _ = lora_model(sandwich)
    model.model.gradient_checkpointing = True
    l0, g0 = loss_and_grads(model, ids)
    model, _ = minift.load(sandwich)
    minift.add_lora(model, r=4, alpha=8, seed=1, fuse=True)
    model.model.gradient_checkpointing, model.model.mlp_chunk_tokens = True, 5
    assert model.model.mlp_chunk_tokens == 5
    calls = []
    model.model.layers[1].mlp.gate_proj.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    l1, g1 = loss_and_grads(model, ids)
    assert sorted(calls) == [48 % 5] * 2 + [5] * 18
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)
    minift.lora.set_fused(model, False)
    assert model.model.mlp_chunk_tokens == 5


@pytest.mark.parametrize("chunk", [None, 7])
def test_chunked_mlp_recompute_replays_dropout(deep, chunk):
    """With LoRA dropout, the layers' (and the chunks') recomputes draw the same masks as the
    forward: checkpointed and plain runs agree exactly (a layer that draws random numbers keeps
    its checkpoint's RNG state; one without, arch.model.draws_random, saves none)."""
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for ckpt in (False, True):
        model, _ = minift.load(deep)
        minift.add_lora(model, r=4, alpha=8, dropout=0.3, seed=1)
        model.model.gradient_checkpointing, model.model.mlp_chunk_tokens = ckpt, chunk
        assert draws_random(model.model.layers[0]) and not draws_random(model.model.norm)
        torch.manual_seed(5)
        results.append(loss_and_grads(model, ids))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0)


def test_chunked_mlp_estimate_and_plan(deep):
    """Chunking drops the intermediate-sized activations to one chunk's; the planner takes it only
    once offloaded checkpoints do not fit, and only for batches longer than a chunk."""
    model, _ = lora_model(deep)
    cfg = model.config
    kw = dict(batch=2, seq=8192)
    n = 2 * 8192
    est = lambda **k: memory.estimate(model, **kw, **k)  # noqa: E731
    plain, chunked = est(checkpointing="offload"), est(checkpointing="offload", mlp_chunk=memory.MLP_CHUNK)
    assert plain["one_layer"] - chunked["one_layer"] == (n - memory.MLP_CHUNK) * 5 * cfg.intermediate_size * 2
    room = lambda b: int(b / (1 - memory.PLAN_MARGIN)) + 2  # noqa: E731
    p = memory.plan(model, budget_bytes=room(plain["total"]), **kw)
    assert (p.checkpointing, p.mlp_chunk_tokens, p.fits) == ("offload", None, True)
    p = memory.plan(model, budget_bytes=room(chunked["total"]), **kw)
    assert (p.checkpointing, p.mlp_chunk_tokens, p.fits) == ("offload", memory.MLP_CHUNK, True)
    assert p.estimate == chunked["total"] and "chunks of 8192 tokens" in p.describe()
    assert memory.plan(model, budget_bytes=1, batch=1, seq=8192).mlp_chunk_tokens is None  # one chunk: no gain


def test_offload_plans_need_host_memory(deep):
    """Offloaded checkpoints live in host memory, L * N * H * 2 bytes: where the host's free memory
    cannot take them, the plan keeps every layer checkpointed on the device with its MLPs chunked."""
    model, _ = lora_model(deep)
    cfg = model.config
    kw = dict(batch=2, seq=8192)
    need = memory.host_offload_bytes(model, **kw)
    assert need == cfg.num_hidden_layers * 2 * 8192 * cfg.hidden_size * 2
    budget = int(memory.estimate(model, **kw, checkpointing="offload")["total"] / (1 - memory.PLAN_MARGIN)) + 2
    for host in (None, 2 * need):
        p = memory.plan(model, budget_bytes=budget, host_budget_bytes=host, **kw)
        assert (p.checkpointing, p.host_bytes, p.fits) == ("offload", need, True)
        assert f"{need / memory.GIB:.1f} GiB of host memory" in p.describe()
        assert memory.host_shortfall(model, host_budget_bytes=host, **kw) is None
    p = memory.plan(model, budget_bytes=budget, host_budget_bytes=need, **kw)  # less the margin: short
    assert (p.checkpointing, p.checkpoint_layers, p.mlp_chunk_tokens, p.host_bytes) == (True, None, memory.MLP_CHUNK, 0)
    assert p.estimate == memory.estimate(model, **kw, checkpointing=True, mlp_chunk=memory.MLP_CHUNK)["total"]
    assert "every decoder layer checkpointed, MLPs in chunks of 8192 tokens" in p.describe()
    why = memory.host_shortfall(model, host_budget_bytes=need, **kw)
    assert why is not None and "2 x 8192 tokens" in why and "host memory" in why
    assert memory.host_budget() is None or memory.host_budget() > 0


def test_trainer_mlp_chunk_tokens(deep, tmp_path):
    """TrainConfig(mlp_chunk_tokens=...) is set on the model while it trains (and restored), and
    trains as the unchunked run does."""
    rows = text_rows(8, seed=3)
    losses = {}
    for chunk in (None, 6):
        model, tok = lora_model(deep)
        seen = []
        model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(model.model.mlp_chunk_tokens))
        tr = Trainer(model, tok, rows, config=TrainConfig(output_dir=str(tmp_path / str(chunk)), max_steps=3,
                                                          batch_size=2, progress_bar=False, plot=False, seed=4,
                                                          mlp_chunk_tokens=chunk))
        losses[chunk] = tr.train().losses
        assert seen and set(seen) == {chunk}
        assert model.model.mlp_chunk_tokens is None
    assert losses[6] == pytest.approx(losses[None], rel=1e-6)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(TrainConfigError, match="mlp_chunk_tokens"):
            TrainConfig(mlp_chunk_tokens=bad).validate()


def test_chunked_mlp_inside_compiled_layers(deep):
    """The Trainer compiles each decoder layer: the chunk loop runs eagerly inside it (a graph break,
    not a graph per length) and the chunks through one compiled function shared by every layer
    (`compile_mlp_chunks`), with the same loss and gradients as the eager model."""
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(2))
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, _ = lora_model(deep)
        model.train()
        model.model.gradient_checkpointing, model.model.mlp_chunk_tokens = True, 16
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        if compiled:  # as the Trainer compiles
            model.model.input_requires_grad = True
            for layer in model.model.layers:
                layer.compile(dynamic=True)
            model.model.compile_mlp_chunks()  # the chunks, outside the layers' graphs, compiled too
        losses = []
        for n in (24, 20):  # a second length: no recompile of the chunk loop
            out = model(ids[:, :n], labels=ids[:, :n])
            out.loss.backward()
            losses.append(out.loss.detach())
        results.append((losses, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
        if compiled:  # the layers' two graphs (before and after the chunk loop) and the chunks' few (a
            # first chunk at offset 0, the others): a chunk graph a layer would make 2 + 6 or more
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
            assert graphs < 2 + len(model.model.layers), graphs
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)
