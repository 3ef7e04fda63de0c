"""Which modules get adapters, and how they are named for transformers / PEFT.

Selection follows PEFT (targets: "all-linear", module-name suffixes, or a regex fullmatched on
the module path) narrowed by unsloth's get_peft_regex tags (vision / language parts, attention
/ mlp components). minift's module paths are transformers' except for the SigLIP tower, where
transformers 5 has no `vision_model.` level; `hf_path` / `minift_path` translate (minift.io.keys).
"""

from __future__ import annotations

import copy
import re
from typing import Any, Iterator

from torch import nn

from ..arch.config import VISION_MODEL_TYPES
from ..errors import AdapterError
from ..io import keys
from .layers import LoraLinear, ModulesToSave, is_linear

# unsloth's get_peft_regex tags: which part of the model and which component a module path is in.
VISION_TAGS = ("vision", "image", "visual", "patch")
LANGUAGE_TAGS = ("language", "text")
ATTENTION_TAGS = ("self_attn", "attention", "attn")
MLP_TAGS = ("mlp", "feed_forward", "ffn", "dense")

# ---- module paths ---------------------------------------------------------------------------------


def is_vision_model(model: nn.Module) -> bool:
    return model.config.model_type in VISION_MODEL_TYPES


def _text_of_vision(model: nn.Module) -> bool:
    return model.load_info.text_of_vision


def hf_path(model: nn.Module, path: str) -> str:
    """minift module path → the transformers 5 model's (see `minift.io.keys.hf_path`)."""
    return keys.hf_path(path, vision=is_vision_model(model))


def peft_path(model: nn.Module, path: str) -> str:
    """minift module path → its name in the model PEFT applies a saved adapter to (a text-only load
    of a Gemma 3 vision checkpoint names its language half as the full model does)."""
    return keys.peft_path(path, vision=is_vision_model(model), text_of_vision=_text_of_vision(model))


