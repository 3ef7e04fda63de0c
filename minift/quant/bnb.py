"""4-bit (bitsandbytes NF4) loading: the quantizer `minift.load` drives.

Two ways in, one result (frozen `Linear4bit` modules holding bitsandbytes' exact NF4 layout):
  * `load_in_4bit=True` on a 16-bit checkpoint quantises each linear weight on its way from
    safetensors to the device with bitsandbytes (`quantize_4bit`: NF4, blocksize 64, double
    quantisation), so the GPU never holds more than one 16-bit tensor at a time;
  * a pre-quantised bitsandbytes checkpoint (config.json `quantization_config`) loads as stored,
    without dequantising/requantising and without needing bitsandbytes at all.
Decoder linears (and the vision tower's, unless `quantize_vision=False`) become 4-bit; norms,
embeddings, lm_head and the multimodal projector stay in the load dtype, as bitsandbytes users
expect.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import ops
from ..errors import InputError, QuantizationError, ShapeMismatchError
from ..io.weights import iter_tensors, weight_files
from ..ops.nf4 import NF4Weight
from .linear4bit import BLOCKSIZE, Linear4bit

_AUX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_QS_PREFIX = "quant_state.bitsandbytes__"


_USABLE: set[str] = set()


def _import_bnb() -> Any:
    """bitsandbytes.functional (the tests replace this to simulate a machine without it)."""
    import bitsandbytes.functional as bnbf

    return bnbf


def bnb_functional(device: torch.device, dtype: torch.dtype) -> Any:
    """bitsandbytes.functional once a tiny quantisation worked on `device`, else QuantizationError."""
    try:
        bnbf = _import_bnb()
    except Exception as e:
        raise QuantizationError(
            f"load_in_4bit=True on a 16-bit checkpoint needs bitsandbytes to quantise it, and importing it failed "
            f"({type(e).__name__}: {e}); `pip install bitsandbytes`, or load a pre-quantised '-bnb-4bit' checkpoint "
            "(minift reads those without bitsandbytes)"
        ) from e
    key = f"{device}/{dtype}"
    if key not in _USABLE:
        try:
            _quantize_with(bnbf, torch.ones(BLOCKSIZE, device=device, dtype=dtype))
        except Exception as e:
            raise QuantizationError(
                f"bitsandbytes cannot quantise {dtype} tensors on {device} ({type(e).__name__}: {e}); install a "
                "bitsandbytes build for this device, or load a pre-quantised '-bnb-4bit' checkpoint"
            ) from e
        _USABLE.add(key)
    return bnbf


def _quantize_with(bnbf: Any, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    return bnbf.quantize_4bit(t, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4",
                              quant_storage=torch.uint8)


def quantize_4bit(t: torch.Tensor, name: str) -> tuple[torch.Tensor, Any]:
    """bitsandbytes' NF4 of `t` as minift stores every 4-bit weight (blocksize 64, double
    quantisation, uint8 storage): (packed data, QuantState). `name` goes into errors."""
    bnbf = bnb_functional(t.device, t.dtype)
    try:
        return _quantize_with(bnbf, t)
    except Exception as e:
        raise QuantizationError(f"{name}: bitsandbytes could not quantise it ({type(e).__name__}: {e})") from e


# ---- which modules ----------------------------------------------------------------------------------


def _is_vision(name: str) -> bool:
    return name.startswith("model.vision_tower.") or ".vision_tower." in name


def _keeps_16bit(name: str) -> bool:
    """lm_head and the projector stay in the load dtype (bitsandbytes users expect it; the fused
    loss reads lm_head.weight as a dense matrix)."""
    return name == "lm_head" or name.endswith(".lm_head") or "multi_modal_projector" in name


def skip_matches(pattern: str, name: str) -> bool:
    """transformers' llm_int8_skip_modules rule (prefix up to a module boundary, as a regex, or a
    suffix), plus older transformers' whole-component containment."""
    try:
        if re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", name):
            return True
    except re.error:
        pass
    return name.endswith(pattern) or f".{pattern}." in f".{name}."


