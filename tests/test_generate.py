"""Generation: greedy `model.generate` equals transformers' `generate` token for token (left-padded
batches of different lengths, sliding windows, soft-capping, images, 4-bit, LoRA), the sampling
rules equal transformers' logits processors, and the text-level `minift.generate` / `chat`."""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import numpy as np
import peft
import pytest
import torch
import transformers
from PIL import Image
from torch._dynamo.utils import counters

import minift
from minift.arch.cache import KVCache
from minift.errors import InputError
from minift.infer import sampling
from minift.infer.text import stop_ids
from minift.testing import write_tiny_checkpoint, write_tiny_gemma3_vision

warnings.filterwarnings("ignore", module="peft")
NEW = 10
PROMPTS = ["The quick brown fox jumps", "Two plus", "Water boils at one hundred degrees"]


def batch(tok, prompts=PROMPTS):
    tok.padding_side = "left"
    return dict(tok(prompts, return_tensors="pt", padding=True))


def hf_greedy(ref, enc, **kw):
    with torch.no_grad():
        return ref.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)


def ours(model, enc, **kw):
    return model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=NEW, pad_token_id=0, **kw)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and torch.equal(a, b), f"\nminift {a.tolist()}\nhf     {b.tolist()}"


FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 6},  # prompt and new tokens both run past the window (ring buffer)
    "gemma": {},
    "gemma2": {"sliding_window": 6},  # soft-capping, alternating sliding layers
    "gemma3_text": {"sliding_window": 6},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers(tmp_path, family):
    path = write_tiny_checkpoint(tmp_path, family, **FAMILIES[family])
    model, tok = minift.load(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    enc = batch(tok)
    # eos off: every row runs the full length, so every cache slot is exercised
    assert_same(ours(model, enc, eos_token_id=[]), hf_greedy(ref, enc, eos_token_id=None))
    # the checkpoint's own eos (generation_config.json), rows ending at different steps
    assert_same(ours(model, enc), hf_greedy(ref, enc))


def add_random_adapter(model, save_dir) -> None:
    """LoRA r=4 with random B (every adapter changes the output), saved in PEFT's format."""
    minift.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    model.save_adapter(save_dir)


def hf_4bit(path):
    """transformers over bitsandbytes' NF4 (double quantisation, float32 compute) on the CPU."""
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                                            quantization_config=cfg).eval()
    for m in ref.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return ref


def test_greedy_on_a_4bit_base_equals_transformers(tmp_path):
    path = write_tiny_checkpoint(tmp_path, "llama")
    model, tok = minift.load(path, load_in_4bit=True)
    ref = hf_4bit(path)
    enc = batch(tok)
    assert_same(ours(model, enc, eos_token_id=[]), hf_greedy(ref, enc, eos_token_id=None))


def test_greedy_qlora_equals_peft(tmp_path):
    """A 4-bit base with an unmerged adapter (a QLoRA model right after training): each one-row
    projection adds its adapter in the NF4 GEMV's epilogue; tokens equal PEFT over bitsandbytes."""
    import importlib
    from unittest import mock

    nm = importlib.import_module("minift.ops.nf4_matmul")
    path = write_tiny_checkpoint(tmp_path / "base", "llama")
    model, tok = minift.load(path, load_in_4bit=True)
    add_random_adapter(model, tmp_path / "ad")
    ref = peft.PeftModel.from_pretrained(hf_4bit(path), tmp_path / "ad").eval()
    for prompts in (PROMPTS, PROMPTS[:1]):  # three rows a step; one row: the adapters in the epilogue
        enc = batch(tok, prompts)
        # the one-row NF4 kernel (interpreted here) for the decode steps' 4-bit projections
        with mock.patch.object(nm, "_launch_gemv", wraps=nm._launch_gemv) as one_row, \
                mock.patch.object(nm, "use_triton", lambda x: len(prompts) == 1 and x.numel() == x.shape[-1]), \
                mock.patch.object(nm, "GEMV_CONFIG_OVERRIDE", dict(BLOCK_N=64)):  # few programs to interpret
            got = ours(model, enc, eos_token_id=[])
        assert any(c.args[-1] is not None for c in one_row.call_args_list) == (len(prompts) == 1)
        assert_same(got, hf_greedy(ref, enc, eos_token_id=None))


