"""The one decoder: Llama, Mistral, Gemma, Gemma 2 and Gemma 3 text, driven by ModelConfig.

Module names mirror transformers' checkpoint names (model.layers.N.self_attn.q_proj, ...), so a
checkpoint's state dict maps onto this model 1:1. The hot path is plain tensors through
`minift.ops`, shaped for torch.compile: no host syncs, no data-dependent Python control flow.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..errors import InputError
from ..io.info import LoadInfo
from .attention import Mask, attention, make_mask, packed_segments
from .cache import KVCache
from .config import SLIDING, ModelConfig
from .rope import RotaryEmbedding


@dataclass
class CausalLMOutput:
    """loss: mean (or normalised sum) cross-entropy over labels != -100, None without labels.
    logits: (batch, seq, vocab), None when the fused loss ran without materialising them."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.offset)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose forward is `ops.linear`: F.linear, except
    for decoding's few rows, where a GEMV kernel reads the weight at the HBM rate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)

    def decode_parts(self) -> tuple | None:
        """(weight, bias, low_rank) for the fused decoding kernels; None for a subclass (whose forward
        may differ). Any projection module offering this method can be fused: a wrapper over this
        Linear that adds `scaling * B (A x)` returns (A, B, scaling) as low_rank."""
        return (self.weight, self.bias, None) if type(self) is Linear else None


def _decode_parts(x: torch.Tensor, mods: list[nn.Module]) -> list[tuple] | None:
    """Each projection's (weight, bias, low_rank or None) when projections of one input can run as one
    decoding kernel: every module offers `decode_parts` (this module's Linear, or a wrapper
    over one; not 4-bit, not replaced by a later stage) and x is a single row that `ops.gemv`
    takes; None otherwise (then each module runs, hooks included)."""
    if not ops.takes_gemv(x, []):  # training or several rows: no lookups in every forward
        return None
    parts = []
    for m in mods:
        get = getattr(m, "decode_parts", None)
        part = get() if get is not None else None
        if part is None:
            return None
        parts.append(part)
    return parts if ops.takes_gemv(x, [p[0] for p in parts]) else None


def _low_rank(parts: list[tuple]) -> list | None:
    """The low-rank terms of fused projections as the GEMV ops' `low_rank` argument (None: none)."""
    specs = [p[2] for p in parts]
    return specs if any(spec is not None for spec in specs) else None


