"""4-bit (NF4) loading against bitsandbytes and transformers' 4-bit models (CPU, tiny checkpoints).

Every quantised input size is a multiple of 64 (bitsandbytes' CPU 4-bit path needs it). The
transformers references have bitsandbytes' CPU bf16 fast path turned off
(`support_avx512bf16_for_cpu`): on AVX512-BF16 CPUs it repacks the weights and multiplies in
bfloat16, which is not the fp32 reference wanted here. With it off, both sides dequantise to the
same fp32 weights and the logits agree exactly (asserted to 1e-6).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

import minift
import minift.quant as mq
from minift.arch.model import Linear as DecoderLinear  # the decoder's 16-bit linear (an nn.Linear)
from minift.errors import HubError, QuantizationError
from minift.io.names import map_name, twin_candidates
from minift.quant import Linear4bit
from minift.testing import write_tiny_checkpoint

BF = bnb.functional
TOL = 1e-6
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def bnb_config(**kw) -> transformers.BitsAndBytesConfig:
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, **kw,
    )


def hf_4bit(path: Path, cls=transformers.AutoModelForCausalLM, **kw):
    """transformers' 4-bit model, with bitsandbytes' CPU bf16 path off (see the module docstring)."""
    model = cls.from_pretrained(path, dtype=torch.float32, device_map="cpu", **kw).eval()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def save_4bit(model, src: Path, dst: Path) -> Path:
    """save_pretrained of a 4-bit model, plus the tokenizer/processor files of `src`."""
    model.save_pretrained(dst)
    for f in src.iterdir():
        if not f.name.startswith(("model", "config")):
            shutil.copy(f, dst / f.name)
    return dst


def bnb_weight(sd: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, object]:
    """(packed data, QuantState) of `prefix` ('….q_proj.weight') as bitsandbytes reads a checkpoint."""
    parts = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    return sd[prefix], BF.QuantState.from_dict(parts, device=torch.device("cpu"))


def ids_batch(vocab: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A 16-bit llama (biased attention, untied head), its transformers 4-bit save and that model."""
    root = tmp_path_factory.mktemp("quant")
    fp = write_tiny_checkpoint(root / "fp", "llama", hidden_size=64, intermediate_size=128, attention_bias=True,
                               tie_word_embeddings=False)
    ref = hf_4bit(fp, quantization_config=bnb_config())
    q = save_4bit(ref, fp, root / "bnb")
    return fp, q, ref


def linear4bit_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def test_prequantized_checkpoint_is_bnb_exact(ckpts):
    _, q, ref = ckpts
    model, _ = minift.load(q, load_in_4bit=True)
    sd = load_file(str(q / "model.safetensors"))
    names = linear4bit_names(model)
    assert names == {f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
                     for i in range(2) for p in LINEARS}
    for n in names:
        mod = model.get_submodule(n)
        data, qs = bnb_weight(sd, f"{n}.weight")
        assert torch.equal(mod.weight, data) and mod.weight.dtype == torch.uint8  # stored as is
        assert torch.equal(mod.dequantize(), BF.dequantize_4bit(data, qs)), n  # bit for bit
        assert not any(t.requires_grad for t in mod.parameters())
    ids = ids_batch(model.config.vocab_size)
    with torch.no_grad():
        assert rel(model(ids).logits, ref(input_ids=ids).logits) <= TOL


