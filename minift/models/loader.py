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
from ..errors import (
    CheckpointError, ConfigError, InputError, QuantizationError, ShapeMismatchError, UnsupportedModelError,
)
from ..io.files import missing_tokenizer_files, read_json_object
from ..io.hub import base_name, check_name, is_local_path, resolve_path
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


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_DTYPE_HELP = "torch.float32, torch.float16 or torch.bfloat16 (or 'float32', 'float16', 'bfloat16')"


def check_dtype(dtype: Any) -> torch.dtype | None:
    """None, or a floating dtype minift computes in; InputError naming `dtype` otherwise."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
        raise InputError(f"dtype: {dtype} is not a dtype minift loads weights in; expected {_DTYPE_HELP}")
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key in _DTYPES:
            return _DTYPES[key]
    raise InputError(f"dtype: expected {_DTYPE_HELP}, got {dtype!r}")


def check_device(device: Any) -> torch.device:
    """The device to load on (None: CUDA when available, this rank's GPU under torchrun, else the
    CPU); InputError naming `device` when it is not a device or not usable here."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if torch.distributed.is_available() and torch.distributed.is_torchelastic_launched():
            # under torchrun each rank takes its own GPU (LOCAL_RANK, as torch.distributed reads it)
            local = torch.distributed.get_node_local_rank(fallback_rank=0) % torch.cuda.device_count()
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cuda")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise InputError(f"device: expected 'cpu', 'cuda', 'cuda:N', an index or a torch.device, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InputError(f"device: {device!r} is not a device; expected 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device={device!r}: CUDA is not available here (torch.cuda.is_available() is False: no GPU, or a "
                "CPU-only torch build); use device='cpu' or leave device=None"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and not 0 <= dev.index < n:
            raise InputError(f"device={device!r}: there {'is' if n == 1 else 'are'} only {n} CUDA device(s) "
                             f"(cuda:0 .. cuda:{n - 1})")
        return dev
    backend = getattr(torch, dev.type, None)
    if dev.type != "meta" and backend is not None and getattr(backend, "is_available", lambda: False)():
        return dev
    raise InputError(f"device={device!r}: not usable for loading weights here; expected 'cpu' or 'cuda'")


def default_device_dtype(device: Any, dtype: Any) -> tuple[torch.device, torch.dtype]:
    dev = check_device(device)
    dt = check_dtype(dtype)
    if dt is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, dt


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{name}: expected True or False, got {value!r}")


def check_load_args(name_or_path: Any, *, max_seq_length: Any, revision: Any, token: Any, **flags: Any) -> str:
    """Every argument of `load` but dtype/device, up front; the name as a string."""
    name = check_name(name_or_path)
    if max_seq_length is not None and (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int)
                                       or max_seq_length < 2):
        raise InputError(f"max_seq_length: expected None or an integer >= 2, got {max_seq_length!r}")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise InputError(f"revision: expected None or a branch, tag or commit name (str), got {revision!r}")
    if token is not None and not isinstance(token, (str, bool)):
        raise InputError(f"token: expected None, True / False or a hub token (str), got {type(token).__name__}")
    for k, v in flags.items():
        _check_flag(k, v)
    return name


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


def check_tokenizer_files(path: Path, vision: bool) -> None:
    """ConfigError, before any weight is read, when `path` lacks the tokenizer (or processor) files
    `load_processor` needs: saying what is missing and what the directory holds."""
    missing = missing_tokenizer_files(path, processor=vision)
    if missing is None:
        return
    held = sorted(f.name for f in path.iterdir() if not f.name.startswith("."))
    raise ConfigError(
        f"{path}: has no {missing}, which minift.load returns with the model; the directory holds "
        f"{', '.join(held[:12])}{' ...' if len(held) > 12 else ''}. Copy the tokenizer files of the base model "
        "there (tokenizer.save_pretrained(dir)), or save with minift, which writes them"
    )


def load_processor(path: Path, vision: bool, trust_remote_code: bool = False):
    """The tokenizer (or, for vision checkpoints, the processor) through transformers."""
    from transformers import AutoProcessor, AutoTokenizer

    what = "processor" if vision else "tokenizer"
    try:
        if vision:
            return AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, ImportError, ... for unusable files
        raise ConfigError(f"{path}: transformers could not build the {what} from its files: {e}") from e


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

    `name_or_path`: a path object, a string naming an existing path, or one written as a path
    ('./', '../', '/', '~', more than one '/') is a local directory; only 'org/name' with no such
    directory is a hub id. Every argument is checked before anything is read (InputError naming
    it), and the tokenizer / processor files before any weight.
    """
    check_load_args(
        name_or_path, max_seq_length=max_seq_length, revision=revision, token=token, load_in_4bit=load_in_4bit,
        text_only=text_only, full_finetuning=full_finetuning, quantize_vision=quantize_vision,
        use_name_map=use_name_map, trust_remote_code=trust_remote_code,
    )
    dev, dt = default_device_dtype(device, dtype)
    if full_finetuning and load_in_4bit:
        raise QuantizationError("full_finetuning=True needs a 16-bit model; drop load_in_4bit or train LoRA adapters")
    local = is_local_path(name_or_path)
    if use_name_map and not local:
        name_or_path = map_name(str(name_or_path), load_in_4bit=load_in_4bit, revision=revision, token=token)
    path = resolve_path(name_or_path, revision=revision, token=token)
    cfg = read_config(path)
    vision_checkpoint = cfg["model_type"] in VISION_MODEL_TYPES
    if text_only and not vision_checkpoint:
        raise InputError(
            f"text_only=True: {path} is a {cfg['model_type']} checkpoint, a text model already; text_only loads the "
            "language model of a Gemma 3 vision checkpoint (model_type 'gemma3') alone"
        )
    check_tokenizer_files(path, vision_checkpoint and not text_only)
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
        name_or_path=base_name(name_or_path) if local else str(name_or_path), source_path=path, revision=revision,
        text_of_vision=text_only and vision_checkpoint,
        quantization="nf4" if quantizer is not None else None, prequantized=bool(prequant),
        max_seq_length=max_seq_length,
    )
    return model, load_processor(path, vision_checkpoint and not text_only, trust_remote_code)