def _glu(hidden_act: str) -> str:
    """config.json's hidden_act -> the gated activation's name in minift.ops (SiLU; tanh or exact GELU)."""
    return {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(hidden_act, "gelu")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.layer_type = cfg.layer_types[layer_idx]
        h, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, hk * d, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, hk * d, bias=cfg.attention_bias)
        self.o_proj = Linear(h * d, cfg.hidden_size, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask,
                cache: KVCache | None = None) -> torch.Tensor:
        return self.o_proj(self.attend(x, cos, sin, mask, cache))

    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask,
               cache: KVCache | None = None, norm: RMSNorm | None = None) -> torch.Tensor:
        """The heads' output (batch, seq, heads * head_dim), before o_proj. `norm`: x is still to
        be normalised, by that module or, decoding, in the q/k/v kernel's prologue."""
        cfg = self.cfg
        b, s, _ = x.shape
        d = cfg.head_dim
        proj = [self.q_proj, self.k_proj, self.v_proj]
        parts = _decode_parts(x, proj)
        if parts is not None:  # decoding: q, k and v (and their low-rank terms) from one launch
            ws, bs = [p[0] for p in parts], [p[1] for p in parts]
            nkw = {} if norm is None else dict(norm_weight=norm.weight, eps=norm.eps, norm_offset=norm.offset)
            qkv = ops.gemv_cat(x, ws, None if bs[0] is None else bs, low_rank=_low_rank(parts), **nkw)
            q, k, v = qkv.split([w.shape[0] for w in ws], dim=-1)
        else:
            if norm is not None:
                x = norm(x)
            q, k, v = (m(x) for m in proj)
        q = q.view(b, s, -1, d).transpose(1, 2)
        k = k.view(b, s, -1, d).transpose(1, 2)
        v = v.view(b, s, -1, d).transpose(1, 2)
        if (cache is not None and cache.fused_attention and not cache.prefilling
                and ops.takes_decode_attention(q, k, cache.keys[self.layer_idx])):
            return self._decode_attention(q, k, v, cos, sin, mask, cache).transpose(1, 2).reshape(b, s, -1)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attention(q, k, v, mask, cfg.attn_scale, cfg.attn_logit_softcapping)
        return out.transpose(1, 2).reshape(b, s, -1)

    def _decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, mask: Mask, cache: KVCache) -> torch.Tensor:
        """A decode step's q/k norms, RoPE, cache write and attention in one launch: the unfused
        path's arithmetic up to float32 summation order (16-bit: the probabilities rounded for the
        tensor cores, as SDPA's flash kernels round them)."""
        cfg = self.cfg
        keys, values, slot = cache.decode_target(self.layer_idx)
        norms = {}
        if cfg.qk_norm:
            norms = dict(q_norm=self.q_norm.weight, k_norm=self.k_norm.weight, eps=self.q_norm.eps,
                         norm_offset=self.q_norm.offset)
        return ops.decode_attention(q, k, v, keys, values, cos, sin, mask, slot, cfg.attn_scale,
                                    cfg.attn_logit_softcapping, **norms)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = cfg.hidden_act
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

        # Long context (TextModel.mlp_chunk_tokens): with gradients on, the MLP runs over this many
        # tokens at a time, each chunk checkpointed, so its intermediate-sized activations (gate, up,
        # the product and their gradients: 5 x intermediate_size a token, ~60% of a Llama layer's)
        # exist for one chunk instead of the whole sequence. Costs one more MLP forward, unless the
        # layer is checkpointed: then the chunks' recomputes replace the layer's (`_chunked`).
        self.chunk_tokens: int | None = None
        # A compiled `_mlp_chunk` (TextModel.compile_mlp_chunks): the chunks run outside the compiled
        # layer's graph (a loop over a dynamic token count), so they are compiled on their own.
        self.chunk_fn: Callable | None = None

    def forward(self, x: torch.Tensor, post_norm: nn.Module | None = None) -> torch.Tensor:
        """down(act(gate(x)) * up(x)), then `post_norm` (a sandwich layer's post-feedforward norm,
        inside the MLP so that chunks take it too: see `_chunked`)."""
        parts = _decode_parts(x, [self.gate_proj, self.up_proj])
        if parts is not None:  # decoding: gate, up (their low-rank terms) and the activation in one launch
            y = self.down_proj(self.gated(x, parts))
            return y if post_norm is None else post_norm(y)
        if self.chunks(x):
            fn = functools.partial(self.chunk_fn or _mlp_chunk, self, post_norm=post_norm)
            return _chunked(fn, x, self.chunk_tokens, self.down_proj.out_features, draws_random(self))
        return _mlp_chunk(self, x, post_norm)

    def chunks(self, x: torch.Tensor) -> bool:
        """Whether this forward runs in token chunks (`chunk_tokens`, gradients on, x longer)."""
        return self.chunk_tokens is not None and torch.is_grad_enabled() and x.numel() > self.chunk_tokens * x.shape[-1]

    def gated(self, x: torch.Tensor, parts: list[tuple], norm: "RMSNorm | None" = None) -> torch.Tensor:
        """act(gate(x')) * up(x') from one decoding launch (`parts`: `_decode_parts` of gate and up;
        x' = norm(x), in the kernel's prologue, when `norm` is given)."""
        biases = None if parts[0][1] is None else [parts[0][1], parts[1][1]]
        nkw = {} if norm is None else dict(norm_weight=norm.weight, eps=norm.eps, norm_offset=norm.offset)
        return ops.gemv_glu(x, parts[0][0], parts[1][0], _glu(self.act), biases, low_rank=_low_rank(parts), **nkw)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x), self.up_proj(x)))

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        name = _glu(self.act)
        if name == "silu":
            return ops.swiglu(gate, up)
        return ops.geglu(gate, up, "tanh" if name == "gelu_tanh" else "none")


def draws_random(module: nn.Module) -> bool:
    """Whether module's training forward draws random numbers (a dropout with p > 0). Only then
    must a checkpoint save and restore the RNG state for its recompute; without, the step is the
    same and stays capturable in a CUDA graph on torches that cannot read that state in a capture.
    Called per checkpointed layer a forward: a plain walk of the children (`modules()` builds
    every submodule's name, ~4x slower)."""
    stack = [module]
    while stack:
        m = stack.pop()
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        stack.extend(c for c in m._modules.values() if c is not None)
    return False


