"""minift's model config: one dataclass that drives the single decoder for every family.

Family differences are fields here (norm offset, sandwich norms, q/k norms, soft-capping,
per-layer attention types, RoPE per layer type), read from a Hugging Face `config.json` by
`ModelConfig.from_hf`. What each model_type does differently is one row of `FAMILIES`, so
adding a family is adding a row; nothing, `from_hf` included, checks the family's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, UnsupportedModelError

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class Family:
    """What one text model_type does differently, as transformers' modeling code hard-wires it
    (config.json does not say). `ModelConfig.from_hf` reads only this about the family.

    norm_offset: RMSNorm multiplies by (offset + weight).
    embed_scale: embeddings are multiplied by sqrt(hidden_size).
    hidden_act: activation when config.json names none.
    gelu_is_tanh: a config's "gelu" means the tanh approximation (legacy Gemma configs).
    tie_word_embeddings: default when config.json does not say.
    sandwich_norms, qk_norm: as the ModelConfig fields.
    softcapping: config.json's query_pre_attn_scalar, attn_logit_softcapping and
        final_logit_softcapping apply (other families' modeling code ignores them).
    sliding_layers: layer_types / sliding_window apply; False: every layer is full attention
        whatever config.json says (transformers' Llama and Gemma ignore both).
    full_every: without layer_types, every full_every-th layer is full and the others sliding;
        None: all sliding when sliding_window is set, else all full.
    full_every_key: config.json field that overrides full_every (Gemma 3's sliding_window_pattern).
    rope_theta: RoPE base when config.json gives none.
    local_rope_theta: sliding layers have a RoPE table of their own with this default base
        (Gemma 3's rope_local_base_freq); None: one table for all layers.
    """

    norm_offset: float = 0.0
    embed_scale: bool = False
    hidden_act: str = "silu"
    gelu_is_tanh: bool = False
    tie_word_embeddings: bool = False
    sandwich_norms: bool = False
    qk_norm: bool = False
    softcapping: bool = False
    sliding_layers: bool = True
    full_every: int | None = None
    full_every_key: str | None = None
    rope_theta: float = 10_000.0
    local_rope_theta: float | None = None


# Shared by every Gemma generation.
_GEMMA = dict(norm_offset=1.0, embed_scale=True, hidden_act="gelu_pytorch_tanh", gelu_is_tanh=True,
              tie_word_embeddings=True)

FAMILIES: dict[str, Family] = {
    "llama": Family(sliding_layers=False),
    "mistral": Family(),
    "gemma": Family(**_GEMMA, sliding_layers=False),
    "gemma2": Family(**_GEMMA, sandwich_norms=True, softcapping=True, full_every=2),
    "gemma3_text": Family(**_GEMMA, sandwich_norms=True, qk_norm=True, softcapping=True, full_every=6,
                          full_every_key="sliding_window_pattern", rope_theta=1_000_000.0,
                          local_rope_theta=10_000.0),
}

TEXT_MODEL_TYPES = tuple(FAMILIES)
VISION_MODEL_TYPES = ("gemma3",)  # the wrapper; its text_config is a gemma3_text row
SUPPORTED_MODEL_TYPES = TEXT_MODEL_TYPES + VISION_MODEL_TYPES

# Legacy rope_scaling 'type' names and HF's aliases, mapped to the names minift implements.
_ROPE_TYPES = {"default": "default", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3", "yarn": "yarn"}


@dataclass
class RopeConfig:
    """RoPE parameters for one attention type, as transformers' rope_parameters names them.

    rope_type: default | linear | dynamic | llama3 | yarn.
    rope_theta: base frequency.
    factor: scaling factor (linear, dynamic, llama3, yarn).
    low_freq_factor, high_freq_factor: llama3 smoothing band.
    original_max_position_embeddings: pre-training context (llama3, yarn); defaults to
        max_position_embeddings.
    attention_factor, beta_fast, beta_slow, mscale, mscale_all_dim, truncate: yarn.
    partial_rotary_factor: fraction of head_dim that rotates (1.0 for every family here).
    """

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any], default_theta: float, where: str) -> "RopeConfig":
        d = dict(d or {})
        kind = d.pop("rope_type", None) or d.pop("type", None) or "default"
        d.pop("type", None)
        if kind not in _ROPE_TYPES:
            raise ConfigError(
                f"config.json: {where}.rope_type {kind!r} is not supported; expected one of {sorted(_ROPE_TYPES)}"
            )
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        kwargs["rope_type"] = _ROPE_TYPES[kind]
        kwargs.setdefault("rope_theta", default_theta)
        rc = cls(**kwargs)
        if rc.rope_type in ("linear", "dynamic", "llama3") and rc.factor is None:
            raise ConfigError(f"config.json: {where} of type {rc.rope_type!r} needs a 'factor'")
        if rc.rope_type == "llama3" and (rc.low_freq_factor is None or rc.high_freq_factor is None):
            raise ConfigError(f"config.json: {where} of type 'llama3' needs 'low_freq_factor' and 'high_freq_factor'")
        return rc


@dataclass
class ModelConfig:
    """The fields minift's decoder uses. Names follow transformers' config.json.

    model_type: family as the checkpoint says (llama, mistral, gemma, gemma2, gemma3_text;
        gemma3 for the vision-language wrapper, whose text part is `text_config`).
    vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads (GQA when fewer than heads), head_dim (default hidden/heads).
    rms_norm_eps: RMSNorm epsilon.
    norm_offset: RMSNorm multiplies by (offset + weight): 0 for Llama/Mistral, 1 for Gemma.
    hidden_act: gated MLP activation: silu (SwiGLU) or gelu_pytorch_tanh / gelu (GeGLU).
    max_position_embeddings: context the checkpoint was built for (dynamic RoPE pivots on it).
    rope: RoPE per attention type ("full_attention", "sliding_attention").
    layer_types: per layer, "full_attention" or "sliding_attention".
    sliding_window: window of sliding layers (a query sees the last `sliding_window` keys,
        itself included), None for none.
    attention_bias, mlp_bias: biases on the projections.
    tie_word_embeddings: lm_head shares embed_tokens' weight.
    embed_scale: multiply embeddings by sqrt(hidden_size) (Gemma), rounded to the compute dtype.
    sandwich_norms: Gemma 2/3 norms around attention and MLP outputs (post_attention_layernorm
        normalises the attention output; pre/post_feedforward_layernorm wrap the MLP).
    qk_norm: RMSNorm on queries and keys per head (Gemma 3).
    query_pre_attn_scalar: attention scale is query_pre_attn_scalar**-0.5 (Gemma 2/3),
        else head_dim**-0.5.
    attn_logit_softcapping, final_logit_softcapping: tanh soft-capping of attention scores
        and of the output logits (Gemma 2).
    pad_token_id, bos_token_id, eos_token_id: from the config, for data collation.
    raw: the whole config.json dict, kept to write merged checkpoints back.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    norm_offset: float = 0.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope: dict[str, RopeConfig] = field(default_factory=dict)
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    qk_norm: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    pad_token_id: int | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Reads a text decoder's config.json dict (for gemma3 vision pass its text_config)."""
        mt = cfg.get("model_type")
        if mt not in TEXT_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type {mt!r} is not supported; minift supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def req(name: str) -> Any:
            if cfg.get(name) is None:
                raise ConfigError(f"{source}: required field {name!r} is missing (model_type {mt!r})")
            return cfg[name]

        fam = FAMILIES[mt]
        heads = int(req("num_attention_heads"))
        hidden = int(req("hidden_size"))
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        layers = int(req("num_hidden_layers"))
        if heads % kv:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")

        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or fam.hidden_act
        if fam.gelu_is_tanh and act == "gelu":  # transformers maps it to the tanh form
            act = "gelu_pytorch_tanh"
        if act not in ("silu", "gelu_pytorch_tanh", "gelu", "gelu_new"):
            raise ConfigError(f"{source}: hidden activation {act!r} is not supported (silu, gelu_pytorch_tanh, gelu)")
        if act == "gelu_new":
            act = "gelu_pytorch_tanh"

        sliding = cfg.get("sliding_window")
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            layer_types = _default_layer_types(fam, cfg, layers, sliding)
        layer_types = list(layer_types)
        if len(layer_types) != layers or any(t not in (FULL, SLIDING) for t in layer_types):
            raise ConfigError(
                f"{source}: layer_types must list {layers} entries of {FULL!r}/{SLIDING!r}, got {layer_types!r}"
            )
        if SLIDING in layer_types and not sliding:
            raise ConfigError(f"{source}: layer_types has sliding layers but sliding_window is {sliding!r}")
        if not fam.sliding_layers:
            layer_types = [FULL] * layers
        if cfg.get("use_bidirectional_attention"):
            raise ConfigError(f"{source}: use_bidirectional_attention=True (an encoder) is not supported")

        rope = _read_rope(cfg, fam, source)
        capped = fam.softcapping
        return cls(
            model_type=mt,
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
            norm_offset=fam.norm_offset,
            hidden_act=act,
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
            rope=rope,
            layer_types=layer_types,
            sliding_window=int(sliding) if sliding and SLIDING in layer_types else None,
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", fam.tie_word_embeddings)),
            embed_scale=fam.embed_scale,
            sandwich_norms=fam.sandwich_norms,
            qk_norm=fam.qk_norm,
            query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]) if capped and cfg.get("query_pre_attn_scalar") else None,
            attn_logit_softcapping=cfg.get("attn_logit_softcapping") if capped else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping") if capped else None,
            pad_token_id=cfg.get("pad_token_id"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            raw=dict(cfg),
        )


def _default_layer_types(fam: Family, cfg: dict[str, Any], layers: int, sliding: Any) -> list[str]:
    """Per-layer attention types for a config.json without layer_types, as the family's
    transformers code derives them."""
    if not fam.sliding_layers:
        return [FULL] * layers
    if fam.full_every is not None:
        every = fam.full_every
        if fam.full_every_key:
            every = int(cfg.get(fam.full_every_key) or every)
        return [SLIDING if (i + 1) % every else FULL for i in range(layers)]
    return [SLIDING if sliding is not None else FULL] * layers


def _read_rope(cfg: dict[str, Any], fam: Family, source: str) -> dict[str, RopeConfig]:
    """RoPE per attention type from `rope_parameters` (transformers 5) or the legacy fields
    (`rope_theta`, `rope_scaling`, Gemma 3's `rope_local_base_freq`). A family with
    `local_rope_theta` keeps one table per attention type; the others share one."""
    params = cfg.get("rope_parameters")
    legacy = cfg.get("rope_scaling")
    if fam.local_rope_theta is None:
        if isinstance(params, dict) and ("rope_type" in params or "rope_theta" in params):
            d = dict(params)
        else:
            d = dict(legacy or {})
            if cfg.get("rope_theta") is not None:
                d.setdefault("rope_theta", cfg["rope_theta"])
        rc = RopeConfig.from_dict(d, fam.rope_theta, f"{source}: rope_parameters")
        out = {FULL: rc, SLIDING: rc}
    elif isinstance(params, dict) and FULL in params:
        out = {
            t: RopeConfig.from_dict(params.get(t), theta, f"{source}: rope_parameters.{t}")
            for t, theta in ((FULL, fam.rope_theta), (SLIDING, fam.local_rope_theta))
        }
    else:
        full = dict(legacy or {})
        full.setdefault("rope_theta", cfg.get("rope_theta") or fam.rope_theta)
        out = {
            FULL: RopeConfig.from_dict(full, fam.rope_theta, f"{source}: rope_scaling"),
            SLIDING: RopeConfig(rope_theta=float(cfg.get("rope_local_base_freq") or fam.local_rope_theta)),
        }
    for rc in out.values():
        if rc.original_max_position_embeddings is None and rc.rope_type in ("llama3", "yarn"):
            rc.original_max_position_embeddings = int(cfg.get("max_position_embeddings") or 2048)
        if rc.rope_type == "yarn" and rc.factor is None:
            rc.factor = float(cfg.get("max_position_embeddings") or 2048) / rc.original_max_position_embeddings
    if not all(math.isfinite(rc.rope_theta) and rc.rope_theta > 0 for rc in out.values()):
        raise ConfigError(f"{source}: rope_theta must be a positive number")
    return out
