"""Reading JSON configs, writing output directories atomically (`atomic_dir`, the one writer every
save uses), and the tokenizer / processor files that travel with a model."""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import AdapterError, MiniftError, WriteError

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


# ---- the atomic directory writer ------------------------------------------------------------------
#
# Every save (adapter, merged checkpoint, trainer checkpoint, full fine-tune) goes through
# `atomic_dir`: the files are written into a temporary directory in the destination's parent,
# fsynced (files, then directories), given normal modes (0666 / 0777 less the umask) and renamed
# into place, so the destination is always either absent, its previous complete version, or the
# new complete version. A temporary's name records its writer's pid,
# `.tmp-<name>-pid<pid>-<8 hex>`; the next write into the same parent removes those whose
# writer is no longer alive (a writer SIGKILLed mid-save), restoring a `.old-` copy that a kill
# between the two renames of the fallback swap left without its destination.

MANIFEST = ".minift-files.json"  # what minift wrote into a directory: overwrite=True replaces only that

# What older minift versions wrote (directories without a manifest): overwrite=True replaces these.
_KNOWN_OUTPUTS = (
    "adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "trainable.safetensors",
    "optimizer.pt", "scheduler.json", "rng.safetensors", "trainer_state.json", *TOKENIZER_PATTERNS,
)
_KNOWN_DIRS = ("adapter",)

_TEMP = re.compile(r"^\.(?P<kind>tmp|old|del)-(?P<name>.+)-pid(?P<pid>\d+)-[0-9a-f]{8}$")
_ACTIVE: set[str] = set()  # temporaries of writes in progress in this process (by path)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2: Any = None


def temp_path(parent: Path, name: str, kind: str = "tmp") -> Path:
    """A fresh temporary name in `parent` recording this process's pid (see `remove_stale`)."""
    return parent / f".{kind}-{name}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:  # pragma: no cover
        return True
    return True


def _is_stale(entry: Path, pid: int) -> bool:
    if pid == os.getpid():  # ours only if a write of this process has it open; else a recycled pid's
        return os.path.abspath(entry) not in _ACTIVE
    return not pid_alive(pid)


def _rmtree(path: Path) -> None:
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path, ignore_errors=True)
    except OSError:  # pragma: no cover - best effort
        pass


def remove_stale(parent: str | os.PathLike) -> list[Path]:
    """Removes the temporaries in `parent` that writers which are no longer alive left (returns
    them). A `.old-<name>-...` whose `<name>` is missing is the previous complete version, caught
    between the two renames of a swap: it is renamed back instead."""
    parent = Path(parent)
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or not _is_stale(entry, int(m["pid"])):
            continue
        if m["kind"] == "old" and not os.path.lexists(parent / m["name"]):
            try:
                os.rename(entry, parent / m["name"])
                continue
            except OSError:
                pass
        _rmtree(entry)
        removed.append(entry)
    return removed


def remove_dir(path: str | os.PathLike) -> None:
    """Deletes a directory so that no half-deleted copy is ever seen under its name: it is renamed
    to a `.del-` temporary first (removed by the next write if this process dies meanwhile)."""
    path = Path(os.path.abspath(path))
    if not path.exists():
        return
    doomed = temp_path(path.parent, path.name, "del")
    _ACTIVE.add(str(doomed))
    try:
        os.rename(path, doomed)
        _rmtree(doomed)
    finally:
        _ACTIVE.discard(str(doomed))


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - non-Linux
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def finish_tree(root: Path) -> None:
    """Normal modes (0666 files, 0777 directories, less the umask: some writers create 0600 files)
    and everything under `root` on disk: files first, then each directory bottom-up."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for fn in filenames:
            f = os.path.join(dirpath, fn)
            if os.path.islink(f):
                continue
            os.chmod(f, 0o666 & ~mask)
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(dirpath, 0o777 & ~mask)
        _fsync_dir(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2(RENAME_EXCHANGE)); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError, ImportError):
            _renameat2 = False
    if not _renameat2:
        return False
    import ctypes

    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _manifest(path: Path) -> set[str] | None:
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        files = json.loads(f.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return {str(x) for x in files} if isinstance(files, list) else None


def foreign_files(path: Path) -> list[str]:
    """Entries of an existing output directory that minift did not write: those its manifest does
    not list (a directory written before manifests: those not named as minift names its outputs).
    Temporaries left inside it by older versions count as minift's."""
    owned = _manifest(path)
    out = []
    for e in sorted(path.iterdir(), key=lambda e: e.name):
        n = e.name
        if n == MANIFEST or _TEMP.match(n) or (n.startswith(".") and "tmp" in n):
            continue
        if owned is not None:
            if n not in owned:
                out.append(n + ("/" if e.is_dir() else ""))
        elif e.is_dir():
            if n not in _KNOWN_DIRS:
                out.append(n + "/")
        elif not any(fnmatch.fnmatchcase(n, pat) for pat in _KNOWN_OUTPUTS):
            out.append(n)
    return out


