"""Reading JSON configs, writing output directories atomically, and the tokenizer / processor
files that travel with a model."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import AdapterError, MiniftError

# What a tokenizer / processor is made of (fetched from the hub with a model, copied beside saves).
TOKENIZER_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "*.model",
    "chat_template*", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)


def read_json_object(path: Path, error: type[MiniftError], *, what: str) -> dict[str, Any]:
    """The JSON object in `path`; `error` (naming the file) when it is missing, not JSON or not an
    object. `what` says what the file is for ("a model directory needs config.json")."""
    if not path.is_file():
        raise error(f"{path}: missing; {what}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


@contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool, what: str) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `target`; on success it replaces `target` by a
    rename, so a crash never leaves a half-written `target`. An existing non-empty `target`
    needs overwrite=True."""
    target = Path(target).expanduser()
    if target.exists():
        if not target.is_dir():
            raise AdapterError(f"{target}: exists and is not a directory; cannot write the {what} there")
        if any(target.iterdir()) and not overwrite:
            raise AdapterError(f"{target}: directory exists and is not empty; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_tokenizer_files(out: Path, tokenizer: Any = None, source: Path | None = None) -> None:
    """The given tokenizer/processor's save_pretrained, else the files beside the source checkpoint."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        return
    if source is None or not Path(source).is_dir():
        return
    for pat in TOKENIZER_PATTERNS:
        for f in Path(source).glob(pat):
            if f.is_file():
                shutil.copy2(f, out / f.name)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" / "500MB" / "2GiB" (transformers' units)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise AdapterError(f"max_shard_size: expected bytes or a size like '5GB', got {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
