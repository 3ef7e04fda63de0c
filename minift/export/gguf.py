"""`save_gguf`: a llama.cpp / Ollama GGUF of a minift model, with every adapter merged.

What the file holds is what llama.cpp's own `convert_hf_to_gguf.py` (+ `llama-quantize` for the
4/5/6-bit types) would write for the merged checkpoint:

* Tensors come from `merged_groups` (LoRA / DoRA merged in float32, a 4-bit base dequantised
  exactly first) one at a time, renamed to llama.cpp's names with gguf-py's `TensorNameMap` of the
  architecture (`token_embd`, `blk.N.attn_q` ...). Conversions as llama.cpp's converter does them:
  Q/K rows permuted for the `llama` architecture (Llama and Mistral, which llama.cpp runs as
  `llama`); Gemma's RMSNorm weights + 1 (HF multiplies by 1 + w; Gemma 3's q/k norms and the
  vision projector's soft-embedding norm included); no `output` tensor while the LM head is tied;
  Llama 3 RoPE scaling as the `rope_freqs` factors tensor.
* One conversion the converter does not make: llama.cpp's gemma2/gemma3 fix the attention scale
  to 1/sqrt(head_dim) (1/sqrt(hidden/heads) for their 27B shapes), while transformers uses
  query_pre_attn_scalar**-0.5. Every released checkpoint agrees; a config that does not gets the
  ratio folded into attn_q (Gemma 2) or attn_q_norm (Gemma 3), so llama.cpp computes what
  transformers does.
* Tensor types. Norms, biases and 1-D tensors are float32. `f32` / `f16` / `bf16` / `q8_0` are
  the converter's file types (q8_0 of a row that is not a multiple of 32 falls back to f16).
  `q4_0` `q4_1` `q5_0` `q5_1` `q4_k_s` `q4_k_m` `q5_k_s` `q5_k_m` `q6_k` follow llama-quantize's
  rules for a dense model: the output matrix (the token embedding when tied) is Q6_K (Q8_0 when
  its rows do not split into the type's blocks); for *_K_M, attn_v and ffn_down of the first and
  last eighth of the layers and of every third layer between are Q6_K; for q4_k_s the first four
  attn_v and the first eighth's ffn_down are Q5_K; a row that does not split into 256-blocks falls
  back as llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then f16). The 32-blocks types
  use gguf-py's quantisers (bit-exact with ggml's reference); gguf-py has no K-quant quantiser,
  so Q4_K / Q5_K / Q6_K are quantised here with ggml's reference algorithms (no importance
  matrix), in numpy: minutes per billion parameters.
* Metadata: architecture hyper-parameters, RoPE (base, linear / YaRN scaling, per-layer-type bases
  of Gemma 3), Gemma 2 soft-capping, sliding windows and, when the per-layer attention types are
  not the architecture's default period, the per-layer pattern; and the tokenizer: a byte-level
  BPE (`gpt2` with `tokenizer.ggml.pre` "gpt-2" or "llama-bpe", recognised from the
  pre-tokenizer) or a SentencePiece `tokenizer.model` (`llama`), special-token ids, whether the HF
  tokenizer adds BOS / EOS, and the chat template.
* Gemma 3 vision: the language model as a `gemma3` GGUF and the SigLIP tower + projector as
  llama.cpp's `mmproj` GGUF beside it (clip, projector type gemma3; F16 weights, F32 when f32
  is asked for; patch / position embeddings F32 and the projection F16, as the converter writes
  them), for llama.cpp's `--mmproj`. (Ollama does not load a separate Gemma 3 projector.)

Not covered: other quant types (q2_k, q3_k_*, iq*: no quantiser), importance matrices, a
byte-level BPE whose pre-tokenizer is not GPT-2's or Llama 3's, tokenizers without tokenizer.json
or a SentencePiece model, an untied LM head on gemma / gemma2 (llama.cpp ties them), llama.cpp's
llama architecture has no sliding window (Mistral's is dropped with a warning) and no dynamic-NTK
RoPE (plain RoPE, with a warning). These raise `ExportError` naming what is unsupported.

Files are written to a temporary name beside the target and renamed into place: an existing
file is only replaced (with overwrite=True) once the new one is complete. One tensor is merged,
converted and quantised at a time and its bytes spooled to a temporary file beside the output, so
peak memory beyond the model is about two float32 copies of the largest tensor (the embedding:
2.7 GB for Gemma 3 4B's 262k x 2560) plus its quantised bytes, and the disk holds about twice
the output while writing. Several quants in one call merge each tensor once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from .merged import merged_groups

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# quant types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Quant:
    name: str  # "q4_k_m"
    label: str  # "Q4_K_M", used in file names
    ftype: str  # gguf.LlamaFileType member
    base: str  # gguf.GGMLQuantizationType member of the bulk of the weights
    quantize_rules: bool  # llama-quantize's per-tensor rules (else the converter's single type)


_QUANTS: dict[str, _Quant] = {q.name: q for q in (
    _Quant("f32", "F32", "ALL_F32", "F32", False),
    _Quant("f16", "F16", "MOSTLY_F16", "F16", False),
    _Quant("bf16", "BF16", "MOSTLY_BF16", "BF16", False),
    _Quant("q8_0", "Q8_0", "MOSTLY_Q8_0", "Q8_0", False),
    _Quant("q4_0", "Q4_0", "MOSTLY_Q4_0", "Q4_0", True),
    _Quant("q4_1", "Q4_1", "MOSTLY_Q4_1", "Q4_1", True),
    _Quant("q5_0", "Q5_0", "MOSTLY_Q5_0", "Q5_0", True),
    _Quant("q5_1", "Q5_1", "MOSTLY_Q5_1", "Q5_1", True),
    _Quant("q4_k_s", "Q4_K_S", "MOSTLY_Q4_K_S", "Q4_K", True),
    _Quant("q4_k_m", "Q4_K_M", "MOSTLY_Q4_K_M", "Q4_K", True),
    _Quant("q5_k_s", "Q5_K_S", "MOSTLY_Q5_K_S", "Q5_K", True),
    _Quant("q5_k_m", "Q5_K_M", "MOSTLY_Q5_K_M", "Q5_K", True),
    _Quant("q6_k", "Q6_K", "MOSTLY_Q6_K", "Q6_K", True),
)}
# unsloth's names for the common choices
QUANT_ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m"}
SUPPORTED_QUANTS = tuple(_QUANTS) + tuple(QUANT_ALIASES)

# llama.cpp architecture per minift model_type (Mistral runs as llama in llama.cpp)
_ARCHS = {"llama": "llama", "mistral": "llama", "gemma": "gemma", "gemma2": "gemma2",
          "gemma3_text": "gemma3", "gemma3": "gemma3"}
# chat templates (minift.templates) to prefer for a family when several render alike
_FAMILY_TEMPLATES = {"gemma": ("gemma",), "gemma2": ("gemma2",), "gemma3_text": ("gemma-3",), "gemma3": ("gemma-3",),
                     "mistral": ("mistral",), "llama": ("llama-3.1", "llama-3.2", "llama-3")}
# the period of sliding / full layers llama.cpp assumes without a per-layer pattern key
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}


def _resolve_quants(quant: str | Sequence[str]) -> list[_Quant]:
    names = [quant] if isinstance(quant, str) else list(quant)
    if not names:
        raise ExportError(f"save_gguf: quant must name at least one type; supported: {', '.join(SUPPORTED_QUANTS)}")
    out: list[_Quant] = []
    for n in names:
        key = str(n).lower().strip()
        key = QUANT_ALIASES.get(key, key)
        if key not in _QUANTS:
            raise ExportError(f"save_gguf: quant {n!r} is not supported; supported: {', '.join(SUPPORTED_QUANTS)} "
                              f"(aliases: {', '.join(f'{k}={v}' for k, v in QUANT_ALIASES.items())})")
        if _QUANTS[key] not in out:
            out.append(_QUANTS[key])
    return out


def _use_more_bits(i: int, n: int) -> bool:
    """llama-quantize's choice of the layers that get more bits in the *_M mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(t: Any, cols: int) -> Any:
    """llama-quantize's type for a row length that does not split into the type's blocks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    block = gguf.GGML_QUANT_SIZES[t][0]
    if cols % block == 0:
        return t
    t = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}.get(t, t)
    if cols % gguf.GGML_QUANT_SIZES[t][0]:
        t = Q.F16
    return t


def tensor_type(q: _Quant, name: str, shape: Sequence[int], *, n_layer: int, tied: bool, n_head: int = 0,
                n_head_kv: int = 0) -> Any:
    """The ggml type of tensor `name` (llama.cpp's name, numpy `shape`) in a `q` file."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or name.startswith("rope_freqs"):
        return Q.F32
    cols = int(shape[-1])
    base = Q[q.base]
    if not q.quantize_rules:  # the converter: one type, f16 where a block type does not fit
        if base in (Q.F32, Q.F16, Q.BF16):
            return base
        return base if cols % gguf.GGML_QUANT_SIZES[base][0] == 0 else Q.F16
    m = re.match(r"blk\.(\d+)\.", name)
    layer = int(m.group(1)) if m else -1
    t = base
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if cols % gguf.GGML_QUANT_SIZES[base][0]:
            t = Q.Q8_0
        elif base != Q.Q8_0:
            t = Q.Q6_K
    elif name.endswith("attn_v.weight"):
        if q.name in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layer):
            t = Q.Q6_K
        elif q.name == "q4_k_s" and layer < 4:
            t = Q.Q5_K
        if n_layer == 80 and n_head_kv and n_head != n_head_kv and t in (Q.Q3_K, Q.Q4_K):  # llama.cpp's 70B rule
            t = Q.Q5_K
    elif name.endswith("ffn_down.weight"):
        if q.name in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layer):
            t = Q.Q6_K
        elif q.name == "q4_k_s" and layer < n_layer // 8:
            t = Q.Q5_K
    return _fallback(t, cols)


