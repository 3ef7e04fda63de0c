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

_HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub repository id, 'org/name'."""
    return bool(_HUB_ID.fullmatch(name)) and not name.startswith((".", "/"))


def resolve_path(name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None) -> Path:
    """The local directory holding the model: `name_or_path` itself, or the hub id's snapshot."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    name = str(name_or_path)
    if p.exists():
        raise ConfigError(f"{name}: is a file; expected a model directory or a hub id")
    if not is_hub_id(name):
        raise ConfigError(f"{name}: no such directory, and not a hub id of the form 'org/name'")
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
