"""What the subcommands share: usage errors (exit 2, nothing written), boolean / dtype parsing,
and loading a model directory, a hub id or an adapter directory (whose base comes from its
adapter_config.json)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

USAGE_EXIT = 2  # argparse's exit status for a bad command line
TRUE = ("true", "yes", "1", "on", "y", "t")
FALSE = ("false", "no", "0", "off", "n", "f")
DTYPES = {"auto": None, "none": None, "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16", "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


class UsageError(Exception):
    """A bad flag value or combination: reported as `minift CMD: error: argument --flag: ...` with
    exit status 2 before anything is loaded or written."""

    def __init__(self, flag: str | None, message: str):
        self.flag, self.message = flag, message
        super().__init__(f"argument {flag}: {message}" if flag else message)


def str2bool(value: Any) -> bool:
    """argparse type for booleans written as values (`--flag false`); a bare `--flag` is True."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def parse_dtype(value: Any, flag: str = "--dtype") -> Any:
    """None (auto: bfloat16 on CUDA, float32 on CPU) or a torch dtype."""
    if value is None:
        return None
    key = str(value).strip().lower().replace("torch.", "")
    if key not in DTYPES:
        raise UsageError(flag, f"unknown dtype {value!r}; use one of None (auto), bfloat16, float16, float32")
    if DTYPES[key] is None:
        return None
    import torch

    return getattr(torch, DTYPES[key])


def fail(prog: str, err: UsageError) -> int:
    sys.stderr.write(f"usage: see `{prog} --help`\n{prog}: error: {err}\n")
    return USAGE_EXIT


def looks_local(spec: str) -> bool:
    """A path rather than a hub id: it exists, starts like a path, or ends like a data file."""
    p = Path(spec).expanduser()
    if p.exists():
        return True
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        return True
    return p.suffix.lower() in (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow", ".gguf", ".safetensors")


def check_model_arg(spec: str, flag: str) -> None:
    """A model argument: an existing directory, or something shaped like a hub id."""
    from ..io.hub import is_hub_id

    p = Path(spec).expanduser()
    if p.is_dir():
        return
    if p.exists():
        raise UsageError(flag, f"{spec} is a file; expected a model directory, an adapter directory or a hub id")
    if looks_local(spec) or not is_hub_id(spec):
        raise UsageError(flag, f"{spec}: no such directory, and not a hub id of the form 'org/name'")


def is_adapter_dir(spec: str | Path) -> bool:
    return (Path(spec).expanduser() / "adapter_config.json").is_file()


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on (adapter_config.json base_model_name_or_path);
    a relative local path is tried against the current directory, then the adapter's."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise UsageError(None, f"{adapter_dir}/adapter_config.json names no base_model_name_or_path; pass --base")
    p = Path(base).expanduser()
    if not p.is_absolute() and not p.exists() and (adapter_dir / p).is_dir():
        return str(adapter_dir / p)
    return str(base)


def has_tokenizer_files(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_model(spec: str, *, adapter: str | None = None, base: str | None = None, load_in_4bit: bool = False,
               dtype: Any = None, max_seq_length: int | None = None, chat_template: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer or processor) for a model directory / hub id, with `adapter` applied;
    `spec` may itself be an adapter directory. The tokenizer / processor saved beside an adapter
    (which carries the chat template set for training) is preferred over the base's."""
    import minift
    from ..models.loader import load_processor

    adapter_dir = None
    if is_adapter_dir(spec):
        adapter_dir = Path(spec).expanduser()
        spec = base or adapter_base(adapter_dir)
    if adapter is not None:
        adapter_dir = Path(adapter).expanduser()
    model, tok = minift.load(spec, load_in_4bit=load_in_4bit, dtype=dtype, max_seq_length=max_seq_length)
    if adapter_dir is not None:
        minift.load_adapter(model, adapter_dir)
        if has_tokenizer_files(adapter_dir):
            tok = load_processor(adapter_dir, vision=hasattr(model, "image_features"))
    if chat_template:
        minift.get_chat_template(tok, chat_template)
    return model, tok


def check_adapter_arg(adapter: str | None, flag: str = "--adapter") -> None:
    if adapter is None:
        return
    if not is_adapter_dir(adapter):
        raise UsageError(flag, f"{adapter}: not an adapter directory (no adapter_config.json)")


def check_chat_template(name: str | None, flag: str = "--chat_template") -> None:
    if name is None:
        return
    from ..errors import ConfigError
    from ..templates import template

    try:
        template(name)
    except ConfigError as e:
        raise UsageError(flag, str(e)) from None


def open_image(path: str | None, flag: str = "--image") -> Any:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(flag, f"{path}: no such file")
    try:
        from PIL import Image

        img = Image.open(p)
        img.load()
        return img.convert("RGB")
    except ImportError:
        raise UsageError(flag, "images need pillow: pip install pillow") from None
    except Exception as e:  # PIL raises several kinds for unreadable files
        raise UsageError(flag, f"{path}: not a readable image: {e}") from None
