"""A tiny random-weight Gemma 3 vision checkpoint (`Gemma3ForConditionalGeneration`) with its
processor, built offline.

transformers builds and saves it (it is the numerical reference in the tests); minift's own
vision code never imports transformers. The defaults make every part matter: a pooling kernel of
2 (8x8 patches to 4x4 image tokens), random norm weights and biases, and an image block (16
tokens) longer than the text sliding window (8), so the sliding-layer mask composition counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .tiny import tiny_tokenizer

VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    image_size=64, patch_size=8, num_channels=3, layer_norm_eps=1e-6, vision_use_head=False,
)
TEXT_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, query_pre_attn_scalar=16, sliding_window=8, max_position_embeddings=256,
    layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def tiny_gemma3_processor(mm_tokens_per_image: int = 16, image_size: int = 64):
    """Gemma3Processor over the tiny Gemma-template tokenizer and a PIL image processor."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast

    base = tiny_tokenizer(template="gemma")
    # Gemma3Processor reads tokenizer.boi_token / eoi_token / image_token (and their ids):
    # model-specific special tokens, saved in tokenizer_config.json as extra_special_tokens.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )
    tok.chat_template = base.chat_template
    images = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    return Gemma3Processor(
        image_processor=images, tokenizer=tok, image_seq_length=mm_tokens_per_image, chat_template=base.chat_template
    )


def tiny_hf_gemma3_vision(processor=None, *, seed: int = 0, vision: dict | None = None, **overrides: Any):
    """A random-weight transformers Gemma3ForConditionalGeneration (float32, eval mode).

    `vision` updates the SigLIP config; `text_<field>=` overrides update the text config; any
    other keyword (mm_tokens_per_image, ...) goes to Gemma3Config."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    processor = processor or tiny_gemma3_processor()
    tok = processor.tokenizer
    text_kw = dict(TEXT_DEFAULTS, vocab_size=len(tok))
    text_kw.update({k[5:]: v for k, v in overrides.items() if k.startswith("text_")})
    top = {k: v for k, v in overrides.items() if not k.startswith("text_")}
    vision_kw = dict(VISION_DEFAULTS, **(vision or {}))
    cfg = Gemma3Config(
        text_config=Gemma3TextConfig(**text_kw),
        vision_config=SiglipVisionConfig(**vision_kw),
        mm_tokens_per_image=top.pop("mm_tokens_per_image", processor.image_seq_length),
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
        **top,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # HF inits norms to 0/1, biases and the projection to 0: randomise so they matter
        for name, p in model.named_parameters():
            if "mm_input_projection_weight" in name:
                p.normal_(0.0, p.shape[0] ** -0.5)
            elif "vision_tower" in name and ("layer_norm" in name or "layernorm" in name):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            elif "norm" in name:  # Gemma RMSNorms: (1 + weight)
                p.normal_(0.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model.eval()


LAYOUTS = ("v5", "legacy", "save_pretrained")
_LEGACY = (  # transformers 5 module name -> the name the original Hub checkpoints use
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


def to_legacy_key(key: str) -> str:
    """transformers 5's name for a tensor → the original Hub layout's (gemma-3-*-it)."""
    key = key.replace("model.vision_tower.vision_model.", "model.vision_tower.")
    for new, old in _LEGACY:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def write_tiny_gemma3_vision(path: str | Path, *, layout: str = "v5", seed: int = 0, **overrides: Any) -> Path:
    """Writes a tiny Gemma 3 vision checkpoint (config, safetensors, tokenizer, processor) into `path`.

    layout: the tensor names in model.safetensors:
      "v5": transformers 5's module names (model.language_model.*, model.vision_tower.embeddings.*,
            model.multi_modal_projector.*; lm_head.weight only when untied);
      "legacy": the original Hub layout (language_model.model.*, vision_tower.vision_model.*,
            multi_modal_projector.*, language_model.lm_head.weight when untied);
      "save_pretrained": whatever transformers' save_pretrained writes (at 5.23: the legacy
            prefixes without the tower's `vision_model.` level).
    Overrides: see `tiny_hf_gemma3_vision`; `mm_tokens_per_image` also sets the processor's
    image_seq_length and vision={"image_size": ...} its image size."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    path = Path(path)
    image_size = (overrides.get("vision") or {}).get("image_size", VISION_DEFAULTS["image_size"])
    processor = tiny_gemma3_processor(overrides.get("mm_tokens_per_image", 16), image_size)
    model = tiny_hf_gemma3_vision(processor, seed=seed, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    if layout != "save_pretrained":
        from safetensors.torch import save_file

        for f in path.glob("*.safetensors*"):
            f.unlink()
        sd = model.state_dict()
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight")
        rename = to_legacy_key if layout == "legacy" else (lambda k: k)
        save_file({rename(k): v.contiguous() for k, v in sd.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return path