def test_quantize_while_loading_equals_bitsandbytes(ckpts):
    fp, q, ref = ckpts
    model, _ = minift.load(fp, load_in_4bit=True)
    src = load_file(str(fp / "model.safetensors"))
    saved = load_file(str(q / "model.safetensors"))
    for n in linear4bit_names(model):
        mod = model.get_submodule(n)
        data, qs = BF.quantize_4bit(src[f"{n}.weight"], blocksize=64, compress_statistics=True, quant_type="nf4",
                                    quant_storage=torch.uint8)
        for mine, theirs in [(mod.weight, data), (mod.absmax, qs.absmax), (mod.quant_map, qs.code),
                             (mod.nested_absmax, qs.state2.absmax), (mod.nested_quant_map, qs.state2.code),
                             (mod.offset, qs.offset)]:
            assert torch.equal(mine, theirs), n
        assert torch.equal(mod.weight, saved[f"{n}.weight"]) and torch.equal(mod.absmax, saved[f"{n}.weight.absmax"])
        if "self_attn" in n:
            assert mod.bias is not None and torch.equal(mod.bias, src[f"{n}.bias"])
    # everything else stays in the load dtype, untouched
    assert type(model.lm_head) is DecoderLinear and torch.equal(model.lm_head.weight, src["lm_head.weight"])
    assert torch.equal(model.model.embed_tokens.weight, src["model.embed_tokens.weight"])
    assert torch.equal(model.model.layers[0].input_layernorm.weight, src["model.layers.0.input_layernorm.weight"])
    ids = ids_batch(model.config.vocab_size)
    with torch.no_grad():
        assert rel(model(ids).logits, ref(input_ids=ids).logits) <= TOL


