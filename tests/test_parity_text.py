"""Logit and loss parity with transformers for every text family (fp32, CPU, tiny checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import minift
from minift.testing import write_tiny_checkpoint

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def compare(path, seq=14, batch=3, pad=True, seed=0, check_pad_rows=False):
    model, _ = minift.load(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    am = torch.ones_like(ids)
    if pad:  # right padding of different lengths
        for i in range(1, batch):
            am[i, seq - 3 * i:] = 0
            ids[i, seq - 3 * i:] = 0
    labels = ids.masked_fill(am == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=am, labels=labels)
        ref_out = ref(input_ids=ids, attention_mask=am, labels=labels)
    real = am.bool() if not check_pad_rows else torch.ones_like(am, dtype=torch.bool)
    assert rel(out.logits[real], ref_out.logits[real]) <= TOL
    assert abs(out.loss.item() - ref_out.loss.item()) <= 1e-5 * max(1.0, abs(ref_out.loss.item()))
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "gemma2", "gemma3_text"])
def test_family_parity_padded(tmp_path, family):
    path = write_tiny_checkpoint(tmp_path, family)
    model = compare(path, seq=14)  # sliding window (5) is shorter than the sequence
    assert model.config.model_type == family


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_pad_rows_match_too_without_window(tmp_path, family):
    compare(write_tiny_checkpoint(tmp_path, family), check_pad_rows=True)


def test_odd_sizes_gqa_untied(tmp_path):
    path = write_tiny_checkpoint(
        tmp_path, "llama", hidden_size=60, num_attention_heads=3, num_key_value_heads=1, intermediate_size=97,
        tie_word_embeddings=False, num_hidden_layers=3,
    )
    model = compare(path, seq=11, batch=2)
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_tied_head(tmp_path):
    path = write_tiny_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    model = compare(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling(tmp_path, rope):
    params = dict(rope, rope_theta=10000.0)
    # max_position_embeddings below the sequence length so dynamic scaling really kicks in
    path = write_tiny_checkpoint(tmp_path, "llama", rope_parameters=params, max_position_embeddings=10)
    compare(path, seq=16)


def test_legacy_rope_fields(tmp_path):
    """config.json written by older transformers: rope_theta + rope_scaling with 'type'."""
    path = write_tiny_checkpoint(tmp_path, "llama", rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 500.0})
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500.0
    cfg["rope_scaling"] = {"type": "linear", "factor": 3.0}
    (path / "config.json").write_text(json.dumps(cfg))
    model, _ = minift.load(path)
    rc = model.config.rope["full_attention"]
    assert (rc.rope_type, rc.rope_theta, rc.factor) == ("linear", 500.0, 3.0)
    compare(path)


def test_gemma3_rope_per_layer_type(tmp_path):
    path = write_tiny_checkpoint(
        tmp_path, "gemma3_text", num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    model = compare(path, seq=13)
    assert model.config.rope["full_attention"].factor == 8.0
    assert model.config.rope["sliding_attention"].rope_theta == 10_000.0


def test_sharded_checkpoint(tmp_path):
    path = write_tiny_checkpoint(tmp_path, "mistral", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    compare(path)


def test_packed_rows_equal_separate_sequences(tmp_path):
    """position_ids restarting inside a row (padding-free packing) keep sequences apart."""
    model, _ = minift.load(write_tiny_checkpoint(tmp_path, "gemma3_text"))
    g = torch.Generator().manual_seed(1)
    a = torch.randint(3, 200, (1, 7), generator=g)
    b = torch.randint(3, 200, (1, 9), generator=g)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0)
    with torch.no_grad():
        lp = model(packed, position_ids=pos).logits
        la = model(a).logits
        lb = model(b).logits
    assert rel(lp[:, :7], la) <= TOL and rel(lp[:, 7:], lb) <= TOL


def test_default_dtype_and_device(tmp_path):
    model, tok = minift.load(write_tiny_checkpoint(tmp_path, "llama"))
    assert next(model.parameters()).dtype == torch.float32
    assert all(not p.requires_grad for p in model.parameters())
    assert tok("hello")["input_ids"]
    m16, _ = minift.load(tmp_path, dtype=torch.bfloat16)
    assert m16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = m16(torch.randint(3, 200, (1, 5)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


def test_pixel_values_refused_by_text_model(tmp_path):
    from minift.errors import InputError

    model, _ = minift.load(write_tiny_checkpoint(tmp_path, "gemma3_text"))
    with pytest.raises(InputError, match="pixel_values given to a text-only gemma3_text model"):
        model(torch.randint(3, 200, (1, 5)), pixel_values=torch.zeros(1, 3, 32, 32))


def test_family_table_defaults():
    """Family facts come from FAMILIES; the default layer_types follow each family's pattern."""
    from minift.arch.config import FAMILIES, TEXT_MODEL_TYPES, ModelConfig

    assert TEXT_MODEL_TYPES == tuple(FAMILIES) == ("llama", "mistral", "gemma", "gemma2", "gemma3_text")
    base = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4)
    F, S = "full_attention", "sliding_attention"
    want = {
        "llama": [F] * 6, "mistral": [S] * 6, "gemma": [F] * 6,
        "gemma2": [S, F] * 3, "gemma3_text": [S, S, F] * 2,
    }
    for mt, types in want.items():
        c = ModelConfig.from_hf({**base, "model_type": mt, "sliding_window": 4, "sliding_window_pattern": 3})
        assert c.layer_types == types, mt
        assert c.norm_offset == (1.0 if mt.startswith("gemma") else 0.0) and c.embed_scale == mt.startswith("gemma")
        assert (c.rope[F] is c.rope[S]) == (mt != "gemma3_text"), mt