def minift_path(model: nn.Module, path: str) -> str | None:
    """A transformers module path (5's or the original Hub layout's) → this model's, or None."""
    return keys.minift_path(path, vision=is_vision_model(model))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            yield name, mod


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, mod in model.named_modules():
        if isinstance(mod, ModulesToSave):
            yield name, mod


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, (LoraLinear, ModulesToSave)) for m in model.modules())


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer LoRA may wrap: the decoder's and the vision tower's, not lm_head or
    the projector (what PEFT's "all-linear" leaves out), nothing inside another linear."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if is_linear(mod) or isinstance(mod, (LoraLinear, ModulesToSave)):
            inside.append(name)
            leaf = name.rsplit(".", 1)[-1]
            if is_linear(mod) and leaf != "lm_head" and "multi_modal_projector" not in name:
                out[name] = mod
    return out


def set_module(model: nn.Module, path: str, mod: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, mod)


def suffix_match(path: str, name: str) -> bool:
    """PEFT's rule for a listed name: the path equals it or ends with '.' + it."""
    return path == name or path.endswith("." + name)


# ---- selection --------------------------------------------------------------------------------------


def _has(path: str, tags: tuple[str, ...]) -> bool:
    return any(t in path for t in tags)


def select_targets(
    model: nn.Module,
    targets: str | list[str] | tuple[str, ...],
    *,
    vision: bool = True,
    language: bool = True,
    attention: bool = True,
    mlp: bool = True,
) -> list[str]:
    """Paths of the linears to wrap: `targets` ("all-linear", names, or a regex fullmatched on the
    path) and the part/component selections (unsloth's tags) must both agree."""
    if not (vision or language):
        raise AdapterError("vision=False and language=False select nothing; enable at least one part")
    if not (attention or mlp):
        raise AdapterError("attention=False and mlp=False select nothing; enable at least one component")
    cands = linear_modules(model)
    names = sorted({p.rsplit(".", 1)[-1] for p in cands})
    if isinstance(targets, str) and targets == "all-linear":
        hit = list(cands)
    elif isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise AdapterError(f"targets: {targets!r} is not a valid regular expression: {e}") from e
        hit = [p for p in cands if rx.fullmatch(p) or rx.fullmatch(hf_path(model, p)) or rx.fullmatch(peft_path(model, p))]
    elif isinstance(targets, (list, tuple, set)) and targets and all(isinstance(t, str) for t in targets):
        if "lm_head" in targets:
            raise AdapterError("targets: lm_head cannot take a LoRA adapter (the fused loss reads its weight "
                               "directly); train it fully with modules_to_save=['lm_head']")
        hit = [p for p in cands if any(suffix_match(p, t) or suffix_match(peft_path(model, p), t) for t in targets)]
    else:
        raise AdapterError(f"targets: expected 'all-linear', a list of module names or a regex string, got {targets!r}")
    if not hit:
        raise AdapterError(f"targets {targets!r} match no linear module; this model's linear modules are "
                           f"named {', '.join(names)}")

    def keep(p: str) -> bool:
        is_vis = _has(p, VISION_TAGS)
        is_lang = _has(p, LANGUAGE_TAGS) or not is_vis
        part = (vision and is_vis) or (language and is_lang)
        comp = (attention and _has(p, ATTENTION_TAGS)) or (mlp and _has(p, MLP_TAGS))
        return part and comp

    out = [p for p in hit if keep(p)]
    if not out:
        raise AdapterError(
            f"targets {targets!r} match {len(hit)} linear module(s), but none is in the selected parts "
            f"(vision={vision}, language={language}) and components (attention={attention}, mlp={mlp})"
        )
    return out


def peft_target_modules(model: nn.Module, chosen: list[str], all_paths: list[str]) -> list[str] | str:
    """How to name `chosen` in adapter_config.json for the transformers model: sorted leaf names
    when they pick exactly these modules, else a regex (layer numbers generalised when that stays
    exact, else every path spelled out)."""
    hf_all = [peft_path(model, p) for p in all_paths]
    hf_chosen = {peft_path(model, p) for p in chosen}
    leaves = sorted({p.rsplit(".", 1)[-1] for p in hf_chosen})
    # Leaf names would also pick the vision tower's q/k/v_proj in the full model of a text-only load.
    exact = not _text_of_vision(model)
    if exact and {p for p in hf_all if any(suffix_match(p, s) for s in leaves)} == hf_chosen:
        return leaves
    pats = sorted({r"\.".join(r"\d+" if c.isdigit() else re.escape(c) for c in p.split(".")) for p in hf_chosen})
    rx = "(?:" + "|".join(pats) + ")"
    if {p for p in hf_all if re.fullmatch(rx, p)} == hf_chosen:
        return rx
    return "(?:" + "|".join(sorted(re.escape(p) for p in hf_chosen)) + ")"


# ---- modules_to_save --------------------------------------------------------------------------------


def _tied_pair(model: nn.Module) -> tuple[str, str] | None:
    """(embedding path, lm_head path) when lm_head shares the input embedding's weight."""
    head = getattr(model, "lm_head", None)
    if head is None or not hasattr(model, "language_model"):
        return None
    emb = model.language_model.embed_tokens
    if getattr(head, "weight", None) is None or head.weight is not getattr(emb, "weight", None):
        return None
    paths = {id(m): n for n, m in model.named_modules()}
    return paths[id(emb)], paths[id(head)]


def match_modules_to_save(model: nn.Module, names: list[str], lora_paths: list[str], *, tie: bool = True) -> list[str]:
    """Paths of the modules `names` select (PEFT's rule: the path ends with the name), checked
    before anything changes; with `tie`, a tied head brings its embedding and vice versa."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise AdapterError(f"modules_to_save: expected a list of module names, got {names!r}")
    mods = dict(model.named_modules())
    found: list[str] = []
    for n in names:
        hit = [p for p, m in mods.items()  # PEFT's rule (0.22): the name is the path's last components
               if p and (_ends_with_module(p, n) or _ends_with_module(hf_path(model, p), n)
                         or _ends_with_module(peft_path(model, p), n))
               and any(True for _ in m.parameters())]
        hit = [p for p in hit if not any(p.startswith(q + ".") for q in hit if q != p)]
        if not hit:
            raise AdapterError(f"modules_to_save: {n!r} matches no module with parameters")
        clash = [p for p in hit for q in lora_paths if p == q or p.startswith(q + ".") or q.startswith(p + ".")]
        if clash:
            raise AdapterError(f"modules_to_save: {', '.join(clash)} also gets a LoRA adapter; a module is either "
                               "adapted or trained in full, not both")
        found += [p for p in hit if p not in found]
    tied = _tied_pair(model)
    if tie and tied and (tied[0] in found or tied[1] in found):
        found = [p for p in found if p not in tied] + list(tied)
    return sorted(found)


def add_modules_to_save(model: nn.Module, paths: list[str]) -> None:
    """Wraps each module in `paths` (from match_modules_to_save) in ModulesToSave with a
    trainable copy in the model's dtype.

    A tied lm_head / input embedding stays tied: naming either one wraps both around one shared
    trainable copy (PEFT's `ensure_weight_tying=True`; one matrix to train, the checkpoint stays
    tied), and the adapter stores it under both names so PEFT loads it either way."""
    mods = dict(model.named_modules())
    memo: dict[int, Any] = {}  # one memo: a tensor shared by two originals is shared by their copies
    copies = {p: copy.deepcopy(mods[p], memo) for p in paths}
    for p, cp in copies.items():
        cp.requires_grad_(True)
        set_module(model, p, ModulesToSave(mods[p], cp).train(mods[p].training))


def _ends_with_module(path: str, name: str) -> bool:
    """Whether `name` is `path`'s last components ("norm" is model.norm's, not q_norm's)."""
    return path == name or path.endswith("." + name)


def peft_modules_to_save(model: nn.Module, wrapped: list[str], all_paths: list[str]) -> list[str]:
    """Leaf names when they pick exactly the wrapped modules among the model's, else full paths.
    Exactly under both of PEFT's rules: up to 0.21 a plain suffix ("norm" took q_norm too), from
    0.22 whole components, so the adapter loads the same with either."""
    hf_wrapped = {peft_path(model, p) for p in wrapped}
    leaves = sorted({p.rsplit(".", 1)[-1] for p in hf_wrapped})
    for match in (str.endswith, _ends_with_module):
        picked = {peft_path(model, p) for p in all_paths if any(match(peft_path(model, p), s) for s in leaves)}
        picked = {p for p in picked if not any(p.startswith(q + ".") for q in picked)}
        if picked != hf_wrapped:
            return sorted(hf_wrapped)
    return leaves
