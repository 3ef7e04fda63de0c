"""save_gguf: GGUF files of tiny checkpoints read back with gguf-py's GGUFReader.

The expected tensors are built here from the checkpoint's safetensors (plus the LoRA deltas where
adapters are added), with llama.cpp's conversions written out independently: the name table, the
Q/K row permutation of the llama architecture and Gemma's norm + 1. Quantised types are checked
against their quantisation error; `tests/test_llamacpp.py` (opt-in) runs the files in llama.cpp.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minift
from minift.errors import ConfigError, ExportError
from minift.export import gguf as G
from minift.export.ollama import match_template, ollama_modelfile
from minift.lora.layers import LoraLinear
from minift.templates import get_chat_template
from minift.testing import write_tiny_checkpoint, write_tiny_gemma3_vision

pytestmark = pytest.mark.filterwarnings("ignore:save_gguf. llama.cpp's llama architecture has no sliding-window")

Q = gguf.GGMLQuantizationType
FAMILIES = ["llama", "mistral", "gemma", "gemma2", "gemma3_text"]
ARCH = {"llama": "llama", "mistral": "llama", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}

LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


def gguf_name(hf: str, arch: str) -> str | None:
    """llama.cpp's name of a transformers tensor (None: not written)."""
    hf = hf.replace("model.language_model.", "model.")
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")
    i, rest = parts[2], ".".join(parts[3:])
    if rest == "post_attention_layernorm.weight":
        return f"blk.{i}." + ("ffn_norm.weight" if arch in ("llama", "gemma") else "post_attention_norm.weight")
    return f"blk.{i}.{LAYER[rest]}"


def to_llamacpp(hf: str, w: torch.Tensor, arch: str, n_head: int, n_kv: int) -> np.ndarray:
    """A transformers weight as llama.cpp holds it: interleaved Q/K rows for llama, 1 + w norms for Gemma."""
    w = w.float()
    if arch == "llama" and (hf.endswith("q_proj.weight") or hf.endswith("k_proj.weight")):
        heads = n_head if "q_proj" in hf else n_kv
        hd = w.shape[0] // heads
        w = w.reshape(heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)
    if arch != "llama" and hf.endswith("norm.weight"):
        w = w + 1
    return w.numpy()


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", request.param)
    model, tok = minift.load(path)
    return request.param, path, model, tok


def read(path: Path) -> tuple[gguf.GGUFReader, dict, dict]:
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return r, fields, tensors