def _mlp_chunk(mlp: MLP, t: torch.Tensor, post_norm: nn.Module | None = None) -> torch.Tensor:
    """The MLP's training forward over t (one chunk, when chunked), then a sandwich layer's
    post-feedforward norm when given."""
    y = mlp._project(t)
    return y if post_norm is None else post_norm(y)


_LAYER_RECOMPUTE = threading.local()  # .active: a checkpointed decoder layer is being recomputed


@contextlib.contextmanager
def _layer_recompute() -> Iterator[None]:
    before = getattr(_LAYER_RECOMPUTE, "active", False)
    _LAYER_RECOMPUTE.active = True
    try:
        yield
    finally:
        _LAYER_RECOMPUTE.active = before


def _layer_checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """A decoder layer's checkpoint contexts (`checkpoint(context_fn=)`): nothing for its forward, a
    flag while its recompute runs, which `_chunked` reads."""
    return contextlib.nullcontext(), _layer_recompute()


def _no_output(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


@torch.compiler.disable  # a loop over a dynamic token count: eager (the GEMMs dominate), not a graph a length
def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int,
             out_features: int, draws: bool) -> torch.Tensor:
    """fn over x's tokens `chunk` at a time, each chunk checkpointed (only its input, a view of x, is
    kept for the backward): the same values as fn(x) for a token-wise fn. `draws`: fn draws random
    numbers (dropout), so each chunk's checkpoint keeps the RNG state for its recompute (else none is
    read: CUDA graph captures cannot read it on every torch).

    Inside a checkpointed layer, that layer's recompute in the backward need not run the chunks:
    each chunk recomputes itself when its backward comes. The layer's checkpoint still wants back
    what the chunks' checkpoints saved into it (their inputs), so the recompute saves them again
    through checkpoints of a function that computes nothing, and the layer's checkpoint stops its
    recompute there (early stop: nothing later in the layer saves a tensor, which is why a sandwich
    layer's post-feedforward norm runs inside `fn`). What this returns then is never read; without
    early stop (`torch.utils.checkpoint.set_checkpoint_early_stop(False)`) it feeds only the skip
    connection's sum, which the recompute discards. Before this, the recompute ran all but the
    last chunk's forward: a layer's MLP forward a step more."""
    flat = x.reshape(-1, x.shape[-1])
    starts = range(0, flat.shape[0], chunk)
    if getattr(_LAYER_RECOMPUTE, "active", False):
        for i in starts:
            checkpoint(_no_output, flat[i:i + chunk], use_reentrant=False, preserve_rng_state=False)
        return x.new_empty(*x.shape[:-1], out_features)
    outs = [checkpoint(fn, flat[i:i + chunk], use_reentrant=False, preserve_rng_state=draws) for i in starts]
    return torch.cat(outs).view(*x.shape[:-1], -1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.sandwich = cfg.sandwich_norms
        self.layer_type = cfg.layer_types[layer_idx]
        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask,
                cache: KVCache | None = None) -> torch.Tensor:
        parts = self._fused_decoding(x) if cache is not None else None
        if parts is not None:
            return self._decode(x, cos, sin, mask, cache, parts)
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
            return x + self.mlp(self.pre_feedforward_layernorm(x), post_norm=self.post_feedforward_layernorm)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _fused_decoding(self, x: torch.Tensor) -> list[tuple] | None:
        """The seven projections' `_decode_parts` (q, k, v, o, gate, up, down) when this decode step
        can run as `_decode`: each projection this module's Linear or a wrapper offering its parts
        (not 4-bit, not replaced by a later stage), the norms plain RMSNorms, and one row that the
        GEMV kernels take; None otherwise."""
        a, m = self.self_attn, self.mlp
        norms = [mod for name, mod in self.named_children() if name.endswith("layernorm")]
        if type(m) is not MLP or not all(type(n) is RMSNorm for n in norms):
            return None
        return _decode_parts(x, [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj])

    def _decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask,
                cache: KVCache, parts: list[tuple]) -> torch.Tensor:
        """One decode step's layer in four GEMV launches plus attention: each pre-norm runs in the
        prologue of the projections after it, and (pre-norm layers) each skip connection in the
        epilogue of o_proj / down_proj; the same arithmetic as `forward` up to float32 summation
        order inside the norm. `parts`: `_fused_decoding`'s (q/k/v's are taken again by `attend`)."""
        a, m = self.self_attn, self.mlp
        heads = a.attend(x, cos, sin, mask, cache, norm=self.input_layernorm)
        pre_mlp = self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm
        if self.sandwich:
            x = x + self.post_attention_layernorm(a.o_proj(heads))
        else:
            w, b, low_rank = parts[3]
            x = ops.gemv(heads, w, b, residual=x, low_rank=low_rank)
        h = m.gated(x, parts[4:6], norm=pre_mlp)
        if self.sandwich:
            return x + self.post_feedforward_layernorm(m.down_proj(h))
        w, b, low_rank = parts[6]
        return ops.gemv(h, w, b, residual=x, low_rank=low_rank)


