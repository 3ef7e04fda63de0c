"""minift's model config: one dataclass that drives the single decoder for every family.

Family differences are fields here (norm offset, sandwich norms, q/k norms, soft-capping,
per-layer attention types, RoPE per layer type), read from a Hugging Face `config.json` by
`ModelConfig.from_hf`. Nothing downstream checks the family's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, UnsupportedModelError

TEXT_MODEL_TYPES = ("llama", "mistral", "gemma", "gemma2", "gemma3_text")
VISION_MODEL_TYPES = ("gemma3",)
SUPPORTED_MODEL_TYPES = TEXT_MODEL_TYPES + VISION_MODEL_TYPES

FULL = "full_attention"
SLIDING = "sliding_attention"

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

    @property
    def is_gemma(self) -> bool:
        return self.norm_offset == 1.0

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

        gemma = mt.startswith("gemma")
        heads = int(req("num_attention_heads"))
        hidden = int(req("hidden_size"))
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        layers = int(req("num_hidden_layers"))
        if heads % kv:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")

        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        if gemma and act == "gelu":  # legacy Gemma value; transformers maps it to the tanh form
            act = "gelu_pytorch_tanh"
        if act not in ("silu", "gelu_pytorch_tanh", "gelu", "gelu_new"):
            raise ConfigError(f"{source}: hidden activation {act!r} is not supported (silu, gelu_pytorch_tanh, gelu)")
        if act == "gelu_new":
            act = "gelu_pytorch_tanh"

        sliding = cfg.get("sliding_window")
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            if mt == "gemma2":
                layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(layers)]
            elif mt == "gemma3_text":
                pattern = int(cfg.get("sliding_window_pattern") or 6)
                layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
            elif mt == "mistral" and sliding is not None:
                layer_types = [SLIDING] * layers
            else:
                layer_types = [FULL] * layers
        layer_types = list(layer_types)
        if len(layer_types) != layers or any(t not in (FULL, SLIDING) for t in layer_types):
            raise ConfigError(
                f"{source}: layer_types must list {layers} entries of {FULL!r}/{SLIDING!r}, got {layer_types!r}"
            )
        if SLIDING in layer_types and not sliding:
            raise ConfigError(f"{source}: layer_types has sliding layers but sliding_window is {sliding!r}")
        if mt in ("llama", "gemma"):
            layer_types = [FULL] * layers
        if cfg.get("use_bidirectional_attention"):
            raise ConfigError(f"{source}: use_bidirectional_attention=True (an encoder) is not supported")

        rope = _read_rope(cfg, mt, source)
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
            norm_offset=1.0 if gemma else 0.0,
            hidden_act=act,
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
            rope=rope,
            layer_types=layer_types,
            sliding_window=int(sliding) if sliding and SLIDING in layer_types else None,
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            embed_scale=gemma,
            sandwich_norms=mt in ("gemma2", "gemma3_text"),
            qk_norm=mt == "gemma3_text",
            query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]) if mt in ("gemma2", "gemma3_text") and cfg.get("query_pre_attn_scalar") else None,
            attn_logit_softcapping=cfg.get("attn_logit_softcapping") if mt in ("gemma2", "gemma3_text") else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping") if mt in ("gemma2", "gemma3_text") else None,
            pad_token_id=cfg.get("pad_token_id"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            raw=dict(cfg),
        )


def _read_rope(cfg: dict[str, Any], mt: str, source: str) -> dict[str, RopeConfig]:
    """RoPE per attention type from `rope_parameters` (transformers 5) or the legacy fields
    (`rope_theta`, `rope_scaling`, Gemma 3's `rope_local_base_freq`)."""
    params = cfg.get("rope_parameters")
    legacy_scaling = cfg.get("rope_scaling")
    if mt == "gemma3_text":
        if isinstance(params, dict) and FULL in params:
            full = RopeConfig.from_dict(params[FULL], 1_000_000.0, f"{source}: rope_parameters.{FULL}")
            local = RopeConfig.from_dict(params.get(SLIDING), 10_000.0, f"{source}: rope_parameters.{SLIDING}")
        else:
            full_d = dict(legacy_scaling or {})
            full_d.setdefault("rope_theta", cfg.get("rope_theta") or 1_000_000.0)
            full = RopeConfig.from_dict(full_d, 1_000_000.0, f"{source}: rope_scaling")
            local = RopeConfig(rope_theta=float(cfg.get("rope_local_base_freq") or 10_000.0))
        out = {FULL: full, SLIDING: local}
    else:
        if isinstance(params, dict) and ("rope_type" in params or "rope_theta" in params):
            d = dict(params)
        else:
            d = dict(legacy_scaling or {})
            if cfg.get("rope_theta") is not None:
                d.setdefault("rope_theta", cfg["rope_theta"])
        rc = RopeConfig.from_dict(d, 10_000.0, f"{source}: rope_parameters")
        out = {FULL: rc, SLIDING: rc}
    for rc in out.values():
        if rc.original_max_position_embeddings is None and rc.rope_type in ("llama3", "yarn"):
            rc.original_max_position_embeddings = int(cfg.get("max_position_embeddings") or 2048)
        if rc.rope_type == "yarn" and rc.factor is None:
            rc.factor = float(cfg.get("max_position_embeddings") or 2048) / rc.original_max_position_embeddings
    if not all(math.isfinite(rc.rope_theta) and rc.rope_theta > 0 for rc in out.values()):
        raise ConfigError(f"{source}: rope_theta must be a positive number")
    return out
