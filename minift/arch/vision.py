"""Gemma 3 vision-language model (transformers' `Gemma3ForConditionalGeneration`) in minift's own
modules: the SigLIP tower, the multimodal projector and minift's text decoder.

Attribute names mirror transformers 5 (`model.language_model`, `model.vision_tower.vision_model`,
`model.multi_modal_projector`, `lm_head`), so a checkpoint maps 1:1 after
`minift.io.keys.canonical_key` (which reads both of the Hub's key layouts).
Image features replace the image-token embeddings; the tokens of one image attend to each
other both ways (token_type_ids == 1 runs), everything else is causal, as transformers does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError, UnsupportedModelError
from ..io.info import LoadInfo
from .cache import KVCache
from .config import ModelConfig
from .model import CausalLM, CausalLMOutput, RMSNorm, TextModel
from .siglip import SiglipVisionModel, VisionConfig

# Gemma3TextConfig's defaults (transformers 5): the Hub's gemma-3 configs list only the text
# fields that differ from these, so they must be filled before ModelConfig.from_hf reads them.
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = dict(
    model_type="gemma3_text", vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
    pad_token_id=0, eos_token_id=1, bos_token_id=2, attention_bias=False, query_pre_attn_scalar=256,
    sliding_window=4096, final_logit_softcapping=None, attn_logit_softcapping=None,
)


def gemma3_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text_config of a gemma3 config.json, completed with Gemma3TextConfig's defaults and
    the top-level tie_word_embeddings (which is what transformers 5 ties by). Also what a
    text-only load of a vision checkpoint should pass to `ModelConfig.from_hf`."""
    t = dict(GEMMA3_TEXT_DEFAULTS)
    t.update(cfg.get("text_config") or {})
    if not t.get("model_type"):
        t["model_type"] = "gemma3_text"
    t["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", True)))
    return t