# --------------------------------------------------------------------------------------------
# K-quants (ggml's reference quantisers, vectorised; no importance matrix)
# --------------------------------------------------------------------------------------------

_QK_K = 256
_EPS = np.float32(1e-15)


def _ssum(a: np.ndarray) -> np.ndarray:
    """Row sums in float32, added left to right as ggml's loops do (ties then break alike)."""
    acc = a[:, 0].astype(np.float32, copy=True)
    for j in range(1, a.shape[1]):
        acc += a[:, j]
    return acc


def _nearest(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even, in float32."""
    return np.rint(x).astype(np.int32)


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants over the rows of x (one sub-block a row): the scale, the min
    (returned negated, >= 0) and the levels L in [0, nmax] minimising the weighted error."""
    f32 = np.float32
    mn = np.minimum(x.min(axis=1), f32(0))
    mx = x.max(axis=1)
    sum_w = _ssum(w)
    sum_x = _ssum(w * x)
    flat = mx == mn
    rng = np.where(flat, f32(1), mx - mn).astype(f32)
    iscale = (f32(nmax) / rng).astype(f32)
    scale = (f32(1) / iscale).astype(f32)
    L = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    diff = scale[:, None] * L.astype(f32) + mn[:, None] - x
    best = _ssum(w * diff * diff)
    cur_min = mn.copy()
    for step in range(nstep + 1):
        rng = np.where(flat, f32(1), mx - cur_min).astype(f32)
        isc = ((f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / rng).astype(f32)
        lv = np.clip(_nearest(isc[:, None] * (x - cur_min[:, None])), 0, nmax)
        lf = lv.astype(f32)
        sum_l = _ssum(w * lf)
        sum_l2 = _ssum(w * lf * lf)
        sum_xl = _ssum(w * lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(pos, sum_xl / np.where(sum_l2 == 0, f32(1), sum_l2), this_scale).astype(f32)
        this_min = np.where(pos, f32(0), this_min).astype(f32)
        diff = this_scale[:, None] * lf + this_min[:, None] - x
        err = _ssum(w * diff * diff)
        better = ok & (err < best) & ~flat
        L = np.where(better[:, None], lv, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        cur_min = np.where(better, this_min, cur_min)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, f32(0), scale).astype(f32)
    return scale, (-cur_min).astype(f32), L


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 bytes holding eight 6-bit scales and mins of a Q4_K / Q5_K super-block."""
    sc = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    sc[:, 0:4] = ls[:, 0:4]
    sc[:, 4:8] = lm[:, 0:4]
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    sc[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    sc[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return sc


def _unpack_k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ls = np.empty((sc.shape[0], 8), dtype=np.uint8)
    lm = np.empty_like(ls)
    ls[:, :4] = sc[:, 0:4] & 63
    lm[:, :4] = sc[:, 4:8] & 63
    ls[:, 4:] = (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)
    lm[:, 4:] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return ls, lm


def _quant_q45k(x: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K (bits=4) or Q5_K (bits=5) super-blocks of the rows of x (n, 256)."""
    f32 = np.float32
    nb = x.shape[0]
    nmax = (1 << bits) - 1
    sub = x.reshape(nb * 8, 32)
    av = np.sqrt(_ssum(sub * sub) / f32(32)).astype(f32)
    w = (av[:, None] + np.abs(sub)).astype(f32)
    if bits == 4:
        scales, mins, L = _qkx2(sub, w, nmax, -1.0, 0.1, 20)
    else:
        scales, mins, L = _qkx2(sub, w, nmax, -0.5, 0.1, 15)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0)).astype(f32)
        inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0)).astype(f32)
    ls = np.minimum(63, _nearest(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, _nearest(inv_min[:, None] * mins)).astype(np.uint8)
    d = _fp16(max_scale / f32(63))
    dmin = _fp16(max_min / f32(63))
    dj = d.astype(f32)[:, None] * ls.astype(f32)
    mj = dmin.astype(f32)[:, None] * lm.astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        re_l = _nearest((x.reshape(nb, 8, 32) + mj[:, :, None]) / np.where(dj == 0, f32(1), dj)[:, :, None])
    re_l = np.clip(re_l, 0, nmax)
    L = np.where((dj != 0)[:, :, None], re_l, L).astype(np.uint8).reshape(nb, 4, 2, 32)
    lo = L & 0xF
    qs = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(nb, 128)
    parts = [d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), _pack_k_scales(ls, lm)]
    if bits == 5:
        hi = (L >> 4) & 1  # (nb, 4 pairs, 2, 32): bit 2*pair + half of qh[j]
        shifts = (np.arange(4)[:, None] * 2 + np.arange(2)[None, :]).astype(np.uint8)  # (4, 2)
        qh = (hi << shifts[None, :, :, None]).sum(axis=(1, 2)).astype(np.uint8)
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=1)


