"""`minift.load`: a hub id or local directory → (model, tokenizer or processor).

Resolving and reading files is minift.io's job, the modules are minift.arch's (with the API of
`minift.models.classes`), 4-bit weights minift.quant's; this module puts them together.

The model is built on the meta device and each checkpoint tensor is read once from safetensors
and materialised straight into its final dtype and device (or quantised to NF4 on the way), so
peak memory stays near the final model size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..arch.config import SUPPORTED_MODEL_TYPES, VISION_MODEL_TYPES
from ..errors import CheckpointError, ConfigError, QuantizationError, ShapeMismatchError, UnsupportedModelError
from ..io.files import read_json_object
from ..io.hub import resolve_path
from ..io.info import LoadInfo
from ..io.keys import checkpoint_key_mapper
from ..io.names import map_name
from ..io.weights import iter_tensors, weight_files
from ..quant import make_quantizer
from .classes import build_model


def read_config(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    cfg = read_json_object(f, ConfigError, what="a model directory needs config.json")
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{f}: model_type {cfg.get('model_type')!r} is not supported; minift supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return cfg


def default_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    return dev, dtype


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:  # pragma: no cover - names come from state_dict()
        raise CheckpointError(f"model has no tensor {name!r}")


def load_weights(
    model: nn.Module,
    path: Path,
    cfg: dict[str, Any],
    *,
    dtype: torch.dtype,
    device: torch.device,
    text_only: bool = False,
    quantizer: Any = None,
) -> None:
    """Fills a meta-device model from the checkpoint in `path`, checking names and shapes.

    `quantizer` (see minift.quant.bnb) takes over the linear weights (16-bit, or packed with their
    quant state) of the modules it claims, and loads them after the rest, a module at a time."""
    files = weight_files(path)
    to_name = checkpoint_key_mapper(vision_checkpoint=cfg["model_type"] in VISION_MODEL_TYPES, text_only=text_only)
    expected, aliases = _tensor_names(model)
    wanted: dict[str, str] = {}  # checkpoint key -> model name
    unexpected: list[str] = []
    quant_keys: dict[str, str] = {}
    for k in files:
        name = to_name(k)
        if name is None:
            continue
        if quantizer is not None and quantizer.claims_key(name):
            quant_keys[k] = name
            continue
        if name in expected:
            wanted[k] = name
        elif name in aliases:
            continue  # a tied head saved anyway: the embedding is the weight
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved this buffer; minift recomputes it
        else:
            unexpected.append(k)
    if unexpected:
        raise CheckpointError(
            f"{path}: checkpoint holds tensors this {cfg['model_type']} model does not have: "
            f"{', '.join(sorted(unexpected)[:20])}{' ...' if len(unexpected) > 20 else ''}"
        )
    non_persistent = {n for n, _ in _non_persistent_buffers(model)}
    have = set(wanted.values()) | (quantizer.covered_names(quant_keys) if quantizer is not None else set())
    missing = sorted(n for n in expected if n not in have and n not in non_persistent)
    if missing:
        raise CheckpointError(
            f"{path}: checkpoint is missing tensors: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}"
        )
    for k, t in iter_tensors(files, list(wanted)):
        name = wanted[k]
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise ShapeMismatchError(
                f"{files[k]}: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(want.shape)} from config.json"
            )
        _set_tensor(model, name, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
    if quant_keys:
        quantizer.load_quantized(model, files, quant_keys)
    model.reset_buffers(device)
    model.tie_weights()


def _tensor_names(model: nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Persistent tensors by name, and the names that alias an earlier one (a tied lm_head)."""
    seen: dict[int, str] = {}
    expected: dict[str, torch.Tensor] = {}
    aliases: set[str] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            aliases.add(name)
            continue
        seen[id(t)] = name
        expected[name] = t
    return expected, aliases


def _non_persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for mname, mod in model.named_modules():
        for bname in getattr(mod, "_non_persistent_buffers_set", ()):
            yield (f"{mname}.{bname}" if mname else bname), mod._buffers[bname]


def load_processor(path: Path, vision: bool, trust_remote_code: bool = False):
    """The tokenizer (or, for vision checkpoints, the processor) through transformers."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        if vision:
            return AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: could not load the {'processor' if vision else 'tokenizer'}: {e}") from e


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    max_seq_length: int | None = None,
    load_in_4bit: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    text_only: bool = False,
    full_finetuning: bool = False,
    quantize_vision: bool = True,
    use_name_map: bool = True,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """Loads a Llama / Mistral / Gemma / Gemma 2 / Gemma 3 (text or vision) checkpoint.

    Returns `(model, tokenizer)`, or `(model, processor)` for a vision checkpoint.
    dtype/device default to bfloat16 on CUDA and float32 on CPU. `load_in_4bit` quantises the
    decoder's (and, with `quantize_vision`, the vision tower's) linear weights to NF4 while
    loading; pre-quantised bitsandbytes checkpoints load as they are. `text_only` loads only the
    language model of a vision checkpoint. `full_finetuning` leaves every weight trainable;
    otherwise all weights are frozen (add adapters with `minift.add_lora`). `use_name_map`
    swaps a hub id for its pre-quantised `-bnb-4bit` twin (or back) when that is available.
    `max_seq_length` is kept in `model.load_info` as the trainer's default. `model.load_info`
    records where the model came from (see `minift.io.LoadInfo`). `trust_remote_code` is only
    passed to the tokenizer/processor; minift never runs a checkpoint's modeling code.
    """
    dev, dt = default_device_dtype(device, dtype)
    if use_name_map and not Path(name_or_path).expanduser().exists():
        name_or_path = map_name(str(name_or_path), load_in_4bit=load_in_4bit, revision=revision, token=token)
    path = resolve_path(name_or_path, revision=revision, token=token)
    cfg = read_config(path)
    vision_checkpoint = cfg["model_type"] in VISION_MODEL_TYPES
    quantizer = None
    prequant = cfg.get("quantization_config")
    if load_in_4bit or prequant:
        if full_finetuning:
            raise QuantizationError(
                "full_finetuning=True needs a 16-bit model; drop load_in_4bit (or, for a pre-quantised checkpoint, "
                "load its 16-bit original) or train LoRA adapters"
            )
        to_name = checkpoint_key_mapper(vision_checkpoint=vision_checkpoint, text_only=text_only)
        quantizer = make_quantizer(cfg, compute_dtype=dt, device=dev, quantize_vision=quantize_vision,
                                   to_name=to_name, path=path, load_in_4bit=load_in_4bit)
    with torch.device("meta"):
        model = build_model(cfg, text_only=text_only)
    model.tie_weights()
    if quantizer is not None:
        quantizer.prepare(model)
    load_weights(model, path, cfg, dtype=dt, device=dev, text_only=text_only, quantizer=quantizer)
    for p in model.parameters():
        p.requires_grad_(full_finetuning and p.is_floating_point())
    model.eval()
    model.load_info = LoadInfo(
        name_or_path=str(name_or_path), source_path=path, revision=revision,
        text_of_vision=text_only and vision_checkpoint,
        quantization="nf4" if quantizer is not None else None, prequantized=bool(prequant),
        max_seq_length=max_seq_length,
    )
    return model, load_processor(path, vision_checkpoint and not text_only, trust_remote_code)
