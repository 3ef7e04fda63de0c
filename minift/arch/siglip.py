"""SigLIP vision encoder, as Gemma 3 uses it (transformers' SiglipVisionModel without the
pooling head): patch-embedding conv, learned position embeddings, pre-LayerNorm encoder layers
with biased q/k/v/out projections and a tanh-GELU MLP, and a final LayerNorm.

Module names mirror the checkpoint (`vision_model.embeddings.patch_embedding`,
`vision_model.encoder.layers.N.self_attn.q_proj`, `vision_model.post_layernorm`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..errors import ConfigError
from .model import draws_random, layer_input


@dataclass
class VisionConfig:
    """SigLIP fields, named as in the checkpoint's `vision_config` (missing ones take
    SiglipVisionConfig's defaults, as the Hub's Gemma 3 configs rely on).

    hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: the encoder.
    image_size, patch_size: square input images of image_size pixels, cut into
        (image_size / patch_size)^2 patches, one token each.
    num_channels: input channels (3, RGB).
    layer_norm_eps: LayerNorm epsilon; also the epsilon of Gemma 3's mm_soft_emb_norm.
    hidden_act: MLP activation (gelu_pytorch_tanh for every SigLIP checkpoint Gemma 3 uses).
    raw: the vision_config dict as read.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, source: str = "config.json vision_config") -> "VisionConfig":
        d = dict(d or {})
        known = {f for f in cls.__dataclass_fields__ if f != "raw"}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        for k in ("image_size", "patch_size"):  # SiglipVisionConfig allows [h, w]; Gemma 3 is square
            v = kw.get(k)
            if isinstance(v, (list, tuple)):
                if len(v) != 2 or v[0] != v[1]:
                    raise ConfigError(f"{source}: {k} {v!r} is not square; minift supports square images only")
                kw[k] = v[0]
        cfg = cls(**kw, raw=d)
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu", "gelu_new"):
            raise ConfigError(f"{source}: hidden_act {cfg.hidden_act!r} is not supported (gelu_pytorch_tanh, gelu)")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(
                f"{source}: hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads {cfg.num_attention_heads}"
            )
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(f"{source}: image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        return cfg


class LayerNorm(nn.Module):
    """LayerNorm with nn.LayerNorm's parameter names, through `minift.ops.layer_norm`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (n, hidden, gh, gw)
        # patches in row-major image order; the position table first, so the sum is laid out as it is
        # (patch rows contiguous): the conv's transposed view as the first operand would make every
        # later activation of the tower patch-major (strided norm reads; transformers' layout)
        return self.position_embedding.weight + x.flatten(2).transpose(1, 2)


class VisionAttention(nn.Module):
    """Full (non-causal) multi-head attention over one image's patches."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(h, h) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.approximate = "none" if cfg.hidden_act == "gelu" else "tanh"
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """The encoder layers. With gradient checkpointing, each image runs through them on its own
    (`per_image`, every layer checkpointed): the backward then recomputes one image's layer at a
    time however many images the batch holds (on Gemma 3's 4096-patch tower one image's layer is
    ~0.3 GB of activations, four images' at once ~1.2 GB), and each saved layer input is one
    image's, which the Trainer moves to the host (train/offload.py). The images never meet in
    the tower, so this is the same function; each GEMM takes one image's rows, as in a batch of
    one image. per_image=False runs all images at once (FSDP2 sets it: every rank must call each
    sharded layer as often as the others, whatever its image count)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False
        self.per_image = True
        self.input_requires_grad = False  # as TextModel's: compiled layers then share one graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = layer_input(x, self.input_requires_grad and self.training)
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            for layer in self.layers:
                x = layer(x)
            return x
        if self.per_image and x.shape[0] > 1:
            return torch.cat([self._checkpointed(x[i:i + 1]) for i in range(x.shape[0])])
        return self._checkpointed(x)

    def _checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False, preserve_rng_state=draws_random(layer))
        return x


class SiglipVisionTransformer(nn.Module):
    """transformers' `vision_tower.vision_model`: pixels (n, C, H, W) → (n, patches, hidden)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class SiglipVisionModel(nn.Module):
    """The `vision_tower` wrapper, kept so parameter names match the checkpoint's
    (`vision_tower.vision_model.*`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)
