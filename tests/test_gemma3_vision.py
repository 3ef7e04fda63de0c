"""Gemma 3 vision (Gemma3ForConditionalGeneration) in minift's own code vs transformers, fp32.

The tiny checkpoint pools an 8x8 patch grid to 4x4 = 16 image tokens per image, and its text
sliding window (8) is shorter than one image, so the sliding layers' mask composition
(transformers: AND(window, OR(causal, image block))) is exercised by every image batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import minift
from minift.arch.attention import build_mask
from minift.arch.model import CausalLM
from minift.arch.vision import Gemma3VisionLM, build_vision_model, image_groups
from minift.errors import ConfigError, InputError
from minift.io.keys import canonical_key, text_only_key
from minift.testing import write_tiny_gemma3_vision

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3v")
    return {layout: write_tiny_gemma3_vision(root / layout, layout=layout) for layout in ("v5", "legacy", "save_pretrained")}


@pytest.fixture(scope="module")
def loaded(ckpts):
    model, processor = minift.load(ckpts["v5"])
    ref = transformers.Gemma3ForConditionalGeneration.from_pretrained(ckpts["v5"], dtype=torch.float32).eval()
    return model, processor, ref


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((40 + 9 * i, 56 - 5 * i, 3)) * 255).astype("uint8")) for i in range(n)]


def run_both(model, ref, batch, labels=None):
    with torch.no_grad():
        out = ref(**batch, labels=labels)
        ours = model(
            batch["input_ids"], batch.get("attention_mask"), batch.get("pixel_values"), batch.get("token_type_ids"),
            labels,
        )
    return ours, out


BATCHES = {
    # one image per sample, equal lengths (no padding)
    "one_image": (["Look <start_of_image> at this.", "What <start_of_image> is here?"], [1, 1]),
    # two images per sample
    "two_images": (["<start_of_image> and <start_of_image> differ", "A <start_of_image> B <start_of_image> C"], [2, 2]),
    # right-padded batch, mixed image counts, text after the images longer than the window
    "padded": (["hi <start_of_image>", "a <start_of_image> b <start_of_image> the quick brown fox jumps over the lazy dog"], [1, 2]),
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_logits_match_transformers(loaded, name):
    model, processor, ref = loaded
    texts, counts = BATCHES[name]
    imgs, it = images(sum(counts), seed=len(name)), 0
    nested = []
    for c in counts:
        nested.append(imgs[it:it + c])
        it += c
    batch = processor(text=texts, images=nested, return_tensors="pt", padding=True)
    s = batch["input_ids"].shape[1]
    assert s > 2 * model.config.text.sliding_window
    assert batch["pixel_values"].shape[0] == sum(counts)
    ours, out = run_both(model, ref, batch)
    am = batch["attention_mask"].bool()
    assert rel(ours.logits[am], out.logits[am]) <= TOL
    assert rel(ours.logits, out.logits) <= TOL  # right padding: padded positions match as well


def test_left_padding_non_padded_positions(loaded):
    model, processor, ref = loaded
    processor.tokenizer.padding_side = "left"
    try:
        texts, _ = BATCHES["padded"]
        batch = processor(text=texts, images=[images(1, 3), images(2, 4)], return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "right"
    assert not batch["attention_mask"][:, 0].all()
    ours, out = run_both(model, ref, batch)
    am = batch["attention_mask"].bool()
    assert rel(ours.logits[am], out.logits[am]) <= TOL


def test_loss_matches_transformers_fused_and_unfused(loaded):
    model, processor, ref = loaded
    batch = processor(text=BATCHES["padded"][0], images=[images(1), images(2, 1)], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(batch["token_type_ids"] == 1, -100)
    ours, out = run_both(model, ref, batch, labels)
    assert abs(ours.loss.item() - out.loss.item()) <= 1e-5 * out.loss.item()
    with torch.no_grad():
        fused = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["token_type_ids"],
                      labels, return_logits=False)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, out.loss, rtol=1e-5, atol=0)


def test_without_token_type_ids_is_causal_like_transformers(loaded):
    model, processor, ref = loaded
    batch = processor(text=BATCHES["one_image"][0], images=[images(1), images(1, 2)], return_tensors="pt")
    batch.pop("token_type_ids")
    ours, out = run_both(model, ref, batch)
    assert rel(ours.logits, out.logits) <= TOL


def test_text_only_batch(loaded):
    model, processor, ref = loaded
    batch = processor.tokenizer(["no images here, only text that is long enough"], return_tensors="pt")
    ours, out = run_both(model, ref, dict(batch))
    assert rel(ours.logits, out.logits) <= TOL


@pytest.mark.parametrize("layout", ["legacy", "save_pretrained"])
def test_key_layouts_load_the_same_weights(ckpts, loaded, layout):
    model, _, _ = loaded
    other, processor = minift.load(ckpts[layout])
    assert isinstance(other, Gemma3VisionLM) and processor.image_seq_length == 16
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_untied_head_legacy_layout_and_other_pooling(tmp_path):
    """Untied lm_head saved as language_model.lm_head.weight; 4 tokens per image (pool kernel 4)."""
    path = write_tiny_gemma3_vision(tmp_path, layout="legacy", mm_tokens_per_image=4, tie_word_embeddings=False, seed=1)
    model, processor = minift.load(path)
    assert model.lm_head.weight is not model.language_model.embed_tokens.weight
    assert model.config.pooling_kernel == 4
    ref = transformers.Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    batch = processor(text=BATCHES["padded"][0], images=[images(1), images(2, 1)], return_tensors="pt", padding=True)
    ours, out = run_both(model, ref, batch)
    assert rel(ours.logits, out.logits) <= TOL


def test_text_only_load(ckpts, loaded):
    _, processor, ref = loaded
    model, tok = minift.load(ckpts["legacy"], text_only=True)
    assert isinstance(model, CausalLM)
    ids = tok(["a text only prompt for the language model"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_vision_tower(ckpts):
    model, processor = minift.load(ckpts["v5"], full_finetuning=True)
    model.train()
    batch = processor(text=BATCHES["one_image"][0], images=[images(1), images(1, 2)], return_tensors="pt")
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["token_type_ids"],
                batch["input_ids"])
    assert out.logits is None  # training with labels: fused loss
    out.loss.backward()
    vm = model.model.vision_tower.vision_model
    for p in (vm.embeddings.patch_embedding.weight, model.model.multi_modal_projector.mm_input_projection_weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_module_names_and_config(loaded):
    model, _, ref = loaded
    assert model.config.model_type == "gemma3"
    assert model.config.vocab_size == model.config.text.vocab_size  # reads through to the text config
    assert model.config.raw["model_type"] == "gemma3"
    assert model.language_model is model.model.language_model
    ours = set(model.state_dict())
    assert "model.vision_tower.vision_model.embeddings.patch_embedding.weight" in ours
    assert "model.vision_tower.vision_model.encoder.layers.1.self_attn.out_proj.bias" in ours
    assert "model.multi_modal_projector.mm_soft_emb_norm.weight" in ours
    # every transformers tensor has a counterpart under canonical_key
    assert {canonical_key(k) for k in ref.state_dict()} == ours


def test_build_on_meta(ckpts):
    cfg = transformers.AutoConfig.from_pretrained(ckpts["v5"]).to_dict()
    with torch.device("meta"):
        model = build_vision_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.reset_buffers("cpu")
    model.tie_weights()
    assert model.lm_head.weight is model.language_model.embed_tokens.weight


def test_hub_style_minimal_config_fills_defaults():
    """The Hub's gemma-3 configs list only non-default text/vision fields."""
    cfg = {
        "model_type": "gemma3", "mm_tokens_per_image": 256,
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
    }
    with torch.device("meta"):
        model = build_vision_model(cfg)
    c = model.config
    assert (c.text.num_attention_heads, c.text.head_dim, c.text.vocab_size, c.text.query_pre_attn_scalar) == (8, 256, 262208, 256)
    assert c.pooling_kernel == 4 and c.image_token_index == 262144 and c.tie_word_embeddings
    assert c.text.rope["full_attention"].rope_type == "linear" and c.text.layer_types[5] == "full_attention"