def test_greedy_with_lora_active_merged_and_disabled_equals_peft(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "base", "gemma2", sliding_window=6)
    model, tok = minift.load(path)
    add_random_adapter(model, tmp_path / "ad")
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    enc = batch(tok)
    want = hf_greedy(ref, enc, eos_token_id=None)
    assert_same(ours(model, enc, eos_token_id=[]), want)
    model.merge_lora()
    assert_same(ours(model, enc, eos_token_id=[]), want)
    with model.disable_adapters(), ref.disable_adapter():
        assert_same(ours(model, enc, eos_token_id=[]), hf_greedy(ref, enc, eos_token_id=None))


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    path = write_tiny_gemma3_vision(tmp_path_factory.mktemp("gen") / "v")
    model, processor = minift.load(path)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")) for _ in range(2)]
    return path, model, processor, imgs


def test_greedy_gemma3_vision_with_images_equals_transformers(vision):
    path, model, processor, imgs = vision
    ref = transformers.Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]
            for t in ("What is this?", "Describe the colours of this picture please")]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in msgs]
    processor.tokenizer.padding_side = "left"
    enc = dict(processor(text=texts, images=[[i] for i in imgs], return_tensors="pt", padding=True))
    with torch.no_grad():
        want = ref.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = model.generate(enc["input_ids"], enc["attention_mask"], pixel_values=enc["pixel_values"],
                         token_type_ids=enc["token_type_ids"], max_new_tokens=NEW, pad_token_id=0, eos_token_id=[])
    assert_same(got, want)


def test_sampling_is_reproducible_and_seeded(tmp_path):
    model, tok = minift.load(write_tiny_checkpoint(tmp_path, "llama"))
    enc = batch(tok)
    kw = dict(do_sample=True, temperature=1.5, top_k=40, top_p=0.9, eos_token_id=[])
    a, b, c = (ours(model, enc, seed=s, **kw) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name, ours_fn, hf", [
    ("temperature", lambda s: s / 0.7, transformers.TemperatureLogitsWarper(0.7)),
    ("top_k", lambda s: sampling.top_k(s, 5), transformers.TopKLogitsWarper(5)),
    ("top_p", lambda s: sampling.top_p(s, 0.8), transformers.TopPLogitsWarper(0.8)),
    ("min_p", lambda s: sampling.min_p(s, 0.1), transformers.MinPLogitsWarper(0.1)),
])
def test_sampling_rules_equal_transformers(name, ours_fn, hf):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=g) * 3
    ids = torch.randint(0, 50, (4, 7), generator=g)
    assert torch.equal(ours_fn(scores.clone()), hf(ids, scores.clone())), name