def layer_input(x: torch.Tensor, want_grad: bool) -> torch.Tensor:
    """x, or (training, `want_grad`, x without a gradient) a leaf copy of it that requires grad."""
    if want_grad and torch.is_grad_enabled() and not x.requires_grad:
        return x.detach().requires_grad_()
    return x


def _rounded(value: float) -> dict[torch.dtype, float]:
    """`value` rounded to each float dtype, as Python floats: multiplying by one equals multiplying
    by a 0-d tensor of that dtype (what transformers does), without a host-to-device copy per call."""
    dts = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    return {dt: torch.tensor(value, dtype=dt, device="cpu").item() for dt in dts}


class TextModel(nn.Module):
    """Embeddings, decoder layers and the final norm (transformers' `model.*`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self._embed_scale = _rounded(cfg.hidden_size**0.5)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        types = sorted(set(cfg.layer_types))
        self.rotary = nn.ModuleDict(
            {t: RotaryEmbedding(cfg.rope[t], cfg.head_dim, cfg.max_position_embeddings) for t in types}
        )
        # False, True, or "offload" (the trainer installs the offloading hooks around backward);
        # checkpoint_layers: only the first n layers are checkpointed (None: all), a memory plan's choice.
        self.gradient_checkpointing: bool | str = False
        self.checkpoint_layers: int | None = None
        # Training with compiled layers: the first layer's input made to require grad as every later
        # layer's does, so all layers share one compiled graph (else layer 0 compiles its own, forward
        # and backward: a third of the first step's compile time on CPU); the added work is layer 0's
        # input gradient through q/k/v, ~0.1% of a step.
        self.input_requires_grad = False

    @property
    def mlp_chunk_tokens(self) -> int | None:
        """Tokens each decoder layer's MLP takes at a time when gradients are on (MLP.chunk_tokens;
        None: all at once): the long-context setting of a memory plan or TrainConfig."""
        return self.layers[0].mlp.chunk_tokens if len(self.layers) else None

    @mlp_chunk_tokens.setter
    def mlp_chunk_tokens(self, tokens: int | None) -> None:
        for layer in self.layers:
            layer.mlp.chunk_tokens = tokens

    def compile_mlp_chunks(self) -> None:
        """torch.compile the chunked MLPs' chunk function, one compiled function for every layer
        (dynamic shapes: a short last chunk does not recompile). Compiled decoder layers need it:
        their chunk loop breaks the layer's graph and would otherwise run eagerly."""
        fn = torch.compile(_mlp_chunk, dynamic=True)
        for layer in self.layers:
            layer.mlp.chunk_fn = fn

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.cfg.embed_scale:  # Gemma: sqrt(hidden) rounded to the compute dtype, as transformers does
            x = x * self._embed_scale[x.dtype]
        return x

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        bidirectional_groups: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states (batch, seq, hidden).

        position_ids given without attention_mask are read as packed rows: attention never
        crosses a place where positions do not continue (a restart), as in padding-free training.
        With a `cache` (generation) the keys and values are stored in it; a decode step attends
        to the cache under the masks it built (see arch/cache.py)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        x = layer_input(x, self.input_requires_grad and self.training)
        b, s, _ = x.shape
        decoding = cache is not None and not cache.prefilling
        segments = None
        if position_ids is None:
            position_ids = torch.arange(s, device=x.device).unsqueeze(0).expand(b, s)
        elif attention_mask is None and not decoding:
            segments = packed_segments(position_ids)
        if position_ids.shape[0] != b:
            position_ids = position_ids.expand(b, s)
        cos_sin = {t: self.rotary[t](position_ids) for t in self.rotary}
        if decoding:
            for layer in self.layers:
                x = layer(x, *cos_sin[layer.layer_type], cache.mask(layer.layer_type), cache)
            return self.norm(x)
        # One mask per layer type per forward (a BlockMask on CUDA, see attention.make_mask).
        masks = {
            t: make_mask(
                b, s, x.device, dtype=x.dtype, attention_mask=attention_mask, segments=segments,
                sliding_window=self.cfg.sliding_window if t == SLIDING else None,
                bidirectional_groups=bidirectional_groups, softcap=self.cfg.attn_logit_softcapping,
            )
            for t in self.rotary
        }
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        upto = len(self.layers) if self.checkpoint_layers is None else self.checkpoint_layers
        for i, layer in enumerate(self.layers):
            t = layer.layer_type
            cos, sin = cos_sin[t]
            if ckpt and i < upto:
                x = checkpoint(layer, x, cos, sin, masks[t], use_reentrant=False,
                               preserve_rng_state=draws_random(layer), context_fn=_layer_checkpoint_contexts)
            else:
                x = layer(x, cos, sin, masks[t], cache)
        return self.norm(x)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        for r in self.rotary.values():
            r.reset_buffers(device)