def test_memory_is_about_4_bits(ckpts):
    fp, _, _ = ckpts
    m16, _ = minift.load(fp)
    m4, _ = minift.load(fp, load_in_4bit=True)
    lin16 = lin4 = 0
    for n in linear4bit_names(m4):
        q, d = m4.get_submodule(n), m16.get_submodule(n)
        numel = d.weight.numel()
        blocks = numel // 64
        assert q.weight.numel() == numel // 2  # two codes a byte
        # packed codes + uint8 absmax + nested fp32 absmax/offset + the two code books
        assert sum(b.numel() * b.element_size() for b in q.buffers()) == numel // 2 + blocks + 4 * (
            -(-blocks // 256) + 1 + 16 + 256)
        lin16 += numel * 4
        lin4 += sum(b.numel() * b.element_size() for b in q.buffers())
    assert mq.model_nbytes(m4) == mq.model_nbytes(m16) - lin16 + lin4
    # at real sizes the fixed code books vanish: ~4.13 bits a weight
    w = torch.randn(1024, 1024)
    big = Linear4bit.from_nf4(minift.ops.NF4Weight.from_bnb(*BF.quantize_4bit(
        w, blocksize=64, compress_statistics=True, quant_type="nf4")))
    assert 4.12 < mq.bits_per_weight(big) < 4.14


def test_bf16_load_quantises_the_bf16_weights(ckpts):
    fp, _, _ = ckpts
    model, _ = minift.load(fp, load_in_4bit=True, dtype=torch.bfloat16)
    w = load_file(str(fp / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16)
    data, qs = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    mod = model.model.layers[1].mlp.down_proj
    assert torch.equal(mod.weight, data) and torch.equal(mod.dequantize(), BF.dequantize_4bit(data, qs))
    with torch.no_grad():
        out = model(ids_batch(model.config.vocab_size)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_linear4bit_module_surface():
    w = torch.randn(128, 64)
    nf4 = minift.ops.NF4Weight.from_bnb(*BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
    m = Linear4bit.from_nf4(nf4, bias=torch.randn(128))
    assert (m.in_features, m.out_features) == (64, 128) and m.nf4.shape == (128, 64)
    with minift.ops.backend("triton"):  # the kernel (interpreted on CPU) and the reference agree
        assert torch.equal(m.dequantize(), BF.dequantize_4bit(m.weight, nf4.to_bnb_quant_state()))
    x = torch.randn(3, 64)
    assert torch.equal(m(x), nn.functional.linear(x, m.dequantize(), m.bias))
    code = m.quant_map.clone()
    m.to(torch.bfloat16)  # a model-wide cast must not round the statistics
    assert m.compute_dtype == torch.bfloat16 and m.quant_map.dtype == torch.float32 and torch.equal(m.quant_map, code)
    assert m.dequantize().dtype == torch.bfloat16 and m(x.bfloat16()).dtype == torch.bfloat16
    fresh = Linear4bit(64, 128, compute_dtype=torch.bfloat16, device="meta")
    fresh.load_state_dict(m.state_dict(), assign=True)
    assert torch.equal(fresh.dequantize(), m.dequantize())


def test_prequantized_without_double_quant(ckpts, tmp_path):
    fp, _, _ = ckpts
    ref = hf_4bit(fp, quantization_config=transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    q = save_4bit(ref, fp, tmp_path / "single")
    model, _ = minift.load(q, load_in_4bit=True)
    mod = model.model.layers[0].mlp.gate_proj
    assert mod.nested_absmax is None and mod.absmax.dtype == torch.float32
    data, qs = bnb_weight(load_file(str(q / "model.safetensors")), "model.layers.0.mlp.gate_proj.weight")
    assert torch.equal(mod.dequantize(), BF.dequantize_4bit(data, qs))
    ids = ids_batch(model.config.vocab_size)
    with torch.no_grad():
        assert rel(model(ids).logits, ref(input_ids=ids).logits) <= TOL


def test_skip_modules_stay_16bit(ckpts, tmp_path):
    fp, _, _ = ckpts
    skip = ["down_proj", "model.layers.1.self_attn", "lm_head"]
    ref = hf_4bit(fp, quantization_config=bnb_config(llm_int8_skip_modules=skip))
    q = save_4bit(ref, fp, tmp_path / "skip")
    model, _ = minift.load(q, load_in_4bit=True)
    four = linear4bit_names(model)
    assert four == {n for n, m in ref.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert "model.layers.0.mlp.down_proj" not in four and "model.layers.1.self_attn.q_proj" not in four
    assert type(model.model.layers[1].self_attn.q_proj) is DecoderLinear
    ids = ids_batch(model.config.vocab_size)
    with torch.no_grad():
        assert rel(model(ids).logits, ref(input_ids=ids).logits) <= TOL
    # a skip entry naming a module the file stores 4-bit: kept 16-bit by dequantising it exactly
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"]["llm_int8_skip_modules"] = skip + ["model.layers.0.mlp.up_proj"]
    (q / "config.json").write_text(json.dumps(cfg))
    model, _ = minift.load(q, load_in_4bit=True)
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is DecoderLinear and up.weight.dtype == torch.float32
    data, qs = bnb_weight(load_file(str(q / "model.safetensors")), "model.layers.0.mlp.up_proj.weight")
    assert torch.equal(up.weight, BF.dequantize_4bit(data, qs))
    with torch.no_grad():
        assert rel(model(ids).logits, ref(input_ids=ids).logits) <= TOL


# ---- bad input ---------------------------------------------------------------------------------------


def broken_copy(q: Path, dst: Path, edit) -> Path:
    shutil.copytree(q, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _json_tensor(d: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)


QS = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"


def _reshape_state(sd):
    d = json.loads(bytes(sd[QS].tolist()))
    d["shape"] = [32, 128]
    sd[QS] = _json_tensor(d)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("model.layers.0.self_attn.q_proj.weight.absmax"), r"q_proj\.weight\.absmax missing"),
        (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight.nested_quant_map"),
         r"up_proj\.weight\.nested_quant_map missing"),
        (lambda sd: sd.update({QS: torch.tensor([1, 2, 250], dtype=torch.uint8)}), r"q_proj.*not the packed JSON"),
        (_reshape_state, r"quant_state shape \(32, 128\) does not match config \(64, 64\)"),
        (lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight.absmax": torch.zeros(7, dtype=torch.uint8)}),
         r"k_proj\.weight\.absmax"),
    ],
    ids=["no-absmax", "no-nested-map", "bad-json", "bad-shape", "bad-absmax"],
)
def test_malformed_quant_state(ckpts, tmp_path, edit, match):
    path = broken_copy(ckpts[1], tmp_path / "broken", edit)
    with pytest.raises(QuantizationError, match=match):
        minift.load(path, load_in_4bit=True)


@pytest.mark.parametrize(
    "qc, match",
    [
        ({"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}, "8-bit"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
         "'fp4' is not supported"),
        ({"quant_method": "gptq", "bits": 4}, "'gptq' is not supported"),
    ],
    ids=["8bit", "fp4", "gptq"],
)
def test_unsupported_quantization_configs(ckpts, tmp_path, qc, match):
    path = shutil.copytree(ckpts[1], tmp_path / "other")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=match):
        minift.load(path, load_in_4bit=True)


def test_without_bitsandbytes(ckpts, monkeypatch):
    fp, q, _ = ckpts

    def missing():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(mq.bnb, "_import_bnb", missing)
    with pytest.raises(QuantizationError, match="needs bitsandbytes"):
        minift.load(fp, load_in_4bit=True)
    model, _ = minift.load(q, load_in_4bit=True)  # a pre-quantised checkpoint does not need it
    assert linear4bit_names(model)


def test_4bit_refuses_full_finetuning(ckpts):
    with pytest.raises(QuantizationError, match="full_finetuning"):
        minift.load(ckpts[0], load_in_4bit=True, full_finetuning=True)


def test_prequantized_loads_4bit_even_when_16bit_asked(ckpts):
    with pytest.warns(UserWarning, match="pre-quantised"):
        model, _ = minift.load(ckpts[1])
    assert linear4bit_names(model)


# ---- the name map -----------------------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline HF cache under tmp_path; `put(repo, src_dir)` adds a snapshot of `src_dir`."""
    from huggingface_hub import HfApi, constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    calls: list[str] = []
    original = HfApi.model_info

    def model_info(self, repo, **kw):  # record, then behave as offline huggingface_hub does
        calls.append(repo)
        return original(self, repo, **kw)

    monkeypatch.setattr(HfApi, "model_info", model_info)

    def put(repo: str, src: Path) -> None:
        d = cache / f"models--{repo.replace('/', '--')}"
        rev = "0123456789abcdef0123456789abcdef01234567"
        shutil.copytree(src, d / "snapshots" / rev)
        (d / "refs").mkdir()
        (d / "refs" / "main").write_text(rev)

    put.calls = calls
    return put


def test_twin_rules():
    assert twin_candidates("unsloth/gemma-3-4b-it", True) == ["unsloth/gemma-3-4b-it-bnb-4bit"]
    assert twin_candidates("google/gemma-3-4b-it", True)[0] == "unsloth/gemma-3-4b-it-bnb-4bit"
    assert twin_candidates("unsloth/gemma-3-4b-it-bnb-4bit", True) == []
    assert twin_candidates("unsloth/gemma-3-4b-it", False) == []
    assert twin_candidates("unsloth/mistral-7b-instruct-v0.3-bnb-4bit", False) == [
        "unsloth/mistral-7b-instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"]
    assert twin_candidates("unsloth/gemma-3-4b-it-unsloth-bnb-4bit", False) == ["unsloth/gemma-3-4b-it"]


def test_name_map_prefers_cached_bnb_twin(ckpts, hub_cache):
    fp, q, _ = ckpts
    assert map_name("unsloth/gemma-3-4b", load_in_4bit=True) == "unsloth/gemma-3-4b"  # twin absent
    hub_cache("unsloth/gemma-3-4b-bnb-4bit", q)
    assert map_name("unsloth/gemma-3-4b", load_in_4bit=True) == "unsloth/gemma-3-4b-bnb-4bit"
    assert map_name("unsloth/gemma-3-4b", load_in_4bit=True, revision="abc") == "unsloth/gemma-3-4b"
    assert hub_cache.calls == []  # HF_HUB_OFFLINE=1: the map never asked the hub
    model, _ = minift.load("unsloth/gemma-3-4b", load_in_4bit=True)
    assert model.load_info.name_or_path == "unsloth/gemma-3-4b-bnb-4bit" and linear4bit_names(model)
    with pytest.raises(HubError):  # the map off: the 16-bit original is not cached
        minift.load("unsloth/gemma-3-4b", load_in_4bit=True, use_name_map=False)
    # 16-bit request for the bnb id: its 16-bit twin once cached
    assert map_name("unsloth/gemma-3-4b-bnb-4bit", load_in_4bit=False) == "unsloth/gemma-3-4b-bnb-4bit"
    hub_cache("unsloth/gemma-3-4b", fp)
    model, _ = minift.load("unsloth/gemma-3-4b-bnb-4bit")
    assert model.load_info.name_or_path == "unsloth/gemma-3-4b" and not linear4bit_names(model)


def test_name_map_online_check(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = []

    def model_info(self, repo, timeout=None, token=None, **kw):
        seen.append((repo, timeout))
        if repo != "unsloth/gemma-3-4b-it-bnb-4bit":
            raise OSError("404")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", model_info)
    assert map_name("unsloth/gemma-3-4b-it", load_in_4bit=True) == "unsloth/gemma-3-4b-it-bnb-4bit"
    assert map_name("myorg/private-model", load_in_4bit=True) == "myorg/private-model"
    assert all(t is not None and t <= 5 for _, t in seen)


# ---- Gemma 3 vision ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    from PIL import Image

    from minift.testing import write_tiny_gemma3_vision

    path = write_tiny_gemma3_vision(tmp_path_factory.mktemp("vision") / "fp", layout="save_pretrained")
    proc = transformers.AutoProcessor.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this cat?"}]}]
    inputs = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)], images=[img], return_tensors="pt")
    return path, dict(inputs)


def vision_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"],
                     token_type_ids=inputs["token_type_ids"]).logits


def test_gemma3_vision_4bit(vision, tmp_path):
    fp, inputs = vision
    ref = hf_4bit(fp, transformers.Gemma3ForConditionalGeneration, quantization_config=bnb_config())
    with torch.no_grad():
        want = ref(**inputs).logits
    tower = "model.vision_tower.vision_model.encoder.layers.0."
    model, _ = minift.load(fp, load_in_4bit=True)
    names = linear4bit_names(model)
    assert len(names) == sum(isinstance(m, bnb.nn.Linear4bit) for m in ref.modules()) == 2 * 7 + 2 * 6
    assert tower + "mlp.fc1" in names and "model.language_model.layers.1.mlp.down_proj" in names
    assert model.model.multi_modal_projector.mm_input_projection_weight.dtype == torch.float32
    assert rel(vision_logits(model, inputs), want) <= TOL
    # the pre-quantised save loads as stored
    q = save_4bit(ref, fp, tmp_path / "bnb")
    pre, _ = minift.load(q, load_in_4bit=True)
    assert linear4bit_names(pre) == names and rel(vision_logits(pre, inputs), want) <= TOL
    # quantize_vision=False: a 4-bit tower is dequantised exactly (same logits), a 16-bit one kept as is
    pre16, _ = minift.load(q, load_in_4bit=True, quantize_vision=False)
    assert type(pre16.get_submodule(tower + "self_attn.q_proj")) is nn.Linear
    assert rel(vision_logits(pre16, inputs), want) <= TOL
    m16, _ = minift.load(fp, load_in_4bit=True, quantize_vision=False)
    assert linear4bit_names(m16) == {n for n in names if "vision_tower" not in n}
    src = load_file(str(fp / "model.safetensors"))
    key = next(k for k in src if k.endswith("layers.0.mlp.fc2.weight"))
    assert torch.equal(m16.get_submodule(tower + "mlp.fc2").weight, src[key])
    dec = "model.language_model.layers.0.self_attn.v_proj"
    assert torch.equal(m16.get_submodule(dec).weight, model.get_submodule(dec).weight)
    # the language model alone, still 4-bit
    text, _ = minift.load(q, load_in_4bit=True, text_only=True)
    assert linear4bit_names(text) == {n.replace("model.language_model.", "model.") for n in names if "vision" not in n}


def test_linear4bit_input_grad_without_dense_weight_saved():
    """A 4-bit layer with no adapter gives the dense input gradient yet saves no dequantised W."""
    import bitsandbytes.functional as bnbf

    from minift.ops.nf4 import NF4Weight
    from minift.quant import Linear4bit

    w = torch.randn(128, 64)
    data, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    layer = Linear4bit.from_nf4(NF4Weight.from_bnb(data, qs))
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    dense = layer.dequantize()
    assert torch.allclose(y, x @ dense.T, atol=1e-5)
    assert torch.allclose(x.grad, g @ dense, atol=1e-5)
    assert (128, 64) not in saved


@pytest.mark.parametrize("checkpointed", [True, False])
def test_compiled_4bit_layers_dequantise_again_in_the_backward(ckpts, checkpointed):
    """Compiled, with LoRA, a training step runs each 4-bit linear as one `nf4_linear` op a forward
    pass (the forward, the checkpoint's recompute) and one `nf4_linear_dx` in the backward, which
    dequantises again rather than keeping dense weights from the forward (none is saved for it,
    checkpointed or not). The layers' graphs hold only ops, so AOTAutograd's cache keeps them (no
    bypass): a warm compile cache skips tracing. Loss and adapter gradients: the eager step's."""
    from collections import Counter

    from torch._dynamo.utils import counters

    _, q, _ = ckpts
    torch._dynamo.reset()
    model, _ = minift.load(q, dtype=torch.float32)
    weight_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, Linear4bit)}
    minift.add_lora(model, r=4, alpha=8, seed=0)
    gen = torch.Generator().manual_seed(0)
    adapters = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in adapters:  # B too (PEFT starts it at zero), so every adapter gradient is non-zero
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.train()
    lm = model.model
    lm.gradient_checkpointing, lm.input_requires_grad = checkpointed, True
    ids = ids_batch(model.config.vocab_size)

    def step(saved: list | None = None):
        saved = [] if saved is None else saved
        for p in adapters:
            p.grad = None
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in adapters]

    eager_loss, eager_grads = step()
    for layer in lm.layers:
        layer.compile()
    counters.clear()
    step()  # compiles
    assert counters["aot_autograd"]["autograd_cache_bypass"] == 0, dict(counters["aot_autograd"])
    saved: list[tuple] = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss, grads = step(saved)
    calls = Counter(e.name for e in prof.events())
    forwards = 2 if checkpointed else 1  # forward (and the checkpoint's recompute)
    assert calls["minift::nf4_linear"] == 7 * forwards * len(lm.layers)
    assert calls["minift::nf4_linear_dx"] == 7 * len(lm.layers)
    assert calls["minift::dequantize_nf4"] == calls["minift::dequantize_nf4_many"] == 0
    assert saved and not weight_shapes & set(saved)
    assert rel(loss, eager_loss) < 1e-6
    assert max(rel(g, e) for g, e in zip(grads, eager_grads)) < 1e-5


@pytest.mark.parametrize("nested", [True, False])
def test_packed_parameters_survive_a_dtype_cast(nested):
    """Under FSDP2 a Linear4bit's packed codes and scales are parameters (codes in a 1-byte float
    view, `hold_packed_as_parameters`): `.to(bfloat16)` moves the compute dtype but never casts them."""
    import bitsandbytes.functional as bnbf

    from minift.ops import NF4Weight
    from minift.quant.linear4bit import BYTE_VIEW, Linear4bit
    data, qs = bnbf.quantize_4bit(torch.randn(32, 64), blocksize=64, compress_statistics=nested, quant_type="nf4")
    m = Linear4bit.from_nf4(NF4Weight.from_bnb(data, qs))
    want = m.dequantize(torch.float32)
    m.hold_packed_as_parameters()
    assert isinstance(m.weight, torch.nn.Parameter) and m.weight.dtype == BYTE_VIEW and not m.weight.requires_grad
    m.to(torch.bfloat16)
    assert m.compute_dtype == torch.bfloat16 and m.weight.dtype == BYTE_VIEW
    assert torch.equal(m.dequantize(torch.float32), want)