@dataclass
class VisionLMConfig:
    """Config of a Gemma 3 vision-language checkpoint (config.json with model_type "gemma3").

    text: the language model's ModelConfig (from text_config, see `gemma3_text_config`).
    vision: the SigLIP tower's VisionConfig (from vision_config).
    mm_tokens_per_image: image tokens per image after pooling (a square number; 256 on the Hub).
    image_token_index: id of the placeholder token the image features replace (`<image_soft_token>`).
    boi_token_index, eoi_token_index: ids of `<start_of_image>` / `<end_of_image>` (kept for
        data collation; the model itself does not use them).
    tie_word_embeddings: lm_head shares the text embedding (top-level flag, default True).
    final_logit_softcapping: None: transformers' Gemma3ForConditionalGeneration never soft-caps
        its logits, whatever text_config says (only Gemma3ForCausalLM does).
    model_type: "gemma3".
    raw: the whole config.json dict, kept to write merged checkpoints back.

    Any other attribute (vocab_size, hidden_size, pad_token_id, ...) reads through to `text`,
    so code written against a CausalLM's config works on the vision model too.
    """

    text: ModelConfig
    vision: VisionConfig
    mm_tokens_per_image: int = 256
    image_token_index: int = 262_144
    boi_token_index: int = 255_999
    eoi_token_index: int = 256_000
    tie_word_embeddings: bool = True
    final_logit_softcapping: float | None = None
    model_type: str = "gemma3"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:  # only called for names the dataclass lacks
        if name.startswith("__") or name == "text":
            raise AttributeError(name)
        return getattr(self.text, name)

    @property
    def pooling_kernel(self) -> int:
        """Patches per side pooled into one image token per side."""
        return self.vision.patches_per_side // math.isqrt(self.mm_tokens_per_image)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, source: str = "config.json") -> "VisionLMConfig":
        if cfg.get("model_type") != "gemma3":
            raise UnsupportedModelError(f"{source}: model_type {cfg.get('model_type')!r} is not a gemma3 vision model")
        if cfg.get("vision_config") is None:
            raise ConfigError(f"{source}: model_type 'gemma3' needs a 'vision_config'")
        text = ModelConfig.from_hf(gemma3_text_config(cfg), source=f"{source} text_config")
        vision = VisionConfig.from_hf(cfg["vision_config"], source=f"{source} vision_config")

        def get(name: str, default: int) -> int:  # *_index, or transformers' *_id alias of it
            v = cfg.get(name, cfg.get(name.replace("_index", "_id")))
            return int(default if v is None else v)

        out = cls(
            text=text,
            vision=vision,
            mm_tokens_per_image=get("mm_tokens_per_image", 256),
            image_token_index=get("image_token_index", 262_144),
            boi_token_index=get("boi_token_index", 255_999),
            eoi_token_index=get("eoi_token_index", 256_000),
            tie_word_embeddings=text.tie_word_embeddings,
            raw=dict(cfg),
        )
        mm, side = out.mm_tokens_per_image, vision.patches_per_side
        per_side = math.isqrt(mm) if mm > 0 else 0
        if per_side * per_side != mm or per_side > side or (side // (side // per_side)) ** 2 != mm:
            raise ConfigError(
                f"{source}: mm_tokens_per_image {mm} must be a square number whose root evenly pools the "
                f"{side}x{side} patch grid (image_size {vision.image_size} / patch_size {vision.patch_size})"
            )
        return out


class MultiModalProjector(nn.Module):
    """Average-pools the patch grid to mm_tokens_per_image tokens, RMS-normalises them (Gemma
    form, 1 + weight) and projects them to the text width."""

    def __init__(self, cfg: VisionLMConfig):
        super().__init__()
        v = cfg.vision
        self.mm_input_projection_weight = nn.Parameter(torch.empty(v.hidden_size, cfg.text.hidden_size))
        self.mm_soft_emb_norm = RMSNorm(v.hidden_size, v.layer_norm_eps, 1.0)
        self.side, self.kernel = v.patches_per_side, cfg.pooling_kernel

    def forward(self, vision_out: torch.Tensor) -> torch.Tensor:
        n, _, h = vision_out.shape
        grid = vision_out.transpose(1, 2).reshape(n, h, self.side, self.side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(vision_out)


class Gemma3Model(nn.Module):
    """transformers' `Gemma3Model`: the vision tower, the projector and the text decoder."""

    def __init__(self, cfg: VisionLMConfig):
        super().__init__()
        self.vision_tower = SiglipVisionModel(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(cfg)
        self.language_model = TextModel(cfg.text)

    @property
    def gradient_checkpointing(self) -> bool | str:
        return self.language_model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool | str) -> None:
        """Applies to the decoder and (as plain recomputation) to the vision encoder."""
        self.language_model.gradient_checkpointing = value
        self.vision_tower.vision_model.encoder.gradient_checkpointing = bool(value)


def image_groups(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Group id per token for the attention mask: each run of token_type_ids == 1 (one image's
    tokens) gets its own id 0, 1, ... per row; -1 elsewhere (transformers'
    get_block_sequence_ids_for_mask)."""
    is_img = token_type_ids == 1
    prev = torch.cat([torch.zeros_like(is_img[:, :1]), is_img[:, :-1]], dim=1)
    gid = (is_img & ~prev).long().cumsum(1) - 1
    return torch.where(is_img, gid, torch.full_like(gid, -1))


class Gemma3VisionLM(nn.Module):
    """Gemma 3 with its SigLIP vision tower (transformers' `Gemma3ForConditionalGeneration`)."""

    def __init__(self, cfg: VisionLMConfig):
        super().__init__()
        self.config = cfg
        self.model = Gemma3Model(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.load_info = LoadInfo()

    # The LM head and loss are CausalLM's own: they read self.lm_head, self.training and
    # self.config.final_logit_softcapping (None here, as in transformers).
    compute_logits = CausalLM.compute_logits
    head = CausalLM.head

    @property
    def language_model(self) -> TextModel:
        return self.model.language_model

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        self.model.language_model.reset_buffers(device)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, C, H, W) pixels → (images, mm_tokens_per_image, text hidden) features."""
        v = self.config.vision
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (v.num_channels, v.image_size, v.image_size):
            raise InputError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected (num_images, {v.num_channels}, "
                f"{v.image_size}, {v.image_size}) as this model's processor produces"
            )
        if not pixel_values.is_floating_point():
            raise InputError(f"pixel_values has dtype {pixel_values.dtype}; expected normalised floats from the processor")
        return self.model.multi_modal_projector(self.model.vision_tower(pixel_values))

    def _check_image_tokens(self, is_image: torch.Tensor, num_images: int) -> None:
        """Image tokens in input_ids must equal images x mm_tokens_per_image. On CPU this raises a
        typed error. On an accelerator, counting on the host would stall the GPU every step, so
        the check is a device-side assert instead (the trainer validates each example on the host
        while tokenising, where the count is free). Skipped under torch.compile."""
        if torch.compiler.is_compiling():
            return
        want = num_images * self.config.mm_tokens_per_image
        if is_image.device.type != "cpu":
            torch._assert_async(
                is_image.sum() == want,
                f"image tokens in input_ids != {num_images} image(s) x {self.config.mm_tokens_per_image}",
            )
            return
        have = int(is_image.sum())
        if have != want:
            raise InputError(
                f"input_ids hold {have} image tokens (id {self.config.image_token_index}) but pixel_values holds "
                f"{num_images} image(s) x {self.config.mm_tokens_per_image} tokens per image = {want}; "
                "build inputs with the model's processor (one <start_of_image> per image, no truncation inside images)"
            )

    def _check_features(self, image_features: torch.Tensor, pixel_values: torch.Tensor | None) -> None:
        want = (self.config.mm_tokens_per_image, self.config.text.hidden_size)
        if pixel_values is not None:
            raise InputError("pass pixel_values or image_features (the tower's output), not both")
        if image_features.ndim != 3 or tuple(image_features.shape[1:]) != want:
            raise InputError(f"image_features has shape {tuple(image_features.shape)}; expected (num_images, "
                             f"{want[0]}, {want[1]}) as image_features(pixel_values) returns")

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
              check: bool = True, always_run_vision: bool = False,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled text embeddings with the image features written over the image tokens, in order
        (row by row, left to right, images in pixel_values order). `check=False` (generated
        tokens) reads an image token without pixels as text, as transformers does.
        `always_run_vision` (FSDP): a batch without images still runs the tower, on one blank
        image whose features enter times zero, so every rank's all-gathers and gradient
        reductions of the sharded tower line up (the embeddings are unchanged).
        `image_features`: the tower's output, computed by the caller instead of from
        pixel_values (a frozen tower's features computed once and reused, a tower run elsewhere)."""
        cfg = self.config
        is_image = input_ids == cfg.image_token_index
        ids = input_ids.masked_fill(is_image, 0) if cfg.image_token_index >= cfg.text.vocab_size else input_ids
        if image_features is not None:
            self._check_features(image_features, pixel_values)
        num_images = (image_features.shape[0] if image_features is not None else
                      0 if pixel_values is None else pixel_values.shape[0])
        if check:
            self._check_image_tokens(is_image, num_images)
        x = self.model.language_model.embed(ids)
        if num_images == 0 and always_run_vision:
            v = cfg.vision
            blank = torch.zeros(1, v.num_channels, v.image_size, v.image_size, device=x.device)
            return x + 0.0 * self.image_features(blank).sum().to(x.dtype)
        if num_images == 0:
            return x
        feats = (image_features if image_features is not None else self.image_features(pixel_values)).to(x.dtype)
        flat = feats.reshape(-1, feats.shape[-1])
        # The k-th image token takes feature row k: a gather and a select, no sync (unlike
        # boolean indexing), so it compiles; clamping keeps a mismatch under compile in bounds.
        idx = (is_image.reshape(-1).long().cumsum(0) - 1).clamp(0, flat.shape[0] - 1)
        return torch.where(is_image.unsqueeze(-1), flat[idx].view_as(x), x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        return_logits: bool | None = None,
        loss_normalizer: torch.Tensor | float | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        always_run_vision: bool = False,
        image_features: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits and/or the shifted next-token loss, as CausalLM.forward (`always_run_vision`,
        `image_features`: see `embed`).

        token_type_ids (1 on image tokens, from the processor) make each image's tokens attend to
        each other both ways; without them attention is causal everywhere, as in transformers."""
        if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
            raise InputError(
                f"token_type_ids has shape {tuple(token_type_ids.shape)}; expected input_ids' {tuple(input_ids.shape)}"
            )
        x = self.embed(input_ids, pixel_values, check=cache is None or cache.prefilling,
                       always_run_vision=always_run_vision, image_features=image_features)
        groups = image_groups(token_type_ids) if token_type_ids is not None else None
        hidden = self.model.language_model(
            None, attention_mask, position_ids, inputs_embeds=x, bidirectional_groups=groups, cache=cache
        )
        return self.head(hidden, labels, return_logits=return_logits, loss_normalizer=loss_normalizer,
                         logits_to_keep=logits_to_keep)


def build_vision_model(config_dict: dict[str, Any]) -> Gemma3VisionLM:
    """The model for a gemma3 config.json dict (parameters uninitialised; fine under meta)."""
    return Gemma3VisionLM(VisionLMConfig.from_hf(config_dict))
