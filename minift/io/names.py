"""Hub id ↔ pre-quantised twin: `minift.load("unsloth/gemma-3-4b-it", load_in_4bit=True)` reads
`unsloth/gemma-3-4b-it-bnb-4bit` when that is cached or reachable, since downloading ~1/3 of the
bytes and skipping on-the-fly quantisation is what a 4-bit user wants; a 16-bit load of a
`…-bnb-4bit` id reads its 16-bit twin instead, since a bnb checkpoint can only give 4-bit weights
(minift would load it 4-bit, not a dequantised copy pretending to be 16-bit).

Rules, in order: the small `BNB_TWINS` dict (official ids whose bnb twin lives under unsloth/ with
another name), then the generic suffix rule `X` ↔ `X-bnb-4bit` (`X-unsloth-bnb-4bit` → `X` too).
A twin is used when its snapshot (config.json and safetensors) is in the HF cache, or, unless
HF_HUB_OFFLINE=1, when a short `model_info` call finds it. The map never fails a load: any
doubt or error keeps the original name. It is skipped for a pinned `revision` (a commit of one
repo means nothing in its twin) and with `load(..., use_name_map=False)`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .hub import is_hub_id

logger = logging.getLogger(__name__)

HUB_TIMEOUT_S = 3.0  # the online check must never make a load feel slow

_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit")  # longest first

# Official 16-bit repos → unsloth's pre-quantised copy (ids the suffix rule cannot derive).
BNB_TWINS: dict[str, str] = {
    "meta-llama/Llama-3.2-1B": "unsloth/Llama-3.2-1B-bnb-4bit",
    "meta-llama/Llama-3.2-1B-Instruct": "unsloth/Llama-3.2-1B-Instruct-bnb-4bit",
    "meta-llama/Llama-3.2-3B": "unsloth/Llama-3.2-3B-bnb-4bit",
    "meta-llama/Llama-3.2-3B-Instruct": "unsloth/Llama-3.2-3B-Instruct-bnb-4bit",
    "meta-llama/Llama-3.1-8B": "unsloth/Meta-Llama-3.1-8B-bnb-4bit",
    "meta-llama/Llama-3.1-8B-Instruct": "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit",
    "meta-llama/Llama-3.3-70B-Instruct": "unsloth/Llama-3.3-70B-Instruct-bnb-4bit",
    "mistralai/Mistral-7B-v0.3": "unsloth/mistral-7b-v0.3-bnb-4bit",
    "mistralai/Mistral-7B-Instruct-v0.3": "unsloth/mistral-7b-instruct-v0.3-bnb-4bit",
    "google/gemma-2-2b": "unsloth/gemma-2-2b-bnb-4bit",
    "google/gemma-2-2b-it": "unsloth/gemma-2-2b-it-bnb-4bit",
    "google/gemma-2-9b": "unsloth/gemma-2-9b-bnb-4bit",
    "google/gemma-2-9b-it": "unsloth/gemma-2-9b-it-bnb-4bit",
    "google/gemma-3-1b-it": "unsloth/gemma-3-1b-it-bnb-4bit",
    "google/gemma-3-4b-it": "unsloth/gemma-3-4b-it-bnb-4bit",
    "google/gemma-3-4b-pt": "unsloth/gemma-3-4b-pt-bnb-4bit",
    "google/gemma-3-12b-it": "unsloth/gemma-3-12b-it-bnb-4bit",
    "google/gemma-3-27b-it": "unsloth/gemma-3-27b-it-bnb-4bit",
}
_FROM_BNB = {v: k for k, v in BNB_TWINS.items()}


def twin_candidates(name: str, load_in_4bit: bool) -> list[str]:
    """The ids to try instead of `name`, best first (empty: `name` already fits the request)."""
    stem = next((name[: -len(s)] for s in _SUFFIXES if name.endswith(s)), None)
    if load_in_4bit:
        return [] if stem is not None else list(dict.fromkeys(filter(None, [BNB_TWINS.get(name), name + "-bnb-4bit"])))
    if stem is None:
        return []
    # the same org's 16-bit copy first: unsloth's are ungated, the official ones often gated
    return list(dict.fromkeys(filter(None, [stem, _FROM_BNB.get(name)])))


def in_cache(repo: str) -> bool:
    """Whether the HF cache holds a usable snapshot of `repo` (config.json next to safetensors)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = try_to_load_from_cache(repo, "config.json")
    if not isinstance(cfg, str):
        return False
    snap = Path(cfg).parent
    return (snap / "model.safetensors").exists() or (snap / "model.safetensors.index.json").exists()


def on_hub(repo: str, token: str | bool | None = None) -> bool:
    """Whether the hub answers for `repo` within HUB_TIMEOUT_S; never asked when HF_HUB_OFFLINE=1."""
    from huggingface_hub import HfApi
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        info = HfApi().model_info(repo, timeout=HUB_TIMEOUT_S, token=token)
        if getattr(info, "gated", False):  # listed, but only downloadable once its terms are accepted
            return HfApi().file_exists(repo, "config.json", token=token)
        return True
    except Exception:  # no network, no such repo, gated, rate-limited: all mean "not this one"
        return False


def map_name(name: str, *, load_in_4bit: bool, revision: str | None = None, token: str | bool | None = None) -> str:
    """`name`, or its pre-quantised (load_in_4bit) / 16-bit twin when that is cached or on the hub."""
    if revision is not None or not is_hub_id(name):
        return name
    try:
        cands = twin_candidates(name, load_in_4bit)
        found = next((c for c in cands if in_cache(c)), None) or next((c for c in cands if on_hub(c, token)), None)
    except Exception as e:  # pragma: no cover - the map must never break a load
        logger.debug("minift name map: %s kept (%s)", name, e)
        return name
    if found is None:
        return name
    kind = "pre-quantised 4-bit" if load_in_4bit else "16-bit"
    logger.info("minift: loading %s instead of %s (%s twin)", found, name, kind)
    return found
