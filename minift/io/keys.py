"""Hugging Face names ↔ minift names.

minift's module paths are transformers 5's, with two exceptions this module translates:
  * a Gemma 3 vision checkpoint is stored in one of two key layouts (the Hub's original one of
    transformers 4, and transformers 5's module names; 5.x save_pretrained writes the old
    prefixes but may drop the SigLIP tower's `vision_model.` level), and minift keeps that level;
  * a text-only load of a Gemma 3 vision checkpoint is a plain causal LM (`model.layers...`),
    while the checkpoint, and PEFT's view of adapters on it, say `model.language_model.layers...`.
`vision` below means "a Gemma 3 vision-language model"; `text_of_vision` the text-only load of one.
"""

from __future__ import annotations

from typing import Callable

_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
_TOWER = "model.vision_tower."
_TOWER_INNER = _TOWER + "vision_model."
_LANGUAGE = "model.language_model."


def canonical_key(key: str) -> str:
    """A vision checkpoint's tensor name (either layout) → the minift vision model's name.
    Unknown names come back unchanged, for the loader to report."""
    for old, new in _PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith(_TOWER) and not key.startswith(_TOWER_INNER):
        key = _TOWER_INNER + key[len(_TOWER):]
    return key


def text_only_key(key: str) -> str | None:
    """A vision checkpoint's tensor name → a plain causal LM's name (`model.X`, `lm_head.weight`),
    or None for the vision tower and projector, which a text-only load skips."""
    key = canonical_key(key)
    if key.startswith(_LANGUAGE):
        return "model." + key[len(_LANGUAGE):]
    if key.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
        return None
    return key


def checkpoint_key_mapper(*, vision_checkpoint: bool, text_only: bool) -> Callable[[str], str | None]:
    """Checkpoint tensor name → the loaded model's parameter name (None: not part of this model)."""
    if not vision_checkpoint:
        return lambda k: k
    return text_only_key if text_only else canonical_key


def hf_path(path: str, *, vision: bool) -> str:
    """minift module path → the transformers 5 model's (the SigLIP tower has no `vision_model.` level there)."""
    if vision and path.startswith(_TOWER_INNER):
        return _TOWER + path[len(_TOWER_INNER):]
    return path


def peft_path(path: str, *, vision: bool, text_of_vision: bool) -> str:
    """minift module path → its name in the model PEFT applies a saved adapter to: `hf_path`,
    except that a text-only load of a vision checkpoint names its language half as the full model
    does, since transformers loads the adapter's base as Gemma3ForConditionalGeneration."""
    p = hf_path(path, vision=vision)
    if text_of_vision and p.startswith("model."):
        return _LANGUAGE + p[len("model."):]
    return p


def minift_path(path: str, *, vision: bool) -> str | None:
    """A transformers module path (5's or the original Hub layout's) → this model's, or None."""
    return canonical_key(path) if vision else text_only_key(path)