def _check_target(target: Path, overwrite: bool, what: str, error: type[MiniftError]) -> bool:
    """Whether `target` exists (and may be replaced); `error` when it may not be."""
    if not os.path.lexists(target):
        return False
    if not target.is_dir():
        raise error(f"{target}: exists and is not a directory; cannot write the {what} there")
    if not any(True for _ in target.iterdir()):
        return True
    if not overwrite:
        raise error(f"{target}: directory exists and is not empty; pass overwrite=True to replace it")
    foreign = foreign_files(target)
    if foreign:
        raise error(
            f"{target}: overwrite=True replaces only what minift wrote there, but the directory also holds "
            f"{', '.join(foreign[:10])}{' ...' if len(foreign) > 10 else ''}; move those away or save to another directory"
        )
    return True


def _write_error(e: OSError, target: Path, what: str, existed: bool) -> WriteError:
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    hint = "; free some space or save elsewhere" if e.errno == errno.ENOSPC else ""
    before = (f"the previous {what} at {target} is unchanged" if existed else f"nothing was written at {target}")
    err = WriteError(f"{target}: could not write the {what}: {e.strerror or e}{where}; {before}{hint}")
    err.errno = e.errno
    return err


@contextmanager
def atomic_dir(
    target: str | os.PathLike, *, overwrite: bool, what: str, error: type[MiniftError] = AdapterError,
) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `target`; when the block ends without an
    exception, its contents replace `target` in one rename (see the notes above), so a crash
    never leaves a half-written `target`. A non-empty existing `target` needs overwrite=True,
    which replaces only a directory minift wrote: one holding other files is refused, naming
    them (`error`). An OSError while writing (a full disk) becomes a WriteError; either way the
    temporary is removed and `target` keeps what it had."""
    target = Path(os.path.abspath(Path(target).expanduser()))
    if target.is_symlink() and target.is_dir():
        target = Path(os.path.realpath(target))
    existed = _check_target(target, overwrite, what, error)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent)
        tmp = temp_path(parent, target.name)
        os.mkdir(tmp)
    except OSError as e:
        raise _write_error(e, target, what, existed) from e
    _ACTIVE.add(str(tmp))
    try:
        yield tmp
        _commit(tmp, target, overwrite, what, error)
    except BaseException as e:
        _rmtree(tmp)
        if isinstance(e, WriteError) and isinstance(e.__cause__, OSError):  # a nested write (an adapter in a checkpoint)
            raise _write_error(e.__cause__, target, what, existed) from e.__cause__
        if isinstance(e, OSError) and not isinstance(e, MiniftError):
            raise _write_error(e, target, what, existed) from e
        raise
    finally:
        _ACTIVE.discard(str(tmp))


def _commit(tmp: Path, target: Path, overwrite: bool, what: str, error: type[MiniftError]) -> None:
    names = sorted(e.name for e in tmp.iterdir() if e.name != MANIFEST)
    (tmp / MANIFEST).write_text(json.dumps({"writer": "minift", "what": what, "files": names}, indent=1) + "\n")
    finish_tree(tmp)
    parent = target.parent
    if _check_target(target, overwrite, what, error):  # again: it may have changed while we wrote
        if _exchange(tmp, target):  # tmp now holds the previous version
            _fsync_dir(parent)
            _rmtree(tmp)
            return
        old = temp_path(parent, target.name, "old")
        _ACTIVE.add(str(old))
        try:
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)  # put the previous version back
                raise
            _fsync_dir(parent)
            _rmtree(old)
        finally:
            _ACTIVE.discard(str(old))
        return
    try:
        os.rename(tmp, target)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise error(f"{target}: appeared while the {what} was being written; nothing was replaced") from e
        raise
    _fsync_dir(parent)


# Any one of these holds a tokenizer's vocabulary (fast tokenizer.json; SentencePiece or tiktoken
# tokenizer.model; byte-level BPE vocab.json + merges.txt; WordPiece vocab.txt; Mistral's tekken.json).
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "tekken.json", "vocab.txt", "*.tiktoken")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def missing_tokenizer_files(path: Path, *, processor: bool = False) -> str | None:
    """What is missing for transformers to build the tokenizer (and, with `processor`, the image
    processor) from `path`, in words; None when the files are there."""
    names = {f.name for f in Path(path).iterdir() if f.is_file()} if Path(path).is_dir() else set()
    has_vocab = any(fnmatch.fnmatchcase(n, pat) for n in names for pat in _VOCAB_FILES) or \
        {"vocab.json", "merges.txt"} <= names
    missing = []
    if not has_vocab:
        missing.append("tokenizer files (tokenizer.json, or tokenizer.model, or vocab.json + merges.txt)")
    if processor and not names & set(_PROCESSOR_FILES):
        missing.append("image processor config (preprocessor_config.json)")
    return " and ".join(missing) or None


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
    if not isinstance(size, str):
        raise AdapterError(f"max_shard_size: expected a positive number of bytes or a size like '5GB', got {size!r}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise AdapterError(f"max_shard_size: expected bytes or a size like '5GB', got {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