def _qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants with rmse_type 1 over the rows of x: scale and levels L + nmax."""
    f32 = np.float32
    idx = np.abs(x).argmax(axis=1)
    mx = x[np.arange(x.shape[0]), idx]
    amax = np.abs(mx)
    zero = amax < _EPS
    mxs = np.where(zero, f32(1), mx).astype(f32)
    w = x * x

    def levels(isc):
        return np.clip(_nearest(isc[:, None] * x), -nmax, nmax - 1)

    isc = (f32(-nmax) / mxs).astype(f32)
    lv = levels(isc)
    lf = lv.astype(f32)
    sumlx = _ssum(w * x * lf)
    suml2 = _ssum(w * lf * lf)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 == 0, f32(1), suml2), f32(0)).astype(f32)
    best = scale * sumlx
    L = lv
    for s in range(-9, 10):
        if s == 0:
            continue
        isc = (-(f32(nmax) + f32(0.1) * f32(s)) / mxs).astype(f32)
        lv = levels(isc)
        lf = lv.astype(f32)
        sumlx = _ssum(w * x * lf)
        suml2 = _ssum(w * lf * lf)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better[:, None], lv, L)
        new_scale = sumlx / np.where(suml2 == 0, f32(1), suml2)
        scale = np.where(better, new_scale, scale).astype(f32)
        best = np.where(better, scale * sumlx, best).astype(f32)
    scale = np.where(zero, f32(0), scale).astype(f32)
    L = np.where(zero[:, None], 0, L)
    return scale, (L + nmax).astype(np.int32)


def _quant_q6k(x: np.ndarray) -> np.ndarray:
    f32 = np.float32
    nb = x.shape[0]
    scales, L = _qx(x.reshape(nb * 16, 16), 32)
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, 16, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), pick]
    zero = np.abs(max_scale) < _EPS
    ms = np.where(zero, f32(1), max_scale).astype(f32)
    iscale = (f32(-128) / ms).astype(f32)
    d = _fp16(f32(1) / iscale)
    sc = np.minimum(127, _nearest(iscale[:, None] * scales)).astype(np.int8)
    dj = d.astype(f32)[:, None] * sc.astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        re_l = _nearest(x.reshape(nb, 16, 16) / np.where(dj == 0, f32(1), dj)[:, :, None])
    re_l = np.clip(re_l, -32, 31) + 32
    L = np.where((dj != 0)[:, :, None], re_l, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # 2 halves of 128
    lo = L & 0xF
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)  # (nb,2,64)
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (nb, 2, 32)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)],
                         axis=1)
    out[zero] = 0
    return out


def _quantize_k(data: np.ndarray, kind: str) -> np.ndarray:
    """Q4_K / Q5_K / Q6_K bytes of a float32 array whose rows are multiples of 256, a chunk of
    rows at a time (the vectorised search holds ~20 float32 copies of a chunk)."""
    rows = data.reshape(-1, data.shape[-1])
    per_row = rows.shape[1] // _QK_K
    chunk = max(1, (1 << 20) // rows.shape[1])
    fn = {"Q4_K": lambda b: _quant_q45k(b, 4), "Q5_K": lambda b: _quant_q45k(b, 5), "Q6_K": _quant_q6k}[kind]
    out = [fn(np.ascontiguousarray(rows[i:i + chunk], dtype=np.float32).reshape(-1, _QK_K))
           for i in range(0, rows.shape[0], chunk)]
    blocks = np.concatenate(out, axis=0)
    return blocks.reshape(*data.shape[:-1], per_row * blocks.shape[1])


def quantize(data: np.ndarray, qtype: Any) -> np.ndarray:
    """`data` (float32) as `qtype`: gguf-py's quantisers, and the K-quants above."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return _quantize_k(data, qtype.name)
    return gguf.quants.quantize(data, qtype)


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