def values(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy's (rows, cols) order."""
    if t.tensor_type in (Q.F32, Q.F16):
        return np.asarray(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


def expected(family: str, path: Path, model, deltas: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    sd = load_file(str(path / "model.safetensors"))
    cfg = model.config
    out = {}
    for hf, w in sd.items():
        if deltas and hf in deltas:
            w = w.float() + deltas[hf]
        name = gguf_name(hf, ARCH[family])
        out[name] = to_llamacpp(hf, w, ARCH[family], cfg.num_attention_heads, cfg.num_key_value_heads)
    return out


def test_every_tensor_and_value_f32(tiny, tmp_path):
    family, path, model, _ = tiny
    out = minift.export.gguf.save_gguf(model, tmp_path / "m.gguf", "f32")
    assert out == tmp_path / "m.gguf"
    _, fields, tensors = read(out)
    want = expected(family, path, model)
    assert set(tensors) == set(want)
    tied = family.startswith("gemma")
    assert ("output.weight" in tensors) is (not tied)
    for name, w in want.items():
        t = tensors[name]
        assert t.tensor_type == Q.F32
        assert list(t.shape) == list(reversed(w.shape)), name  # ggml's order: innermost first
        np.testing.assert_array_equal(values(t), w, err_msg=name)
    assert fields["general.architecture"] == ARCH[family]
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32


@pytest.mark.parametrize("quant,np_dtype", [("f16", np.float16), ("bf16", None)])
def test_f16_and_bf16_hold_the_rounded_weights(tiny, tmp_path, quant, np_dtype):
    family, path, model, _ = tiny
    _, _, tensors = read(G.save_gguf(model, tmp_path / "m.gguf", quant))
    for name, w in expected(family, path, model).items():
        t = tensors[name]
        if w.ndim == 1:
            assert t.tensor_type == Q.F32
            np.testing.assert_array_equal(values(t), w)
            continue
        if quant == "f16":
            assert t.tensor_type == Q.F16
            np.testing.assert_array_equal(values(t), w.astype(np.float16).astype(np.float32))
        else:
            assert t.tensor_type == Q.BF16
            got = gguf.quants.dequantize(t.data, Q.BF16).reshape(w.shape)
            np.testing.assert_array_equal(got, torch.from_numpy(w).bfloat16().float().numpy())


def test_lora_is_merged_in_float32(tiny, tmp_path):
    family, path, _, _ = tiny
    model, _ = minift.load(path)
    minift.add_lora(model, r=4, alpha=8)
    torch.manual_seed(1)
    deltas = {}
    for n, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            with torch.no_grad():
                mod.lora_B.weight.normal_(0, 0.05)
            deltas[f"{n}.weight"] = (mod.lora_B.weight.detach().float() @ mod.lora_A.weight.detach().float()) * mod.scaling
    assert deltas
    _, _, tensors = read(G.save_gguf(model, tmp_path / "m.gguf", "f32"))
    for name, w in expected(family, path, model, deltas).items():
        np.testing.assert_allclose(values(tensors[name]), w, rtol=1e-6, atol=1e-6, err_msg=name)


# relative RMS error each block type stays under on Gaussian-like weights
QUANT_ERROR = {Q.Q8_0: 0.01, Q.Q6_K: 0.03, Q.Q5_0: 0.06, Q.Q5_1: 0.06, Q.Q5_K: 0.05, Q.Q4_0: 0.12, Q.Q4_1: 0.12,
               Q.Q4_K: 0.1, Q.F16: 1e-3}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A llama and a gemma2 whose rows split into 256-blocks, so the K-quants apply."""
    out = {}
    for fam in ("llama", "gemma2"):
        p = write_tiny_checkpoint(tmp_path_factory.mktemp("wide") / fam, fam, hidden_size=256, intermediate_size=512,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                  **({"query_pre_attn_scalar": 64} if fam == "gemma2" else {}))
        out[fam] = (p, minift.load(p)[0])
    return out


def rel_rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m",
                                   "q6_k"])
@pytest.mark.parametrize("fam", ["llama", "gemma2"])
def test_quantised_types_and_error(wide, tmp_path, quant, fam):
    path, model = wide[fam]
    _, fields, tensors = read(G.save_gguf(model, tmp_path / "m.gguf", quant))
    assert fields["general.file_type"] == gguf.LlamaFileType[G._QUANTS[quant].ftype]
    base = Q[G._QUANTS[quant].base]
    for name, w in expected(fam, path, model).items():
        t = tensors[name]
        if w.ndim == 1:
            assert t.tensor_type == Q.F32, name
            continue
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        more = layer == 1  # llama.cpp's use_more_bits(i, 2): the last layer
        if quant == "q8_0":
            want = Q.Q8_0
        elif name == "output.weight" or (fam == "gemma2" and name == "token_embd.weight"):
            want = Q.Q6_K  # the output matrix (the tied embedding for Gemma)
        elif quant.endswith("_k_m") and more and name.endswith(("attn_v.weight", "ffn_down.weight")):
            want = Q.Q6_K
        elif quant == "q4_k_s" and name.endswith("attn_v.weight"):
            want = Q.Q5_K  # its first four attn_v
        else:
            want = base
        assert t.tensor_type == want, (name, t.tensor_type.name, want.name)
        got = values(t)
        assert got.shape == w.shape
        assert rel_rmse(got, w) < QUANT_ERROR[want], (name, want.name, rel_rmse(got, w))


def test_rows_that_do_not_split_fall_back_as_llama_quantize_does(tiny, tmp_path):
    family, _, model, _ = tiny  # hidden 64: not a multiple of 256
    _, _, tensors = read(G.save_gguf(model, tmp_path / "m.gguf", ["q4_k_m", "q5_k_m", "q6_k"])[0])
    kinds = {n: t.tensor_type for n, t in tensors.items() if len(t.shape) == 2}
    assert kinds["blk.0.attn_q.weight"] == Q.Q5_0  # Q4_K -> Q5_0
    assert kinds["blk.1.attn_v.weight"] == Q.Q8_0  # Q6_K -> Q8_0
    out = "output.weight" if family in ("llama", "mistral") else "token_embd.weight"
    assert kinds[out] == Q.Q8_0
    _, _, t5 = read(tmp_path / "m.Q5_K_M.gguf")
    assert t5["blk.0.attn_q.weight"].tensor_type == Q.Q5_1  # Q5_K -> Q5_1


def test_k_quant_blocks_decode(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 512)) * rng.uniform(0.01, 3, (8, 1))).astype(np.float32)
    x[2] = 0.0
    for qt, tol in ((Q.Q4_K, 0.1), (Q.Q5_K, 0.05), (Q.Q6_K, 0.025)):
        b = G.quantize(x, qt)
        assert b.dtype == np.uint8 and b.shape == (8, 512 // 256 * gguf.GGML_QUANT_SIZES[qt][1])
        y = gguf.quants.dequantize(b, qt)
        assert np.all(y[2] == 0)
        assert rel_rmse(y, x) < tol


def test_metadata_and_tokenizer(tiny, tmp_path):
    family, path, model, tok = tiny
    _, f, _ = read(G.save_gguf(model, tmp_path / "m.gguf", "q8_0"))
    a = ARCH[family]
    cfg = model.config
    assert f["general.architecture"] == a and f["general.type"] == "model" and f["general.name"] == "ckpt"
    assert f[f"{a}.context_length"] == 256 and f[f"{a}.embedding_length"] == 64 and f[f"{a}.block_count"] == 2
    assert f[f"{a}.feed_forward_length"] == 128
    assert f[f"{a}.attention.head_count"] == cfg.num_attention_heads
    assert f[f"{a}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert f[f"{a}.attention.key_length"] == f[f"{a}.attention.value_length"] == cfg.head_dim
    assert math.isclose(f[f"{a}.attention.layer_norm_rms_epsilon"], cfg.rms_norm_eps, rel_tol=1e-6)
    assert f[f"{a}.rope.freq_base"] == cfg.rope["full_attention"].rope_theta
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    if a == "llama":
        assert f["llama.rope.dimension_count"] == cfg.head_dim and f["llama.vocab_size"] == len(tok)
    if a == "gemma2":
        assert f["gemma2.attn_logit_softcapping"] == 50.0 and f["gemma2.final_logit_softcapping"] == 30.0
        assert f["gemma2.attention.sliding_window"] == 5
        assert "gemma2.attention.sliding_window_pattern" not in f  # sliding, full: llama.cpp's default
    if a == "gemma3":
        assert f["gemma3.attention.sliding_window"] == 5 and f["gemma3.rope.freq_base_swa"] == 10000.0
        assert "gemma3.attention.sliding_window_pattern" not in f  # both sliding: the default period of 6
    # tokenizer
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"] == [by_id[i] for i in range(len(tok))]
    types = f["tokenizer.ggml.token_type"]
    for i in range(len(tok)):
        assert types[i] == (3 if i in tok.added_tokens_decoder else 1), by_id[i]  # CONTROL / NORMAL
    assert f["tokenizer.ggml.merges"] == []  # the tiny BPE has none; the key must still be there
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id and f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert f["tokenizer.ggml.unknown_token_id"] == tok.unk_token_id
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == tok.chat_template


def test_bpe_merges_and_adding_bos_are_read_from_the_tokenizer(tmp_path):
    from minift.testing import tiny_tokenizer
    from tokenizers import processors

    tok = tiny_tokenizer(vocab_size=300)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.bos_token_id)])
    path = write_tiny_checkpoint(tmp_path / "ck", "llama")
    model, _ = minift.load(path)
    with pytest.raises(ExportError, match="300 tokens but the model's embedding has 270 rows"):
        G.save_gguf(model, tmp_path / "x.gguf", "f16", tokenizer=tok)
    v = G.build_vocab(tok, len(tok), "llama", model.config)
    import json
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert len(v.merges) == len(merges) == 30 and v.merges[0] == " ".join(merges[0])
    assert v.add_bos is True and v.add_eos is False


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    path = write_tiny_checkpoint(tmp_path / "ck", "llama", rope_parameters=rope)
    model, _ = minift.load(path)
    _, f, tensors = read(G.save_gguf(model, tmp_path / "m.gguf", "q8_0"))
    t = tensors["rope_freqs.weight"]
    assert t.tensor_type == Q.F32 and list(t.shape) == [8]
    cfg = LlamaConfig(**{**model.config.raw, "rope_parameters": rope})
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    np.testing.assert_allclose(values(t), (plain / scaled).numpy(), rtol=1e-5)  # llama.cpp divides by these
    assert f["llama.rope.freq_base"] == 500000.0 and "llama.rope.scaling.type" not in f


def test_linear_rope_scaling_is_metadata(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ck", "gemma3_text", rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    model, _ = minift.load(path)
    _, f, _ = read(G.save_gguf(model, tmp_path / "m.gguf", "f16"))
    assert f["gemma3.rope.scaling.type"] == "linear" and f["gemma3.rope.scaling.factor"] == 8.0
    assert f["gemma3.rope.freq_base"] == 1e6 and f["gemma3.rope.freq_base_swa"] == 1e4


@pytest.mark.parametrize("fam", ["gemma2", "gemma3_text"])
def test_query_pre_attn_scalar_is_folded_into_the_queries(tmp_path, fam):
    path = write_tiny_checkpoint(tmp_path / "ck", fam, query_pre_attn_scalar=64)  # head_dim 16
    model, _ = minift.load(path)
    _, _, tensors = read(G.save_gguf(model, tmp_path / "m.gguf", "f32"))
    want = expected(fam, path, model)
    c = math.sqrt(16 / 64)  # transformers' 64**-0.5 over llama.cpp's fixed 16**-0.5
    key = "blk.0.attn_q.weight" if fam == "gemma2" else "blk.0.attn_q_norm.weight"
    np.testing.assert_allclose(values(tensors[key]), want[key] * c, rtol=1e-6)
    other = "blk.0.attn_k.weight"
    np.testing.assert_array_equal(values(tensors[other]), want[other])


def test_gemma3_vision_language_gguf_and_mmproj(tmp_path):
    path = write_tiny_gemma3_vision(tmp_path / "ck")
    model, processor = minift.load(path)
    out = G.save_gguf(model, tmp_path / "out" / "m.gguf", "q8_0", tokenizer=processor)
    assert out == [tmp_path / "out" / "m.gguf", tmp_path / "out" / "mmproj-m.F16.gguf"]
    _, f, tensors = read(out[0])
    assert f["general.architecture"] == "gemma3" and f["gemma3.attention.sliding_window"] == 8
    assert f["gemma3.attention.sliding_window_pattern"] == [True, False]  # not the default period of 6
    assert "final_logit_softcapping" not in " ".join(f)
    assert not any(n.startswith(("v.", "mm.")) for n in tensors) and "output.weight" not in tensors
    sd = load_file(str(path / "model.safetensors"))
    emb = sd["model.language_model.embed_tokens.weight"].numpy()
    assert rel_rmse(values(tensors["token_embd.weight"]), emb) < 0.01
    _, mf, mt = read(out[1])
    assert mf["general.architecture"] == "clip" and mf["general.type"] == "mmproj"
    assert mf["clip.projector_type"] == "gemma3" and mf["clip.has_vision_encoder"] is True
    assert mf["clip.vision.image_size"] == 64 and mf["clip.vision.patch_size"] == 8
    assert mf["clip.vision.embedding_length"] == 64 and mf["clip.vision.block_count"] == 2
    assert mf["clip.vision.projection_dim"] == 64 and mf["clip.vision.projector.scale_factor"] == 2
    assert mf["clip.vision.image_mean"] == [0.5, 0.5, 0.5] and mf["clip.use_gelu"] is True
    assert mt["v.patch_embd.weight"].tensor_type == Q.F32 and list(mt["v.patch_embd.weight"].shape) == [8, 8, 3, 64]
    assert mt["mm.input_projection.weight"].tensor_type == Q.F16
    assert mt["v.blk.1.attn_q.weight"].tensor_type == Q.F16 and mt["v.blk.1.attn_q.bias"].tensor_type == Q.F32
    np.testing.assert_array_equal(values(mt["mm.soft_emb_norm.weight"]),
                                  sd["model.multi_modal_projector.mm_soft_emb_norm.weight"].numpy() + 1)
    np.testing.assert_array_equal(values(mt["v.post_ln.weight"]),
                                  sd["model.vision_tower.post_layernorm.weight"].numpy())
    np.testing.assert_array_equal(values(mt["v.blk.0.ffn_up.weight"]).astype(np.float16),
                                  sd["model.vision_tower.encoder.layers.0.mlp.fc1.weight"].numpy()
                                  .astype(np.float16))
    assert len(mt) == 3 + 16 * 2 + 2 + 2


def test_nf4_base_is_exported_dequantised_with_a_warning(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ck", "llama")
    model, _ = minift.load(path, load_in_4bit=True)
    with pytest.warns(UserWarning, match="NF4"):
        out = G.save_gguf(model, tmp_path / "m.gguf", "f32")
    _, _, tensors = read(out)
    q = model.model.layers[0].self_attn.v_proj.dequantize(torch.float32)
    np.testing.assert_array_equal(values(tensors["blk.0.attn_v.weight"]), q.numpy())


def test_several_quants_one_file_each_and_aliases(tiny, tmp_path):
    _, _, model, _ = tiny
    out = G.save_gguf(model, tmp_path / "model.gguf", ["fast_quantized", "not_quantized", "q8_0"])
    assert out == [tmp_path / "model.Q8_0.gguf", tmp_path / "model.F16.gguf"]  # q8_0 twice is one file
    assert read(out[1])[1]["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    d = tmp_path / "dir"
    d.mkdir()
    assert G.save_gguf(model, d, "quantized") == d / "ckpt.Q4_K_M.gguf"


def test_unsupported_quant_lists_the_supported(tiny, tmp_path):
    _, _, model, _ = tiny
    with pytest.raises(ExportError) as e:
        G.save_gguf(model, tmp_path / "m.gguf", "q3_k_m")
    for q in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "not_quantized", "quantized"):
        assert q in str(e.value)
    assert not list(tmp_path.iterdir())


def test_unsupported_architecture(tiny, tmp_path, monkeypatch):
    _, _, model, _ = tiny
    monkeypatch.setattr(model.config, "model_type", "qwen2")
    with pytest.raises(ExportError, match="model_type 'qwen2' is not supported; supported: llama, mistral, gemma"):
        G.save_gguf(model, tmp_path / "m.gguf")


def test_untied_gemma_head_cannot_be_written(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ck", "gemma2", tie_word_embeddings=False)
    model, _ = minift.load(path)
    with pytest.raises(ExportError, match="always uses token_embd as the output matrix"):
        G.save_gguf(model, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # nothing left behind


def test_existing_file_needs_overwrite(tiny, tmp_path):
    _, _, model, _ = tiny
    p = tmp_path / "m.gguf"
    p.write_bytes(b"old")
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        G.save_gguf(model, p)
    assert p.read_bytes() == b"old"
    G.save_gguf(model, p, overwrite=True)
    assert read(p)[1]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_a_failing_write_leaves_the_old_file(tiny, tmp_path, monkeypatch):
    _, _, model, _ = tiny
    p = tmp_path / "m.gguf"
    p.write_bytes(b"old")
    real = gguf.GGUFWriter.write_tensors_to_file

    def half_then_fail(self, *a, **k):
        self.fout[0].write(b"\0" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        G.save_gguf(model, p, ["q8_0", "f16"], overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        G.save_gguf(model, p, overwrite=True)
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.gguf"]  # no temporary files left
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real)

    calls = []
    orig = G.quantize

    def fail_on_third(data, qtype):
        calls.append(qtype)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return orig(data, qtype)

    monkeypatch.setattr(G, "quantize", fail_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        G.save_gguf(model, p, "q4_0", overwrite=True)
    assert p.read_bytes() == b"old" and sorted(x.name for x in tmp_path.iterdir()) == ["m.gguf"]


def test_modelfile_beside_the_gguf(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ck", "gemma3_text")
    model, tok = minift.load(path)
    get_chat_template(tok, "gemma-3")
    out = G.save_gguf(model, tmp_path / "o" / "m.gguf", ["q8_0", "f16"], tokenizer=tok, modelfile=True)
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert text.startswith("FROM ./m.Q8_0.gguf\nTEMPLATE \"\"\"") and out[0].name == "m.Q8_0.gguf"
    assert 'PARAMETER stop "<end_of_turn>"' in text and "PARAMETER top_k 64" in text  # gemma-3's, not gemma's
    with pytest.raises(ExportError, match="Modelfile: exists"):
        G.save_gguf(model, tmp_path / "o" / "n.gguf", "f16", tokenizer=tok, modelfile="chatml")
    assert not (tmp_path / "o" / "n.gguf").exists()
    G.save_gguf(model, tmp_path / "o" / "n.gguf", "f16", tokenizer=tok, modelfile="chatml", overwrite=True)
    assert '"<|im_end|>"' in (tmp_path / "o" / "Modelfile").read_text()


def test_modelfile_without_a_matching_template_fails_before_writing(tmp_path):
    model, _ = minift.load(write_tiny_checkpoint(tmp_path / "ck", "gemma"))
    with pytest.raises(ExportError, match="pass a template name"):
        G.save_gguf(model, tmp_path / "o" / "m.gguf", modelfile=True)
    assert not (tmp_path / "o").exists()


def test_ollama_modelfile_from_a_name_or_a_tokenizer(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ck", "mistral")
    _, tok = minift.load(path)
    assert match_template(tok).name == "llama-3"  # the tiny's Llama 3 shaped template renders as llama-3's
    _, gemma_tok = minift.load(write_tiny_checkpoint(tmp_path / "g", "gemma"))
    with pytest.raises(ExportError, match="no registered chat template renders like the tokenizer's; pass a template"):
        ollama_modelfile(gemma_tok, "m.gguf")  # the tiny's Gemma-like template writes system turns of its own
    text = ollama_modelfile("llama-3", "m.gguf")
    assert text.startswith("FROM m.gguf\n") and 'PARAMETER stop "<|eot_id|>"' in text
    with pytest.raises(ConfigError, match="eos"):
        ollama_modelfile("mistral", "m.gguf")  # ends turns with the tokenizer's eos: needs one
    assert 'PARAMETER stop "<eos>"' in ollama_modelfile("mistral", "m.gguf", tokenizer=tok)
    get_chat_template(tok, "mistral")
    assert match_template(tok).name == "mistral"
    assert 'PARAMETER stop "<eos>"' in ollama_modelfile(tok, "m.gguf")
    with pytest.raises(ConfigError, match="unknown chat template"):
        ollama_modelfile("no-such-template", "m.gguf")


def test_temporary_files_live_beside_the_target(tiny, tmp_path, monkeypatch):
    _, _, model, _ = tiny
    seen = []
    real = G._Out.finish

    def spy(self):
        seen.append((self.tmp.parent, self.tmp.name.startswith(".m.gguf.tmp-")))
        real(self)

    monkeypatch.setattr(G._Out, "finish", spy)
    G.save_gguf(model, tmp_path / "m.gguf")
    assert seen == [(tmp_path, True)]
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_mistral_sliding_window_is_dropped_with_a_warning(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ck", "mistral")  # sliding_window 5
    model, _ = minift.load(path)
    with pytest.warns(UserWarning, match="no sliding-window attention; this mistral model's window of 5 is dropped"):
        G.save_gguf(model, tmp_path / "m.gguf")
    assert not any("sliding" in k for k in read(tmp_path / "m.gguf")[1])


class SpmTokenizer:
    """What save_gguf reads of a SentencePiece-backed HF tokenizer (a Llama 2 / Mistral / Gemma
    `tokenizer.model`), over a SentencePiece model trained here: vocab_file, the vocabulary, the
    added special tokens, the special ids and an encode that adds BOS."""

    def __init__(self, model_file: Path):
        import sentencepiece as spm
        from tokenizers import AddedToken

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_file = str(model_file)
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2, 3
        self.added_tokens_decoder = {i: AddedToken(self.sp.IdToPiece(i), special=True) for i in (4, 5)}
        self.chat_template = None

    def __len__(self) -> int:
        return self.sp.vocab_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.IdToPiece(i): i for i in range(len(self))}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.bos_token_id] if add_special_tokens else []) + self.sp.encode(text)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}


def spm_checkpoint(root: Path, family: str, *, dummy_prefix: bool) -> tuple[Path, SpmTokenizer]:
    """A tiny checkpoint whose tokenizer is a byte-fallback SentencePiece BPE (Gemma's kind of
    tokenizer.model without a dummy prefix, Llama 2's with one)."""
    import sentencepiece as spm

    from minift.testing.tiny import CORPUS, tiny_hf_model, tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_prefix=str(root / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=dummy_prefix, minloglevel=2)
    tok = SpmTokenizer(root / "tokenizer.model")
    tiny_hf_model(family, vocab_size=len(tok)).save_pretrained(root / "ckpt", safe_serialization=True)
    tiny_tokenizer().save_pretrained(root / "ckpt")  # for minift.load; save_gguf is given `tok`
    return root / "ckpt", tok


@pytest.mark.parametrize("family,prefix", [("llama", True), ("gemma", False)])
def test_sentencepiece_tokenizer(tmp_path, family, prefix):
    path, tok = spm_checkpoint(tmp_path, family, dummy_prefix=prefix)
    model, _ = minift.load(path)
    _, f, _ = read(G.save_gguf(model, tmp_path / "m.gguf", "q8_0", tokenizer=tok))
    sp = tok.sp
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    assert f["tokenizer.ggml.tokens"] == [sp.IdToPiece(i) for i in range(len(tok))]
    want = [-1000.0 if i in tok.added_tokens_decoder else sp.GetScore(i) for i in range(len(tok))]  # as the converter
    np.testing.assert_allclose(f["tokenizer.ggml.scores"], want, rtol=1e-6)
    types = f["tokenizer.ggml.token_type"]
    assert types[3] == 2 and types[1] == types[2] == 3 and types[4] == types[5] == 3  # unknown, control, added
    assert types[sp.PieceToId("<0x41>")] == 6 and types[len(tok) - 1] == 1  # byte, normal
    assert "tokenizer.ggml.merges" not in f
    assert f["tokenizer.ggml.add_space_prefix"] is prefix
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.unknown_token_id"] == 3


def test_padded_vocabulary(tmp_path):
    from minift.testing import tiny_hf_model, tiny_tokenizer

    path = tmp_path / "ck"
    tiny_hf_model("gemma3_text", vocab_size=300).save_pretrained(path)
    tiny_tokenizer(template="gemma").save_pretrained(path)  # 270 tokens
    model, tok = minift.load(path)
    _, f, t = read(G.save_gguf(model, tmp_path / "m.gguf", "f16"))
    assert len(f["tokenizer.ggml.tokens"]) == 300 and list(t["token_embd.weight"].shape) == [64, 300]
    assert f["tokenizer.ggml.tokens"][299] == "[PAD299]" and f["tokenizer.ggml.token_type"][299] == 5  # unused


def llama3_tokenizer():
    """A byte-level BPE shaped like Llama 3's: its Split regex + ByteLevel without regex,
    ignore_merges, a BOS post-processor (llama.cpp's "llama-bpe")."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from minift.testing.tiny import CORPUS, SPECIAL_TOKENS, TEMPLATES

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(G._LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = TEMPLATES["llama3"]
    return fast


def llama3_checkpoint(path: Path):
    from minift.testing import tiny_hf_model

    tok = llama3_tokenizer()
    tiny_hf_model("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_llama3_shaped_tokenizer_is_llama_bpe(tmp_path):
    model, tok = minift.load(llama3_checkpoint(tmp_path / "ck"))
    _, f, _ = read(G.save_gguf(model, tmp_path / "m.gguf", "f16"))
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(f["tokenizer.ggml.merges"]) == len(tok) - 270 and f["tokenizer.ggml.add_bos_token"] is True
    assert "tokenizer.ggml.unknown_token_id" not in f  # the HF tokenizer has none


def test_unmatched_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import pre_tokenizers

    from minift.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model, _ = minift.load(write_tiny_checkpoint(tmp_path / "ck", "llama"))
    with pytest.raises(ExportError, match="is not one save_gguf can match to llama.cpp's; recognised"):
        G.save_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
