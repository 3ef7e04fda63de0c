"""Where a model lives: a local directory as it is, or a hub id through huggingface_hub's cache
(honouring HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE). Only the files a model needs are fetched."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ConfigError, HubError
from .files import TOKENIZER_PATTERNS

# Config, weights, generation config and the tokenizer / processor: never pickles or code.
HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_PATTERNS,
]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub repository id, 'org/name'."""
    return isinstance(name, str) and bool(_HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name \
        and not name.endswith((".", "-"))


def written_as_path(name: str) -> bool:
    """Whether a string is spelled as a filesystem path rather than an 'org/name' hub id: it starts
    with './', '../', '/' or '~' (or is '.' / '..'), holds more than one '/', or a backslash."""
    return (name in (".", "..") or name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name.count("/") > 1
            or "\\" in name or os.path.isabs(name))


def is_local_path(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` means a local path: a path object, a string naming an existing path,
    or one written as a path (see `written_as_path`). Otherwise it is a hub id (or nothing)."""
    if not isinstance(name_or_path, str):
        return True
    return os.path.lexists(os.path.expanduser(name_or_path)) or written_as_path(name_or_path)


def base_name(name_or_path: str | os.PathLike) -> str:
    """How a saved adapter names its base (`base_model_name_or_path`): the absolute directory for a
    local model, so PEFT finds it from any working directory; the hub id otherwise."""
    if is_local_path(name_or_path):
        return os.path.abspath(os.path.expanduser(os.fspath(name_or_path)))
    return str(name_or_path)


def check_name(name_or_path: object, what: str = "name_or_path") -> str:
    """The string form of a hub id / path argument; ConfigError naming `what` for anything else."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str):
        raise ConfigError(f"{what}: expected a local directory or a hub id 'org/name' (str or os.PathLike), "
                          f"got {type(name_or_path).__name__} {name_or_path!r}")
    if not name_or_path.strip():
        raise ConfigError(f"{what}: expected a local directory or a hub id 'org/name', got an empty string")
    return name_or_path


def resolve_path(name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None) -> Path:
    """The local directory holding the model: `name_or_path` itself, or the hub id's snapshot.

    A path object, an existing path or a string written as a path (`written_as_path`) is a local
    path and is never looked up on the hub; only 'org/name' with no such directory is a hub id."""
    local = is_local_path(name_or_path)
    name = check_name(name_or_path)
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ConfigError(f"{name}: is a file; expected a model directory or a hub id")
    here = os.path.abspath(p)
    if local:
        raise ConfigError(f"{name}: no such directory ({here})")
    if not is_hub_id(name):
        raise ConfigError(f"{name}: no such directory ({here}), and not a hub id of the form 'org/name'")
    nor = f"; nor is it a local directory ({here} does not exist)"
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(name, revision=revision, token=token, allow_patterns=HUB_PATTERNS))
    except GatedRepoError as e:
        raise HubError(f"{name}: gated repository; accept its terms on the hub and pass token=...: {e}") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"{name}: no such repository on the hub (or no access; pass token=...){nor}") from e
    except RevisionNotFoundError as e:
        raise HubError(f"{name}: revision {revision!r} not found") from e
    except LocalEntryNotFoundError as e:
        if hf_constants.HF_HUB_OFFLINE:
            raise HubError(
                f"{name}: not in the Hugging Face cache ({hf_constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids "
                f"downloading it; download it once online or pass a local directory{nor}"
            ) from e
        raise HubError(f"{name}: not a local directory ({here} does not exist), and not downloadable from the hub "
                       f"nor in the Hugging Face cache: {e}") from e
    except Exception as e:  # network errors, invalid ids, ...: one typed error naming both places looked in
        raise HubError(f"{name}: not a local directory ({here} does not exist), and not resolvable on the hub: "
                       f"{e}") from e