def causal_lm_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    softcap: float | None,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Shifted next-token loss from hidden states without materialising the logits: position t
    predicts token t+1. Mean over labels != -100, or the sum divided by `normalizer` (the
    target-token count of a whole accumulated optimizer step)."""
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    h = hidden.reshape(-1, hidden.shape[-1])
    if normalizer is None:
        return ops.linear_cross_entropy(h, head_weight, shift.reshape(-1), softcap=softcap, reduction="mean")
    total = ops.linear_cross_entropy(h, head_weight, shift.reshape(-1), softcap=softcap, reduction="sum")
    return total / normalizer


def logits_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """The same shifted loss from logits already computed (soft-capping already applied)."""
    shift = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    if normalizer is None:
        return ops.cross_entropy(flat, shift, reduction="mean")
    return ops.cross_entropy(flat, shift, reduction="sum") / normalizer


class CausalLM(nn.Module):
    """A text decoder with its LM head (transformers' `*ForCausalLM`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.load_info = LoadInfo()  # filled by minift.load

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        self.model.reset_buffers(device)

    @property
    def language_model(self) -> TextModel:
        return self.model

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        return_logits: bool | None = None,
        loss_normalizer: torch.Tensor | float | None = None,
        pixel_values: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """return_logits: default True, except when training with labels, where the loss is
        fused with the LM head (`ops.linear_cross_entropy`) and no logits are materialised.
        pixel_values are refused: this is a text-only model (token_type_ids are ignored).
        cache: a KVCache while generating; logits_to_keep: only the last n positions' logits
        (0: all), so a long prompt's prefill does not materialise (batch, prompt, vocab)."""
        if pixel_values is not None:
            raise InputError(
                f"pixel_values given to a text-only {self.config.model_type} model; load a vision checkpoint "
                "(model_type 'gemma3') without text_only=True to use images"
            )
        hidden = self.model(input_ids, attention_mask, position_ids, cache=cache)
        return self.head(hidden, labels, return_logits=return_logits, loss_normalizer=loss_normalizer,
                         logits_to_keep=logits_to_keep)

    def head(self, hidden, labels=None, *, return_logits=None, loss_normalizer=None, logits_to_keep=0) -> CausalLMOutput:
        if return_logits is None:
            return_logits = labels is None or not self.training
        logits = loss = None
        if return_logits:
            logits = self.compute_logits(hidden[:, -logits_to_keep:] if logits_to_keep and labels is None else hidden)
            if labels is not None:
                loss = logits_loss(logits, labels, loss_normalizer)
        elif labels is not None:
            loss = causal_lm_loss(
                hidden, self.lm_head.weight, labels,
                softcap=self.config.final_logit_softcapping, normalizer=loss_normalizer,
            )
        return CausalLMOutput(loss=loss, logits=logits)