def test_canonical_and_text_only_keys():
    want = {
        "model.language_model.layers.0.mlp.up_proj.weight": [
            "language_model.model.layers.0.mlp.up_proj.weight", "model.language_model.layers.0.mlp.up_proj.weight"],
        "model.vision_tower.vision_model.encoder.layers.3.mlp.fc1.bias": [
            "vision_tower.vision_model.encoder.layers.3.mlp.fc1.bias", "vision_tower.encoder.layers.3.mlp.fc1.bias",
            "model.vision_tower.encoder.layers.3.mlp.fc1.bias",
            "model.vision_tower.vision_model.encoder.layers.3.mlp.fc1.bias"],
        "model.multi_modal_projector.mm_input_projection_weight": [
            "multi_modal_projector.mm_input_projection_weight", "model.multi_modal_projector.mm_input_projection_weight"],
        "lm_head.weight": ["language_model.lm_head.weight", "lm_head.weight"],
    }
    for canon, keys in want.items():
        for k in keys:
            assert canonical_key(k) == canon, k
    assert text_only_key("language_model.model.norm.weight") == "model.norm.weight"
    assert text_only_key("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert text_only_key("language_model.lm_head.weight") == "lm_head.weight"
    assert text_only_key("vision_tower.vision_model.post_layernorm.weight") is None
    assert text_only_key("model.multi_modal_projector.mm_soft_emb_norm.weight") is None


def test_mask_image_block_under_sliding_window():
    """transformers' sliding layers: AND(window, OR(causal, block)): the window cuts the past,
    never the rest of the query's own image."""
    tt = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0]])
    g = image_groups(tt)
    assert g.tolist() == [[-1, 0, 0, 0, 0, 0, -1, -1]]
    m = build_mask(1, 8, torch.device("cpu"), sliding_window=2, bidirectional_groups=g)[0, 0]
    assert m[1].tolist() == [True, True, True, True, True, True, False, False]  # whole image ahead, 1 back
    assert m[5].tolist() == [False, False, False, False, True, True, False, False]  # window cuts image tokens 1-3
    assert m[7].tolist() == [False, False, False, False, False, False, True, True]
    assert image_groups(torch.tensor([[1, 1, 0, 1, 0, 1]])).tolist() == [[0, 0, -1, 1, -1, 2]]