def test_repetition_penalty_and_process_order_equal_transformers():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 40, generator=g) * 2
    ids = torch.randint(0, 40, (3, 9), generator=g)
    procs = transformers.LogitsProcessorList([
        transformers.RepetitionPenaltyLogitsProcessor(1.3), transformers.TemperatureLogitsWarper(0.8),
        transformers.TopKLogitsWarper(12), transformers.TopPLogitsWarper(0.9), transformers.MinPLogitsWarper(0.05),
    ])
    s = sampling.Sampling(do_sample=True, temperature=0.8, top_k=12, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    assert torch.equal(sampling.process(scores.clone(), ids, s), procs(ids, scores.clone()))
    greedy = sampling.Sampling(repetition_penalty=1.3)
    want = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    assert torch.equal(sampling.process(scores.clone(), ids, greedy), want)


def test_eos_and_stop_strings_end_rows_separately(tmp_path):
    model, tok = minift.load(write_tiny_checkpoint(tmp_path, "llama"))
    enc = batch(tok)
    free = ours(model, enc, eos_token_id=[])
    new = free[:, enc["input_ids"].shape[1]:]
    # eos = the token row 0 generates third: row 0 stops there, the others run on (or stop on their own)
    eos = int(new[0, 2])
    got = ours(model, enc, eos_token_id=eos)
    assert got[0, enc["input_ids"].shape[1] + 2] == eos
    assert (got[0, enc["input_ids"].shape[1] + 3:] == 0).all()
    for r in range(1, len(PROMPTS)):
        row = new[r].tolist()
        stop_at = row.index(eos) if eos in row else len(row)
        assert got[r, enc["input_ids"].shape[1]:][: stop_at + 1].tolist() == row[: stop_at + 1]
    # a stop string made of row 1's 2nd and 3rd new tokens ends row 1 after its 3rd token
    text = tok.decode(new[1, 1:3])
    got = ours(model, enc, eos_token_id=[], stop_strings=[text], tokenizer=tok)
    n = enc["input_ids"].shape[1]
    assert got[1, n:n + 3].tolist() == new[1, :3].tolist() and (got[1, n + 3:] == 0).all()


def test_greedy_with_repetition_penalty_equals_transformers(tmp_path):
    """The penalty inside the decode step (a mask of the tokens seen, prompt and padding included)
    gives transformers' tokens."""
    path = write_tiny_checkpoint(tmp_path, "llama")
    model, tok = minift.load(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    enc = batch(tok)
    plain = hf_greedy(ref, enc, eos_token_id=None)
    for penalty in (1.3, 0.7):
        want = hf_greedy(ref, enc, eos_token_id=None, repetition_penalty=penalty)
        assert not torch.equal(want, plain)  # the penalty changes these tokens
        assert_same(ours(model, enc, eos_token_id=[], repetition_penalty=penalty), want)


def test_compiled_decode_steps_equal_eager(tmp_path):
    """The compiled decode steps (CUDA graphs on a GPU; inductor here): greedy with its pick and
    eos bookkeeping inside the step, and the step a repetition penalty uses (picked outside it),
    each give the eager loop's tokens, rows ending on eos at different steps."""
    model, tok = minift.load(write_tiny_checkpoint(tmp_path, "llama"))
    enc = batch(tok)
    free = ours(model, enc, eos_token_id=[])
    eos = int(free[0, enc["input_ids"].shape[1] + 2])
    for kw in ({"eos_token_id": eos}, {"eos_token_id": eos, "repetition_penalty": 1.3}):
        torch._dynamo.reset()
        counters.clear()
        assert_same(ours(model, enc, compile=True, **kw), ours(model, enc, compile=False, **kw))
        assert counters["stats"]["unique_graphs"] == 1, "the decode step compiled more than once"


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_decode_attention_equals_transformers(tmp_path, family, monkeypatch):
    """The decode step's one-launch attention (q/k norms, RoPE, the cache write and attention in
    ops.decode_attention's kernel, here under Triton's interpreter), eager and compiled: greedy
    tokens equal transformers' past sliding windows, with soft-capping and qk norms."""
    import importlib

    kernel = importlib.import_module("minift.ops.decode_attention")
    calls = []
    impl = kernel._op.impl
    monkeypatch.setattr(kernel._op, "impl", lambda *a: calls.append(1) or impl(*a))
    monkeypatch.setattr(KVCache, "fused_attention", True)
    path = write_tiny_checkpoint(tmp_path, family, **FAMILIES[family])
    model, tok = minift.load(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    enc = batch(tok)
    want = hf_greedy(ref, enc, eos_token_id=None)
    with minift.ops.backend("triton"):
        assert_same(ours(model, enc, eos_token_id=[]), want)
        assert len(calls) == (NEW - 1) * model.config.num_hidden_layers, "the decode steps did not take the kernel"
        if family == "gemma3_text":  # compiled: the cache written in place inside the graph
            torch._dynamo.reset()
            assert_same(ours(model, enc, eos_token_id=[], compile=True), want)


def test_text_generate_and_chat(tmp_path):
    model, tok = minift.load(write_tiny_checkpoint(tmp_path, "llama"))
    enc = batch(tok, PROMPTS[:1])
    ids = ours(model, enc, eos_token_id=[])
    text = minift.generate(model, tok, PROMPTS[0], max_new_tokens=NEW, eos_token_id=[])
    assert text == tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert minift.generate(model, tok, PROMPTS, max_new_tokens=4)[0] == minift.generate(model, tok, PROMPTS[0],
                                                                                         max_new_tokens=4)
    msgs = [{"role": "user", "content": "Hello there"}]
    pieces: list[str] = []
    reply = minift.chat(model, tok, msgs, max_new_tokens=8, stream=pieces.append)
    assert "".join(pieces) == reply
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
    want = model.generate(ids, max_new_tokens=8, eos_token_id=[tok.convert_tokens_to_ids("<|eot_id|>"), 2])
    assert reply == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_with_an_image(vision):
    path, model, processor, imgs = vision
    msgs = [{"role": "user", "content": [{"type": "image", "image": imgs[0]}, {"type": "text", "text": "What?"}]}]
    reply = minift.chat(model, processor, msgs, max_new_tokens=6)
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[[imgs[0]]], return_tensors="pt", add_special_tokens=False)
    want = model.generate(enc["input_ids"], enc["attention_mask"], pixel_values=enc["pixel_values"],
                          token_type_ids=enc["token_type_ids"], max_new_tokens=6,
                          eos_token_id=stop_ids(model, processor.tokenizer))
    new = [t for t in want[0, enc["input_ids"].shape[1]:].tolist()
           if t not in stop_ids(model, processor.tokenizer)]
    assert reply == processor.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("kw, text", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=300), "context"),
    (dict(temperature=0.0, do_sample=True), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(pixel_values=torch.zeros(1, 3, 8, 8)), "text-only"),
])
def test_bad_generate_arguments(tmp_path, kw, text):
    model, tok = minift.load(write_tiny_checkpoint(tmp_path, "llama"))
    enc = batch(tok)
    kw = {"max_new_tokens": NEW, **kw}
    with pytest.raises(InputError, match=text):
        model.generate(enc["input_ids"], enc["attention_mask"], **kw)