# tokenizer.json's Split pattern of Llama 3's byte-level BPE (llama.cpp's "llama-bpe")
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    """What a GGUF says about the tokenizer (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str | bytes]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None


def _looks_special(text: str) -> bool:
    """The converter's test for added tokens that ought to be control tokens."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _tokenizer_json(tok: Any) -> dict[str, Any] | None:
    backend = getattr(tok, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def _bpe_pre(tj: dict[str, Any], where: str) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, from its structure."""
    pre = tj.get("pre_tokenizer") or {}
    norm = tj.get("normalizer")
    model = tj.get("model") or {}
    if norm not in (None, {}) or model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"{where}: not a byte-level BPE tokenizer (normalizer {norm and norm.get('type')!r}, model "
                          f"{model.get('type')!r}, byte_fallback {model.get('byte_fallback')!r}) and no SentencePiece "
                          "tokenizer.model was found; llama.cpp's tokenizers cannot be matched to it")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        if model.get("ignore_merges"):
            raise ExportError(f"{where}: GPT-2 pre-tokenizer with ignore_merges=True has no llama.cpp equivalent")
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and parts[0].get("type") == "Split"
                and (parts[0].get("pattern") or {}).get("Regex") == _LLAMA3_PATTERN
                and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")
                and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)
                and not parts[1].get("add_prefix_space")):
            return "llama-bpe"
    raise ExportError(f"{where}: pre-tokenizer {json.dumps(pre)[:300]} is not one save_gguf can match to llama.cpp's; "
                      "recognised: ByteLevel(use_regex=True, add_prefix_space=False) -> 'gpt-2', Llama 3's "
                      "Split + ByteLevel(use_regex=False) -> 'llama-bpe', or a SentencePiece tokenizer.model")


def _merges(tj: dict[str, Any]) -> list[str]:
    merges = (tj.get("model") or {}).get("merges") or []
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        else:  # [a, b] pairs (tokenizers >= 0.20); a space inside a part is written as U+0120 + 256
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m))
    return out


def _spm_file(tok: Any, source: Path | None, given: bool) -> Path | None:
    vf = getattr(tok, "vocab_file", None)
    if vf and str(vf).endswith(".model") and Path(vf).is_file():
        return Path(vf)
    if not given and source is not None and (Path(source) / "tokenizer.model").is_file():
        return Path(source) / "tokenizer.model"
    return None


def _spm_vocab(path: Path, tok: Any, n_vocab: int) -> tuple[list[bytes], list[float], list[int], bool] | None:
    """Tokens, scores and types from a SentencePiece model, as the converter reads them, and
    whether it puts a space before the text (add_dummy_prefix: Llama 2 / Mistral yes, Gemma no);
    None when the model's pieces are not the HF tokenizer's ids (then the byte-level route is tried)."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:
        raise ExportError(f"{path}: reading a SentencePiece tokenizer.model needs the `sentencepiece` package "
                          "(pip install sentencepiece)") from e
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    n = min(sp.vocab_size(), n_vocab)
    vocab = tok.get_vocab()
    probe = [i for i in range(0, n, max(1, n // 64))]
    if any(vocab.get(sp.IdToPiece(i)) not in (i, None) for i in probe):
        return None
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [_UNUSED] * n_vocab
    for i in range(n):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = float(sp.GetScore(i))
        types[i] = (_UNKNOWN if sp.IsUnknown(i) else _CONTROL if sp.IsControl(i) else _UNUSED if sp.IsUnused(i)
                    else _BYTE if sp.IsByte(i) else _NORMAL)
    for i, at in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if i >= n_vocab:
            continue
        text = at.content
        if at.special or _looks_special(text):
            types[i] = _CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = _USER_DEFINED
        tokens[i] = text.encode("utf-8")
        scores[i] = -1000.0
    first = sp.encode("a")
    prefix = bool(first) and sp.IdToPiece(first[0]).startswith("\u2581")
    return tokens, scores, types, prefix


def _bpe_vocab(tok: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and types of a byte-level BPE, as the converter's get_vocab_base builds them."""
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = getattr(tok, "added_tokens_decoder", None) or {}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        text = reverse[i]
        if i in added:
            at = added[i]
            if not at.normalized:
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            if at.special or _looks_special(text):
                types.append(_CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(_USER_DEFINED)
        else:
            types.append(_NORMAL)
        tokens.append(text)
    return tokens, types


def _adds(tok: Any, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether the HF tokenizer puts BOS / EOS around a plain encode, by asking it."""
    with_sp = tok("a b", add_special_tokens=True)["input_ids"]
    without = tok("a b", add_special_tokens=False)["input_ids"]
    add_bos = bos is not None and len(with_sp) > len(without) and with_sp[0] == bos
    add_eos = eos is not None and len(with_sp) > len(without) and with_sp[-1] == eos
    return bool(add_bos), bool(add_eos)


def build_vocab(tok: Any, n_vocab: int, arch: str, cfg: Any, *, source: Path | None = None, given: bool = False) -> Vocab:
    """The GGUF vocabulary of an HF tokenizer (or processor) for an embedding of `n_vocab` rows."""
    tok = getattr(tok, "tokenizer", tok)
    where = f"tokenizer ({type(tok).__name__})"
    if len(tok) > n_vocab:
        raise ExportError(f"{where}: {len(tok)} tokens but the model's embedding has {n_vocab} rows")
    spm = _spm_file(tok, source, given)
    vocab = None
    if spm is not None:
        got = _spm_vocab(spm, tok, n_vocab)
        if got is not None:
            tokens, scores, types, prefix = got
            vocab = Vocab("llama", "default", list(tokens), types, scores=scores, add_space_prefix=prefix)
    if vocab is None:
        tj = _tokenizer_json(tok)
        if tj is None:
            raise ExportError(f"{where}: neither a fast tokenizer (tokenizer.json) nor a SentencePiece tokenizer.model")
        pre = _bpe_pre(tj, where)
        tokens, types = _bpe_vocab(tok, n_vocab)
        vocab = Vocab("gpt2", pre, list(tokens), types, merges=_merges(tj))
    for typ in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{typ}_token_id", None)
        if tid is None and typ != "unk":
            tid = getattr(cfg, f"{typ}_token_id", None)
            if isinstance(tid, (list, tuple)):
                tid = tid[0] if tid else None
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            vocab.special[typ] = tid
    vocab.add_bos, vocab.add_eos = _adds(tok, vocab.special.get("bos"), vocab.special.get("eos"))
    tmpl = getattr(tok, "chat_template", None)
    if isinstance(tmpl, dict):
        tmpl = [{"name": k, "template": v} for k, v in tmpl.items()]
    vocab.chat_template = tmpl or None
    return vocab


# --------------------------------------------------------------------------------------------
# the model: architecture, metadata, tensors
# --------------------------------------------------------------------------------------------

_FULL, _SLIDING = "full_attention", "sliding_attention"
_HUGE_CAP = 1e6  # a soft-cap this large is the identity to float32 precision


@dataclass
class _Model:
    """What the export needs to know about the model being written."""

    arch: str  # llama.cpp's architecture of the language model
    text: Any  # minift ModelConfig of the language model
    vision: Any  # minift VisionConfig (Gemma 3 vision) or None
    top: Any  # model.config
    final_softcap: float | None
    attn_q_factor: float  # folded into attn_q / attn_q_norm (1.0: none)


def _describe(model: nn.Module) -> _Model:
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in _ARCHS:
        raise ExportError(f"save_gguf: model_type {mt!r} is not supported; supported: {', '.join(_ARCHS)}")
    text = getattr(cfg, "text", None) if mt == "gemma3" else cfg
    vision = getattr(cfg, "vision", None) if mt == "gemma3" else None
    arch = _ARCHS[mt]
    final = cfg.final_logit_softcapping if mt == "gemma3" else text.final_logit_softcapping
    if arch == "gemma3" and text.attn_logit_softcapping:
        raise ExportError("save_gguf: llama.cpp's gemma3 has no attention-logit soft-capping, but this config sets "
                          f"attn_logit_softcapping={text.attn_logit_softcapping}")
    if text.hidden_act not in ("silu",) and arch == "llama":
        raise ExportError(f"save_gguf: llama.cpp's llama architecture uses SiLU; hidden_act is {text.hidden_act!r}")
    if arch.startswith("gemma") and (text.attention_bias or text.mlp_bias):
        raise ExportError(f"save_gguf: llama.cpp's {arch} has no projection biases (attention_bias / mlp_bias set)")
    factor = 1.0
    if arch in ("gemma2", "gemma3"):  # llama.cpp's fixed attention scale vs transformers' query_pre_attn_scalar
        big = text.num_hidden_layers == (46 if arch == "gemma2" else 62)
        ll = 1.0 / math.sqrt(text.hidden_size / text.num_attention_heads if big else text.head_dim)
        factor = text.attn_scale / ll
        if abs(factor - 1.0) < 1e-6:
            factor = 1.0
        else:
            logger.info("save_gguf: folding query_pre_attn_scalar into the queries (x%.6g): llama.cpp's %s uses a "
                        "fixed attention scale", factor, arch)
    full = text.rope.get(_FULL)
    if full is not None and full.rope_type == "dynamic":
        warnings.warn("save_gguf: llama.cpp has no dynamic-NTK RoPE for this architecture; the GGUF uses plain RoPE, "
                      f"which matches within the original {text.max_position_embeddings} positions", stacklevel=4)
    if full is not None and full.rope_type == "llama3" and arch != "llama":
        raise ExportError(f"save_gguf: llama3 RoPE scaling on a {arch} model has no llama.cpp equivalent")
    slid = text.rope.get(_SLIDING)
    if arch == "gemma3" and slid is not None and slid.rope_type not in ("default",):
        raise ExportError("save_gguf: llama.cpp's gemma3 applies RoPE scaling to full-attention layers only; "
                          f"the sliding layers' rope_type is {slid.rope_type!r}")
    if arch == "llama" and _SLIDING in text.layer_types:
        warnings.warn(f"save_gguf: llama.cpp's llama architecture has no sliding-window attention; this {mt} model's "
                      f"window of {text.sliding_window} is dropped (outputs agree up to that many tokens)", stacklevel=4)
    return _Model(arch, text, vision, cfg, final, factor)


def _default_swa(arch: str, n: int) -> list[bool]:
    p = _SWA_PERIOD[arch]
    return [(i % p) < (p - 1) for i in range(n)]


def _text_metadata(w: Any, m: _Model, q: _Quant, name: str, n_vocab: int, vocab: Vocab) -> None:
    import gguf

    t = m.text
    arch = m.arch
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    if arch == "llama":
        w.add_vocab_size(n_vocab)
    w.add_context_length(int(t.max_position_embeddings))
    w.add_embedding_length(int(t.hidden_size))
    w.add_block_count(int(t.num_hidden_layers))
    w.add_feed_forward_length(int(t.intermediate_size))
    w.add_head_count(int(t.num_attention_heads))
    w.add_head_count_kv(int(t.num_key_value_heads))
    w.add_key_length(int(t.head_dim))
    w.add_value_length(int(t.head_dim))
    w.add_layer_norm_rms_eps(float(t.rms_norm_eps))
    full = t.rope.get(_FULL)
    if arch == "llama":
        w.add_rope_dimension_count(int(t.head_dim))
    if full is not None:
        w.add_rope_freq_base(float(full.rope_theta))
        if full.rope_type == "linear" and full.factor:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(full.factor))
        elif full.rope_type == "yarn" and full.factor:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(full.factor))
            w.add_rope_scaling_orig_ctx_len(int(full.original_max_position_embeddings))
            if full.attention_factor is not None:
                w.add_rope_scaling_yarn_attn_factor(float(full.attention_factor))
            if full.beta_fast is not None:
                w.add_rope_scaling_yarn_beta_fast(float(full.beta_fast))
            if full.beta_slow is not None:
                w.add_rope_scaling_yarn_beta_slow(float(full.beta_slow))
    swa = [lt == _SLIDING for lt in t.layer_types]
    if arch == "gemma2":
        w.add_attn_logit_softcapping(float(t.attn_logit_softcapping or _HUGE_CAP))
        w.add_final_logit_softcapping(float(m.final_softcap or _HUGE_CAP))
        if t.sliding_window:
            w.add_sliding_window(int(t.sliding_window))
        if swa != _default_swa(arch, len(swa)):
            w.add_sliding_window_pattern(swa)
    if arch == "gemma3":
        slid = t.rope.get(_SLIDING)
        if slid is not None:
            w.add_rope_freq_base_swa(float(slid.rope_theta))
        if m.final_softcap:
            w.add_final_logit_softcapping(float(m.final_softcap))
        if any(swa) and t.sliding_window:
            w.add_sliding_window(int(t.sliding_window))
            if swa != _default_swa(arch, len(swa)):
                w.add_sliding_window_pattern(swa)
    w.add_file_type(int(gguf.LlamaFileType[q.ftype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab_metadata(w, vocab)


def _vocab_metadata(w: Any, v: Vocab) -> None:
    import gguf

    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.token_types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.model == "gpt2":  # llama.cpp needs the key even when there are no merges
        w.add_key_value(gguf.Keys.Tokenizer.MERGES, list(v.merges), gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType.STRING)
    for typ, tid in v.special.items():
        getattr(w, f"add_{typ}_token_id")(int(tid))
    if v.add_bos is not None:
        w.add_add_bos_token(bool(v.add_bos))
    if v.add_eos is not None:
        w.add_add_eos_token(bool(v.add_eos))
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(bool(v.add_space_prefix))
    if v.chat_template:
        w.add_chat_template(v.chat_template)


def _image_stats(tokenizer: Any, source: Path | None) -> tuple[list[float], list[float]]:
    ip = getattr(tokenizer, "image_processor", None)
    if ip is not None and getattr(ip, "image_mean", None) is not None:
        return list(map(float, ip.image_mean)), list(map(float, ip.image_std))
    for fname in ("preprocessor_config.json", "processor_config.json"):
        p = Path(source) / fname if source is not None else None
        if p is not None and p.is_file():
            d = json.loads(p.read_text())
            d = {**d, **(d.get("image_processor") or {})}
            if d.get("image_mean") is not None:
                return list(map(float, d["image_mean"])), list(map(float, d["image_std"]))
    return [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # SigLIP's


def _mmproj_metadata(w: Any, m: _Model, ftype: str, name: str, mean: list[float], std: list[float]) -> None:
    import gguf

    v = m.vision
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_file_type(int(gguf.LlamaFileType[ftype]))
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(int(m.text.hidden_size))
    w.add_vision_image_size(int(v.image_size))
    w.add_vision_patch_size(int(v.patch_size))
    w.add_vision_embedding_length(int(v.hidden_size))
    w.add_vision_feed_forward_length(int(v.intermediate_size))
    w.add_vision_block_count(int(v.num_hidden_layers))
    w.add_vision_head_count(int(v.num_attention_heads))
    w.add_vision_image_mean(mean)
    w.add_vision_image_std(std)
    w.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    w.add_vision_attention_layernorm_eps(float(v.layer_norm_eps))
    w.add_vision_use_gelu(True)
    per_side = int(round(math.sqrt(int(m.top.mm_tokens_per_image))))
    scale = (int(v.image_size) // int(v.patch_size)) // per_side
    if scale > 0 and scale != 4:  # llama.cpp's default pooling of Gemma 3
        w.add_vision_projector_scale_factor(scale)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order for its (interleaved) RoPE: each head's two halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(t: Any) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp divides its RoPE frequencies by for llama3 scaling."""
    r = t.rope[_FULL]
    dim = int(t.head_dim)
    freqs = 1.0 / (r.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old = float(r.original_max_position_embeddings or 8192)
    lo_wl, hi_wl = old / r.low_freq_factor, old / r.high_freq_factor
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(float(r.factor))
        else:
            smooth = (old / wl - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
            out.append(1.0 / ((1 - smooth) / r.factor + smooth))
    return np.asarray(out, dtype=np.float32)


class _Mapper:
    """HF (transformers 5) tensor names -> (file, llama.cpp name, converted float32 array)."""

    def __init__(self, m: _Model):
        import gguf

        self.m = m
        arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2,
                     "gemma3": gguf.MODEL_ARCH.GEMMA3}[m.arch]
        self.text_map = gguf.get_tensor_name_map(arch_enum, int(m.text.num_hidden_layers))
        self.vision_map = (gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, int(m.vision.num_hidden_layers))
                           if m.vision is not None else None)

    def __call__(self, hf: str, t: torch.Tensor) -> tuple[str, str, torch.Tensor] | None:
        if hf.endswith(("rotary_emb.inv_freq", ".attention.masked_bias")):
            return None
        if hf.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            return self._vision(hf, t)
        name = hf
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        if name == "lm_head.weight" and self.m.arch in ("gemma", "gemma2"):
            raise ExportError(f"save_gguf: llama.cpp's {self.m.arch} always uses token_embd as the output matrix, but "
                              "this model's lm_head is its own (untied) tensor; it cannot be represented")
        new = self.text_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"save_gguf: tensor {hf!r} has no llama.cpp {self.m.arch} name")
        t = t.to(torch.float32)
        text = self.m.text
        if self.m.arch == "llama":
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                t = _permute(t, int(text.num_attention_heads))
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                t = _permute(t, int(text.num_key_value_heads))
        else:
            if name.endswith("norm.weight"):
                t = t + 1.0
            f = self.m.attn_q_factor
            if f != 1.0 and ((self.m.arch == "gemma2" and name.endswith(("q_proj.weight", "q_proj.bias")))
                             or (self.m.arch == "gemma3" and name.endswith("q_norm.weight"))):
                t = t * f
        return "text", new, t

    def _vision(self, hf: str, t: torch.Tensor) -> tuple[str, str, torch.Tensor]:
        if hf.startswith("model.vision_tower."):
            rest = hf[len("model.vision_tower."):]
            if rest.startswith("vision_model."):
                rest = rest[len("vision_model."):]
            name = "vision_tower.vision_model." + rest
        else:
            name = "multi_modal_projector." + hf[len("model.multi_modal_projector."):].replace("_weight", ".weight")
        new = self.vision_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"save_gguf: tensor {hf!r} has no llama.cpp mmproj name")
        t = t.to(torch.float32)
        if "soft_emb_norm" in name:
            t = t + 1.0
        return "mmproj", new, t


def _mmproj_type(hf: str, new: str, shape: Sequence[int], ftype: str) -> Any:
    import gguf

    Q = gguf.GGMLQuantizationType
    if "input_projection" in new:
        return Q.F16
    if ".embeddings." in hf or new.startswith(("v.patch_embd", "v.position_embd")):
        return Q.F32
    if len(shape) <= 1 or new.endswith("_norm.weight") or not new.endswith(".weight"):
        return Q.F32
    return Q.F32 if ftype == "ALL_F32" else Q.F16


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def _writer(arch: str) -> Any:
    import gguf

    class _Writer(gguf.GGUFWriter):
        """gguf-py's writer, also writing empty typed arrays (a BPE with no merges)."""

        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return bytes(head + self._pack("I", sub_type) + self._pack("Q", 0))
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return _Writer(path=None, arch=arch, use_temp_file=True)


@dataclass
class _Out:
    """One GGUF being written: its writer, spooled tensor data and temporary name."""

    path: Path
    writer: Any
    quant: _Quant | None = None
    tmp: Path | None = None
    data: Any = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.data = tempfile.TemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}.data-")
        self.writer.temp_file = self.data

    def add(self, name: str, arr: np.ndarray, qtype: Any) -> None:
        import gguf

        Q = gguf.GGMLQuantizationType
        if qtype == Q.F32:
            data = np.ascontiguousarray(arr, dtype=np.float32)
        elif qtype == Q.F16:
            data = np.ascontiguousarray(arr, dtype=np.float16)
        else:
            data = quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)
        self.writer.add_tensor(name, data, raw_dtype=qtype)

    def finish(self) -> None:
        w = self.writer
        w.write_header_to_file(path=self.tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        self.data = None

    def discard(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - cleaning up after another error
            pass
        if self.data is not None:
            self.data.close()
        if self.tmp is not None and self.tmp.exists():
            self.tmp.unlink()


def _name_of(model: nn.Module) -> str:
    info = getattr(model, "load_info", None)
    n = getattr(info, "name_or_path", None) or getattr(info, "source_path", None) or "model"
    return Path(str(n).rstrip("/")).name or "model"


def _targets(path: str | os.PathLike, quants: list[_Quant], name: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir() or str(path).endswith(os.sep):
        return [p / f"{name}.{q.label}.gguf" for q in quants]
    if len(quants) == 1:
        return [p]
    stem = p.name[:-5] if p.name.lower().endswith(".gguf") else p.name
    return [p.with_name(f"{stem}.{q.label}.gguf") for q in quants]


def _mmproj_path(first: Path, quants: list[_Quant], ftype_label: str) -> Path:
    stem = first.name[:-5] if first.name.lower().endswith(".gguf") else first.name
    for q in quants:
        if stem.endswith("." + q.label):
            stem = stem[: -len(q.label) - 1]
            break
    return first.with_name(f"mmproj-{stem}.{ftype_label}.gguf")


def _load_tokenizer(model: nn.Module, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    src = getattr(getattr(model, "load_info", None), "source_path", None)
    if src is None:
        raise ExportError("save_gguf: no tokenizer given and model.load_info.source_path is unknown; pass tokenizer=")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src))
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the caller
        raise ExportError(f"{src}: could not load the tokenizer beside the checkpoint ({e}); pass tokenizer=") from e


def save_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    quant: str | Sequence[str] = "q8_0",
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    modelfile: bool | str = False,
) -> Path | list[Path]:
    """Writes `model` (adapters merged in float32) as a llama.cpp GGUF.

    quant: one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_s, q4_k_m, q5_k_s, q5_k_m,
        q6_k (or unsloth's not_quantized = f16, fast_quantized = q8_0, quantized = q4_k_m), or a
        list of them: one file each.
    path: the file for one quant; for several, `<stem>.<QUANT>.gguf` beside it (`model.gguf` ->
        `model.Q8_0.gguf`, `model.F16.gguf`); an existing directory gets `<name>.<QUANT>.gguf`.
    tokenizer: the tokenizer / processor to describe (default: AutoTokenizer of the directory
        the model was loaded from).
    overwrite: replace existing files (else ExportError); files are only replaced once complete.
    modelfile: True (template matched from the tokenizer's chat template) or a template name
        (`minift.templates`): also write an Ollama `Modelfile` beside the GGUF, FROM the first.

    A Gemma 3 vision model also gets `mmproj-<stem>.F16.gguf` (the vision tower + projector,
    F32 when f32 is among the quants) beside the language model's GGUF.
    Returns the path (one quant, text model) or the list of paths written, mmproj last.
    """
    with torch.no_grad():
        return _save(model, path, quant, tokenizer, overwrite, modelfile)


def _save(model: nn.Module, path: str | os.PathLike, quant: str | Sequence[str], tokenizer: Any, overwrite: bool,
          modelfile: bool | str) -> Path | list[Path]:
    if importlib.util.find_spec("gguf") is None:
        raise ExportError("save_gguf needs the `gguf` package (gguf-py, llama.cpp's writer): pip install gguf")
    quants = _resolve_quants(quant)
    m = _describe(model)
    name = _name_of(model)
    targets = _targets(path, quants, name)
    mm_ftype = "ALL_F32" if any(q.name == "f32" for q in quants) else "MOSTLY_F16"
    mm_path = _mmproj_path(targets[0], quants, "F32" if mm_ftype == "ALL_F32" else "F16") if m.vision is not None else None
    mf_path = targets[0].parent / "Modelfile" if modelfile else None
    for p in targets + [x for x in (mm_path, mf_path) if x is not None]:
        if p.exists() and not overwrite:
            raise ExportError(f"{p}: exists; pass overwrite=True to replace it")
        if p.is_dir():
            raise ExportError(f"{p}: is a directory; cannot write a file there")
    if len(set(targets)) != len(targets):
        raise ExportError(f"save_gguf: quants {[q.name for q in quants]} map to the same file")

    info = getattr(model, "load_info", None)
    if getattr(info, "quantization", None) == "nf4":
        warnings.warn("save_gguf: the base weights are NF4 (4-bit); the GGUF is written from their exact "
                      "dequantisation, which carries the 4-bit rounding of the base", stacklevel=3)
    src = getattr(info, "source_path", None)
    tok = _load_tokenizer(model, tokenizer)
    n_vocab = int(model.language_model.embed_tokens.weight.shape[0])
    vocab = build_vocab(tok, n_vocab, m.arch, m.text, source=src, given=tokenizer is not None)
    mf_tmp: Path | None = None
    mf_text = None
    if modelfile:  # before the long write: a template that cannot be matched fails fast
        from .ollama import ollama_modelfile

        mf_text = ollama_modelfile(tok if modelfile is True else modelfile, f"./{targets[0].name}", tokenizer=tok,
                                   mmproj=f"./{mm_path.name}" if mm_path is not None else None,
                                   prefer=_FAMILY_TEMPLATES.get(m.top.model_type, ()))

    groups, tied = merged_groups(model, torch.float32, quantize=False)
    outs = [_Out(p, _writer(m.arch), q) for p, q in zip(targets, quants)]
    mm_out = _Out(mm_path, _writer("clip")) if mm_path is not None else None
    every = outs + ([mm_out] if mm_out is not None else [])
    t = m.text
    try:
        for o in every:
            o.open()
        for o in outs:
            _text_metadata(o.writer, m, o.quant, name, n_vocab, vocab)
        if mm_out is not None:
            mean, std = _image_stats(tokenizer, src)
            _mmproj_metadata(mm_out.writer, m, mm_ftype, name, mean, std)
        full = t.rope.get(_FULL)
        if m.arch == "llama" and full is not None and full.rope_type == "llama3":
            factors = _llama3_rope_factors(t)
            for o in outs:
                o.add("rope_freqs.weight", factors, tensor_type(o.quant, "rope_freqs.weight", factors.shape,
                                                                n_layer=t.num_hidden_layers, tied=tied))
        mapper = _Mapper(m)
        for g in groups:
            for hf, tensor in g.make().items():
                got = mapper(hf, tensor)
                if got is None:
                    continue
                dest, new, conv = got
                arr = conv.detach().to("cpu").contiguous().numpy()
                del conv, tensor
                if dest == "mmproj":
                    mm_out.add(new, arr, _mmproj_type(hf, new, arr.shape, mm_ftype))
                    continue
                for o in outs:
                    o.add(new, arr, tensor_type(o.quant, new, arr.shape, n_layer=int(t.num_hidden_layers), tied=tied,
                                                n_head=int(t.num_attention_heads), n_head_kv=int(t.num_key_value_heads)))
                del arr
        for o in every:
            o.finish()
        if mf_path is not None:
            mf_tmp = mf_path.parent / f".{mf_path.name}.tmp-{uuid.uuid4().hex[:8]}"
            mf_tmp.write_text(mf_text)
    except BaseException:
        for o in every:
            o.discard()
        if mf_tmp is not None and mf_tmp.exists():
            mf_tmp.unlink()
        raise
    for o in every:
        os.replace(o.tmp, o.path)
        logger.info("save_gguf: wrote %s", o.path)
    if mf_tmp is not None:
        os.replace(mf_tmp, mf_path)
    written = [o.path for o in every]
    return written[0] if len(written) == 1 else written