def test_bad_inputs(loaded):
    model, processor, _ = loaded
    batch = processor(text=BATCHES["two_images"][0], images=[images(2), images(2, 1)], return_tensors="pt", padding=True)
    ids, am, px, tt = batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["token_type_ids"]
    with pytest.raises(InputError, match=r"64 image tokens.*3 image\(s\) x 16 .* = 48"):
        model(ids, am, px[:3], tt)
    with pytest.raises(InputError, match=r"64 image tokens.*0 image\(s\)"):
        model(ids, am, None, tt)
    with pytest.raises(InputError, match=r"pixel_values has shape \(4, 3, 32, 32\).*\(num_images, 3, 64, 64\)"):
        model(ids, am, px[:, :, :32, :32], tt)
    with pytest.raises(InputError, match=r"pixel_values has shape \(4, 1, 64, 64\)"):
        model(ids, am, px[:, :1], tt)
    with pytest.raises(InputError, match="dtype"):
        model(ids, am, px.to(torch.uint8), tt)
    with pytest.raises(InputError, match="token_type_ids has shape"):
        model(ids, am, px, tt[:, :-1])


def test_bad_configs():
    base = {"model_type": "gemma3", "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                                                   "num_attention_heads": 4, "head_dim": 16, "vocab_size": 300},
            "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                              "num_attention_heads": 4, "image_size": 64, "patch_size": 8}}
    with torch.device("meta"):
        with pytest.raises(ConfigError, match="mm_tokens_per_image 15"):
            build_vision_model({**base, "mm_tokens_per_image": 15})
        with pytest.raises(ConfigError, match="image_size 60 is not a multiple of patch_size 8"):
            build_vision_model({**base, "mm_tokens_per_image": 4, "vision_config": {**base["vision_config"], "image_size": 60}})
        with pytest.raises(ConfigError, match="vision_config"):
            build_vision_model({k: v for k, v in base.items() if k != "vision_config"})