def test_bad_text_level_input(tmp_path, vision):
    model, tok = minift.load(write_tiny_checkpoint(tmp_path, "llama"))
    with pytest.raises(InputError, match="text-only"):
        minift.generate(model, tok, "hi", images=[vision[3][0]])
    _, vmodel, processor, imgs = vision
    with pytest.raises(InputError, match="processor"):
        minift.generate(vmodel, processor.tokenizer, "<start_of_image> hi", images=[imgs[0]])
    enc = batch(tok)
    right = enc["attention_mask"].flip(1)
    with pytest.raises(InputError, match="right padding"):
        model.generate(enc["input_ids"], right, max_new_tokens=2)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("fused_attention", [False, True])
def test_cuda_graph_decode_equals_transformers(tmp_path, family, fused_attention, monkeypatch):
    """The compiled (CUDA-graph) decode step on a GPU: greedy tokens equal transformers' in fp32,
    twice in a row (a second call replays the compiled step)."""
    monkeypatch.setattr(KVCache, "fused_attention", fused_attention)
    path = write_tiny_checkpoint(tmp_path, family, **FAMILIES[family])
    model, tok = minift.load(path, device="cuda", dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    enc = {k: v.cuda() for k, v in batch(tok).items()}
    want = hf_greedy(ref, enc, eos_token_id=None)
    counters.clear()
    for _ in range(2):
        assert_same(ours(model, enc, eos_token_id=[], compile=True), want)
    # rows ending on eos at different steps, inside the graph's bookkeeping
    eos = int(want[0, enc["input_ids"].shape[1] + 2])
    assert_same(ours(model, enc, eos_token_id=eos, compile=True), hf_greedy(ref, enc, eos_token_id=eos))
    assert not counters["inductor"]["cudagraph_skips"], "the decode step ran without CUDA graphs"
