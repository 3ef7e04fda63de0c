"""`minift.load`: a hub id or local directory → (model, tokenizer or processor).

The model is built on the meta device and each checkpoint tensor is read once from safetensors
and materialised straight into its final dtype and device (or quantised to NF4 on the way), so
peak memory stays near the final model size.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .arch.config import SUPPORTED_MODEL_TYPES, TEXT_MODEL_TYPES, VISION_MODEL_TYPES, ModelConfig
from .arch.model import CausalLM
from .errors import CheckpointError, ConfigError, HubError, ShapeMismatchError, UnsupportedModelError

# Files a model needs: config, weights, tokenizer/processor, chat template, generation config.
HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "*.model",
    "chat_template*", "preprocessor_config.json", "processor_config.json",
]


def resolve_path(name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None) -> Path:
    """A local directory as it is, else a hub id through huggingface_hub's cache
    (honours HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    name = str(name_or_path)
    if p.exists():
        raise ConfigError(f"{name}: is a file; expected a model directory or a hub id")
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) or name.startswith((".", "/")):
        raise ConfigError(f"{name}: no such directory, and not a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub import constants as hf_constants
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(name, revision=revision, token=token, allow_patterns=HUB_PATTERNS))
    except GatedRepoError as e:
        raise HubError(f"{name}: gated repository; accept its terms on the hub and pass token=...: {e}") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"{name}: no such repository on the hub (or no access; pass token=...)") from e
    except RevisionNotFoundError as e:
        raise HubError(f"{name}: revision {revision!r} not found") from e
    except LocalEntryNotFoundError as e:
        if hf_constants.HF_HUB_OFFLINE:
            raise HubError(
                f"{name}: not in the Hugging Face cache ({hf_constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids "
                "downloading it; download it once online or pass a local directory"
            ) from e
        raise HubError(f"{name}: could not be downloaded or found in the cache: {e}") from e
    except OSError as e:
        raise HubError(f"{name}: could not be resolved: {e}") from e


def read_config(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    if not f.is_file():
        raise ConfigError(f"{f}: missing; a model directory needs config.json")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{f}: expected a JSON object")
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{f}: model_type {cfg.get('model_type')!r} is not supported; minift supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return cfg


def weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name → the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from e
        out = {}
        for k, fname in wm.items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"{f}: shard named by {index.name} for tensor {k!r} is missing")
            out[k] = f
        return out
    if single.is_file():
        return {k: single for k in _safetensors_keys(single)}
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(
            f"{path}: holds only pickle weights (*.bin/*.pt); minift loads safetensors only, since pickle can run code"
        )
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _safetensors_keys(f: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as h:
            return list(h.keys())
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        raise CheckpointError(f"{f}: not a readable safetensors file (truncated or corrupted?): {e}") from e


def iter_tensors(files: dict[str, Path], keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) file by file, each tensor read once from its mapped file."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for k in keys if keys is not None else files:
        by_file.setdefault(files[k], []).append(k)
    for f, ks in by_file.items():
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in ks:
                    yield k, h.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: failed reading tensor data (truncated or corrupted?): {e}") from e


def default_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    return dev, dtype


def build_model(cfg: dict[str, Any], *, text_only: bool = False) -> nn.Module:
    """The minift module for a config.json dict (call under `torch.device('meta')`)."""
    mt = cfg["model_type"]
    if mt in VISION_MODEL_TYPES:
        from .arch.vision import build_vision_model, gemma3_text_config

        if text_only:
            return CausalLM(ModelConfig.from_hf(gemma3_text_config(cfg), source="config.json text_config"))
        return build_vision_model(cfg)
    if mt in TEXT_MODEL_TYPES:
        return CausalLM(ModelConfig.from_hf(cfg))
    raise UnsupportedModelError(f"model_type {mt!r} is not supported; minift supports {', '.join(SUPPORTED_MODEL_TYPES)}")


def key_mapper(cfg: dict[str, Any], text_only: bool) -> Callable[[str], str | None]:
    """Checkpoint key → this model's parameter name (None: not part of this model)."""
    if cfg["model_type"] not in VISION_MODEL_TYPES:
        return lambda k: k
    from .arch.vision import canonical_key, text_only_key

    if text_only:
        return lambda k: text_only_key(canonical_key(k))
    return canonical_key


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

    `quantizer` (see minift.quant) takes over the linear weights (16-bit, or packed with their
    quant state) of the modules it claims, and loads them after the rest, a module at a time."""
    files = weight_files(path)
    to_name = key_mapper(cfg, text_only)
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
    `max_seq_length` is kept on the model as the trainer's default. `trust_remote_code` is only
    passed to the tokenizer/processor; minift never runs a checkpoint's modeling code.
    """
    dev, dt = default_device_dtype(device, dtype)
    if use_name_map and not Path(name_or_path).expanduser().exists():
        from .quant import map_name

        name_or_path = map_name(str(name_or_path), load_in_4bit=load_in_4bit, revision=revision, token=token)
    path = resolve_path(name_or_path, revision=revision, token=token)
    cfg = read_config(path)
    quantizer = None
    prequant = cfg.get("quantization_config")
    if load_in_4bit or prequant:
        from .quant import make_quantizer

        if full_finetuning:
            from .errors import QuantizationError

            raise QuantizationError(
                "full_finetuning=True needs a 16-bit model; drop load_in_4bit (or, for a pre-quantised checkpoint, "
                "load its 16-bit original) or train LoRA adapters"
            )
        quantizer = make_quantizer(cfg, compute_dtype=dt, device=dev, quantize_vision=quantize_vision,
                                   text_only=text_only, path=path, load_in_4bit=load_in_4bit)
    with torch.device("meta"):
        model = build_model(cfg, text_only=text_only)
    model.tie_weights()
    if quantizer is not None:
        quantizer.prepare(model)
    load_weights(model, path, cfg, dtype=dt, device=dev, text_only=text_only, quantizer=quantizer)
    for p in model.parameters():
        p.requires_grad_(full_finetuning and p.is_floating_point())
    model.eval()
    model.max_seq_length = max_seq_length
    model.name_or_path = str(name_or_path)
    model.source_path = path
    # The language half of a vision checkpoint: adapters name modules as the full model does (peft_path).
    model.text_of_vision = text_only and cfg["model_type"] in VISION_MODEL_TYPES
    vision = cfg["model_type"] in VISION_MODEL_TYPES and not text_only
    return model, load_processor(path, vision, trust_remote_code)