def _module_of(name: str) -> tuple[str, str] | None:
    """'X.weight' → (X, ''), 'X.weight.absmax' → (X, 'absmax'), other names → None."""
    if name.endswith(".weight"):
        return name[: -len(".weight")], ""
    i = name.find(".weight.")
    return (name[:i], name[i + len(".weight."):]) if i > 0 else None


def _parse_quant_state(t: torch.Tensor, where: str) -> dict[str, Any]:
    try:
        d = json.loads(bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise QuantizationError(f"{where}: not the packed JSON bitsandbytes writes ({e})") from e
    if not isinstance(d, dict):
        raise QuantizationError(f"{where}: expected a JSON object, got {type(d).__name__}")
    return d


class BnbQuantizer:
    """What `minift.load` calls (see `minift.models.loader.load_weights`): which checkpoint
    tensors it takes over, which model tensors they cover, and loading them. `prequantized`: the
    checkpoint is a bitsandbytes 4-bit one (else its linear weights are quantised while loading).
    `to_name` maps checkpoint tensor names to the model's (None: not in this model)."""

    def __init__(self, cfg: dict[str, Any], *, compute_dtype: torch.dtype, device: torch.device,
                 quantize_vision: bool, to_name: Callable[[str], str | None], path: Path | None):
        self.compute_dtype, self.device, self.quantize_vision = compute_dtype, torch.device(device), quantize_vision
        qc = cfg.get("quantization_config")
        self.prequantized = bool(qc)
        self.skip: list[str] = list((qc or {}).get("llm_int8_skip_modules") or [])
        self.model: nn.Module | None = None
        self.claimed: set[str] = set()  # module names whose weight tensors this quantizer loads
        self.ckpt_quantized: dict[str, str] = {}  # model module name -> checkpoint module name
        if self.prequantized:
            self._scan_checkpoint(path, to_name)

    def _scan_checkpoint(self, path: Path | None, to_name: Callable[[str], str | None]) -> None:
        """Modules the checkpoint stores quantised: those with quant-state tensors (names only)."""
        if path is None:
            raise QuantizationError("a pre-quantised checkpoint needs its path to find the quantised tensors")
        for k in weight_files(path):
            name = to_name(k)
            mod = _module_of(name) if name is not None else None
            if mod and mod[1] and (mod[1] in _AUX or mod[1].startswith(_QS_PREFIX)):
                self.ckpt_quantized[mod[0]] = _module_of(k)[0]

    def _wants_4bit(self, name: str) -> bool:
        if _keeps_16bit(name) or (_is_vision(name) and not self.quantize_vision):
            return False
        if self.prequantized:
            ck = self.ckpt_quantized.get(name)
            return ck is not None and not any(skip_matches(p, n) for p in self.skip for n in (name, ck))
        return True

    # -- the protocol ----------------------------------------------------------------------------

    def prepare(self, model: nn.Module) -> None:
        """Swap the chosen nn.Linear modules of the meta model for Linear4bit placeholders."""
        self.model = model
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        stray = sorted(set(self.ckpt_quantized) - set(linears))
        if stray:
            raise QuantizationError(
                f"checkpoint stores {', '.join(self.ckpt_quantized[s] for s in stray[:5])} quantised, but "
                f"{'they are' if len(stray) > 1 else 'it is'} not a linear layer of this model"
            )
        for name, lin in linears.items():
            if self.prequantized and name in self.ckpt_quantized:
                self.claimed.add(name)  # loaded by this quantizer, 4-bit or dequantised
            if not self._wants_4bit(name):
                continue
            self.claimed.add(name)
            parent, _, attr = name.rpartition(".")
            q = Linear4bit(lin.in_features, lin.out_features, lin.bias is not None,
                           compute_dtype=self.compute_dtype, device="meta")
            setattr(model.get_submodule(parent) if parent else model, attr, q)

    def claims_key(self, name: str) -> bool:
        """Whether the (model-named) checkpoint tensor is a claimed module's weight or quant state;
        biases stay with the loader."""
        mod = _module_of(name)
        if mod is None or mod[0] not in self.claimed:
            return False
        return self.prequantized or mod[1] == ""

    def covered_names(self, quant_keys: dict[str, str]) -> set[str]:
        """The model tensors the claimed checkpoint tensors fill: all of a module's but its bias."""
        assert self.model is not None
        mods = {_module_of(n)[0] for n in quant_keys.values()}
        return {f"{m}.{k}" for m in mods for k in self.model.get_submodule(m).state_dict(keep_vars=True) if k != "bias"}

    def load_quantized(self, model: nn.Module, files: dict[str, Path], quant_keys: dict[str, str]) -> None:
        """Reads the claimed tensors, a module at a time (its parts may sit in different shards),
        and fills each module as soon as its parts are in."""
        want: dict[str, int] = {}
        for n in quant_keys.values():
            m = _module_of(n)[0]
            want[m] = want.get(m, 0) + 1
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for k, t in iter_tensors(files, list(quant_keys)):
            m, part = _module_of(quant_keys[k])
            parts = pending.setdefault(m, {})
            parts[part] = t
            if len(parts) == want[m]:
                del pending[m]
                if self.prequantized:
                    w = self._from_parts(model, m, parts, files[k])
                else:
                    w = self._quantize(model, m, t, files[k])
                self._store(model, m, w)

    # -- helpers -------------------------------------------------------------------------------------

    def _quantize(self, model: nn.Module, m: str, t: torch.Tensor, file: Path) -> NF4Weight:
        mod = model.get_submodule(m)
        if tuple(t.shape) != (mod.out_features, mod.in_features):
            raise ShapeMismatchError(
                f"{file}: tensor '{m}.weight' has shape {tuple(t.shape)}, expected "
                f"{(mod.out_features, mod.in_features)} from config.json"
            )
        t = t.to(device=self.device, dtype=self.compute_dtype)
        data, qs = quantize_4bit(t, f"{m}.weight")
        del t  # the 16-bit copy goes now: only one is ever alive
        return NF4Weight.from_bnb(data, qs)

    def _from_parts(self, model: nn.Module, m: str, parts: dict[str, torch.Tensor], file: Path) -> NF4Weight:
        """An NF4Weight from a bitsandbytes checkpoint's tensors, every field checked."""
        p = f"{m}.weight"
        qs_keys = [k for k in parts if k.startswith(_QS_PREFIX)]
        other = [k[len(_QS_PREFIX):] for k in qs_keys if k != _QS_PREFIX + "nf4"]
        if other:
            raise QuantizationError(f"{p}: quantised as {other[0]!r}; minift loads NF4 4-bit checkpoints only")
        unknown = sorted(k for k in parts if k and k not in _AUX and k not in qs_keys)
        if unknown:
            raise QuantizationError(f"{p}.{unknown[0]}: not a bitsandbytes 4-bit quant-state entry")
        for need in ("", "absmax", "quant_map", _QS_PREFIX + "nf4"):
            if need not in parts:
                raise QuantizationError(f"{p}{'.' + need if need else ''} missing: {file} holds an incomplete "
                                        f"bitsandbytes quant state for {m}")
        qs = _parse_quant_state(parts[_QS_PREFIX + "nf4"], f"{p}.{_QS_PREFIX}nf4")
        where = f"{p}.{_QS_PREFIX}nf4"
        mod = model.get_submodule(m)
        want_shape = (mod.out_features, mod.in_features)
        shape, bs = qs.get("shape"), qs.get("blocksize")
        if qs.get("quant_type", "nf4") != "nf4":
            raise QuantizationError(f"{where}: quant_type {qs.get('quant_type')!r}; minift loads NF4 only")
        if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
            raise QuantizationError(f"{where}: 'shape' must be a list of ints, got {shape!r}")
        if tuple(shape) != want_shape:
            raise QuantizationError(f"{where}: quant_state shape {tuple(shape)} does not match config {want_shape}")
        if not isinstance(bs, int):
            raise QuantizationError(f"{where}: 'blocksize' must be an int, got {bs!r}")
        nested = {}
        if "nested_absmax" in parts or "nested_blocksize" in qs:
            for need in ("nested_absmax", "nested_quant_map"):
                if need not in parts:
                    raise QuantizationError(f"{p}.{need} missing: the quant state says the absmax is double-quantised")
            nbs, off = qs.get("nested_blocksize"), qs.get("nested_offset")
            if not isinstance(nbs, int) or not isinstance(off, (int, float)):
                raise QuantizationError(f"{where}: double quantisation needs an int 'nested_blocksize' and a number "
                                        f"'nested_offset', got {nbs!r} and {off!r}")
            nested = dict(nested_absmax=parts["nested_absmax"], nested_code=parts["nested_quant_map"],
                          nested_blocksize=nbs, offset=torch.tensor(float(off), dtype=torch.float32))
        data = parts[""]
        if data.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: same bytes
            data = data.contiguous().view(torch.uint8)
        w = NF4Weight(data.reshape(-1, 1), parts["absmax"], parts["quant_map"], torch.Size(want_shape),
                      self.compute_dtype, bs, **nested)
        try:
            w.validate(p)
        except InputError as e:
            raise QuantizationError(f"malformed quant state in {file}: {e}") from e
        return w

    def _store(self, model: nn.Module, m: str, w: NF4Weight) -> None:
        w = w.to(self.device)
        mod = model.get_submodule(m)
        if isinstance(mod, Linear4bit):
            mod.set_nf4(w)
        else:  # stored 4-bit, kept 16-bit here (lm_head, skip list, quantize_vision=False)
            mod._parameters["weight"] = nn.Parameter(ops.dequantize_nf4(w), requires_grad=False)


def make_quantizer(
    cfg: dict[str, Any],
    *,
    compute_dtype: torch.dtype,
    device: torch.device,
    quantize_vision: bool = True,
    to_name: Callable[[str], str | None] = lambda k: k,
    path: Path | None = None,
    load_in_4bit: bool = True,
) -> BnbQuantizer:
    """The quantizer for this load, after checking the request can be met: an 8-bit or non-NF4
    checkpoint, or quantising without a usable bitsandbytes, is a QuantizationError up front."""
    qc = cfg.get("quantization_config")
    if qc:
        if not isinstance(qc, dict):
            raise QuantizationError(f"config.json quantization_config must be an object, got {type(qc).__name__}")
        method = qc.get("quant_method", "bitsandbytes")
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            raise QuantizationError("8-bit bitsandbytes checkpoints (load_in_8bit) are not supported; load the 16-bit "
                                    "model with load_in_4bit=True, or an NF4 4-bit checkpoint")
        if method != "bitsandbytes" or not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
            raise QuantizationError(f"quantization_config quant_method {method!r} is not supported; minift loads "
                                    "16-bit checkpoints and bitsandbytes NF4 4-bit ones")
        qtype = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' default when absent
        if qtype != "nf4":
            raise QuantizationError(
                f"bnb_4bit_quant_type {qtype!r} is not supported; minift loads NF4 4-bit checkpoints"
            )
        if not load_in_4bit:
            warnings.warn(
                f"{path}: is a pre-quantised 4-bit (NF4) checkpoint, so it loads 4-bit although load_in_4bit=False; "
                "for 16-bit weights load its 16-bit original", stacklevel=3,
            )
    else:
        bnb_functional(torch.device(device), compute_dtype)
    return BnbQuantizer(cfg, compute_dtype=compute_dtype, device=device, quantize_vision=quantize_vision,
                        to_name=to_name, path=path)


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (tied tensors counted once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())
