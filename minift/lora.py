"""LoRA / rsLoRA / DoRA adapters over minift's frozen linears (16-bit `nn.Linear` or 4-bit `Linear4bit`).

Parameter names are PEFT's (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`), so a
layer's state maps 1:1 onto the keys of PEFT's `adapter_model.safetensors`. Adapters are kept
in float32 and cast to the activations' dtype for compute; the fused `ops.lora_linear` does the
forward and backward whenever dropout is off (dropout must only touch the LoRA input path, as
in PEFT, which the fused op cannot express).

`add_lora` changes the model in place and binds a few methods to it (`disable_adapters`,
`enable_adapters`, `merge_lora`, `unmerge_lora`, `save_adapter`, `save_merged`): bound to the
instance rather than patched onto any class, so other models and libraries are untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from . import ops
from .errors import AdapterError
from .ops.nf4 import NF4Weight

# unsloth's get_peft_regex tags: which part of the model and which component a module path is in.
VISION_TAGS = ("vision", "image", "visual", "patch")
LANGUAGE_TAGS = ("language", "text")
ATTENTION_TAGS = ("self_attn", "attention", "attn")
MLP_TAGS = ("mlp", "feed_forward", "ffn", "dense")
INITS = ("default", "gaussian", "pissa")


def is_4bit(m: nn.Module) -> bool:
    """minift.quant.Linear4bit, duck-typed (its `.nf4` is what the fused op takes)."""
    return hasattr(m, "nf4") and hasattr(m, "dequantize") and hasattr(m, "in_features")


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_4bit(m)


def dense_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A linear's weight as a dense tensor of `dtype` (NF4 dequantised straight to it, exactly)."""
    if is_4bit(base):
        return ops.dequantize_nf4(dataclasses.replace(base.nf4, dtype=dtype))
    return base.weight.detach().to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """x W^T for a 4-bit base: W is dequantised again in backward rather than kept."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base = base
        return F.linear(x, dense_weight(base, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ dense_weight(ctx.base, grad.dtype), None


def frozen_linear(x: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """x W^T (no bias) with the base frozen; gradient for x only."""
    if is_4bit(base):
        return _NF4Matmul.apply(x, base)
    return F.linear(x, base.weight.to(x.dtype))


@dataclass
class LoraSettings:
    """What add_lora / load_adapter set up; save_adapter writes it as adapter_config.json.

    target_modules: as PEFT will read it for the transformers model (module-name suffixes, or
    a regex fullmatched on module paths). modules_to_save: the same, for the full copies.
    rank_pattern / alpha_pattern: PEFT's per-module overrides, kept from a loaded adapter."""

    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "default"
    target_modules: list[str] | str = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraLinear(nn.Module):
    """y = base(x) + scaling * B A dropout(x), or DoRA's magnitude-rescaled form.

    `base_layer` is the frozen original; `weight`, `bias`, `in_features`, `out_features` proxy
    it so code reading `module.weight` keeps working."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0, dora: bool = False):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.r, self.scaling = int(r), float(scaling)
        dev = base.nf4.device if is_4bit(base) else base.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = skip_init(nn.Linear, self.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = skip_init(nn.Linear, r, self.out_features, bias=False, device=dev, dtype=torch.float32)
        mag = nn.Parameter(torch.empty(self.out_features, device=dev, dtype=torch.float32)) if dora else None
        self.register_parameter("lora_magnitude_vector", mag)
        self.disabled = False
        self.merged = False
        self._merge_norm: torch.Tensor | None = None  # DoRA: the norm used at merge, for unmerge

    # -- proxies of the base ---------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def base_weight(self) -> torch.Tensor | NF4Weight:
        """What ops.lora_linear takes: the 16-bit weight or the NF4Weight."""
        return self.base_layer.nf4 if is_4bit(self.base_layer) else self.base_layer.weight

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dense_weight(self.base_layer, dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in float32."""
        return (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()) * self.scaling

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        a, b = self.lora_A.weight, self.lora_B.weight
        drop = self.training and isinstance(self.lora_dropout, nn.Dropout) and self.lora_dropout.p > 0
        base = self.base_weight()
        fusable = isinstance(base, NF4Weight) or (base.dtype == x.dtype and not base.requires_grad)
        if self.lora_magnitude_vector is not None:
            return self._dora_forward(x, drop)
        if fusable and not drop:
            return ops.lora_linear(x, base, a, b, self.scaling, self.bias)
        lora = F.linear(F.linear(self.lora_dropout(x), a.to(x.dtype)), b.to(x.dtype))
        return self.base_layer(x) + self.scaling * lora

    def _dora_forward(self, x: torch.Tensor, drop: bool) -> torch.Tensor:
        """PEFT's DoRA, in PEFT's arithmetic: with m = magnitude / ||W + s B A||_row (the norm
        detached), base(x) + (m - 1) * x' W^T + m * (x' A^T B^T) * s, x' the dropped-out input."""
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        with torch.no_grad():
            norm = torch.linalg.norm(self.dense_weight(torch.float32) + self.delta_weight(), dim=1)
        m = (self.lora_magnitude_vector / norm).to(x.dtype)
        xd = self.lora_dropout(x) if drop else x
        lora = F.linear(F.linear(xd, a), b)
        z = frozen_linear(x, self.base_layer)
        bias = self.bias
        result = z if bias is None else z + bias.to(x.dtype)
        base_result = frozen_linear(xd, self.base_layer) if drop else z
        return result + ((m - 1) * base_result + m * lora * self.scaling)

    # -- merging ----------------------------------------------------------------------------------

    def merged_weight(self) -> torch.Tensor:
        """The merged weight in float32 (the base as it is when already merged)."""
        w = self.dense_weight(torch.float32)
        if self.merged:
            return w
        w = w + self.delta_weight()
        if self.dora:
            w = (self.lora_magnitude_vector.detach().float() / torch.linalg.norm(w, dim=1)).unsqueeze(1) * w
        return w

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if is_4bit(self.base_layer):
            raise AdapterError("merge_lora: a 4-bit base cannot hold merged weights; use save_merged(dir) to write "
                               "a merged 16-bit (or re-quantised) checkpoint instead")
        w = self.base_layer.weight
        new = w.float() + self.delta_weight()
        if self.dora:
            self._merge_norm = torch.linalg.norm(new, dim=1)
            new = (self.lora_magnitude_vector.float() / self._merge_norm).unsqueeze(1) * new
        w.copy_(new.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Exact in float32; in 16-bit up to the one rounding merging made (as PEFT)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        old = w.float()
        if self.dora:
            old = old / (self.lora_magnitude_vector.float() / self._merge_norm).unsqueeze(1)
            self._merge_norm = None
        w.copy_((old - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dora={self.dora}"


class ModulesToSave(nn.Module):
    """A trainable full copy of a module (PEFT's modules_to_save), the frozen original kept for
    `disable_adapters`. `weight`/`bias` and other attributes read through to the active one."""

    def __init__(self, original: nn.Module, trainable: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = trainable
        self.disabled = False

    @property
    def active(self) -> nn.Module:
        return self.original_module if self.disabled else self.modules_to_save

    @property
    def weight(self) -> torch.Tensor:
        return self.active.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.active, "bias", None)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            mods = self.__dict__.get("_modules", {})
            if "modules_to_save" in mods:
                return getattr(mods["modules_to_save"], name)
            raise

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active(*args, **kwargs)


# ---- module paths ---------------------------------------------------------------------------------


def is_vision_model(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "gemma3"


def hf_path(model: nn.Module, path: str) -> str:
    """minift module path → the transformers 5 model's (the SigLIP tower has no `vision_model.` level there)."""
    pre = "model.vision_tower.vision_model."
    if is_vision_model(model) and path.startswith(pre):
        return "model.vision_tower." + path[len(pre):]
    return path


def minift_path(model: nn.Module, path: str) -> str | None:
    """A transformers module path (5's or the original Hub layout's) → this model's, or None."""
    from .arch.vision import canonical_key, text_only_key

    return canonical_key(path) if is_vision_model(model) else text_only_key(path)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            yield name, mod


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, mod in model.named_modules():
        if isinstance(mod, ModulesToSave):
            yield name, mod


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


def _set_module(model: nn.Module, path: str, mod: nn.Module) -> None:
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
        hit = [p for p in cands if rx.fullmatch(p) or rx.fullmatch(hf_path(model, p))]
    elif isinstance(targets, (list, tuple, set)) and targets and all(isinstance(t, str) for t in targets):
        if "lm_head" in targets:
            raise AdapterError("targets: lm_head cannot take a LoRA adapter (the fused loss reads its weight "
                               "directly); train it fully with modules_to_save=['lm_head']")
        hit = [p for p in cands if any(suffix_match(p, t) or suffix_match(hf_path(model, p), t) for t in targets)]
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
    hf_all = [hf_path(model, p) for p in all_paths]
    hf_chosen = {hf_path(model, p) for p in chosen}
    leaves = sorted({p.rsplit(".", 1)[-1] for p in hf_chosen})
    if {p for p in hf_all if any(suffix_match(p, s) for s in leaves)} == hf_chosen:
        return leaves
    pats = sorted({r"\.".join(r"\d+" if c.isdigit() else re.escape(c) for c in p.split(".")) for p in hf_chosen})
    rx = "(?:" + "|".join(pats) + ")"
    if {p for p in hf_all if re.fullmatch(rx, p)} == hf_chosen:
        return rx
    return "(?:" + "|".join(sorted(re.escape(p) for p in hf_chosen)) + ")"


# ---- initialisation -------------------------------------------------------------------------------


@torch.no_grad()
def init_adapter(layer: LoraLinear, init: str, gen: torch.Generator) -> None:
    """PEFT's inits: "default" A ~ Kaiming-uniform(a=sqrt(5)), "gaussian" A ~ N(0, 1/r); B = 0.
    "pissa": A, B from the top-r SVD of W, the base becomes the residual W - s B A.
    A is drawn on the CPU from `gen` so a seed gives the same adapters on any device."""
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if init == "pissa":
        w = layer.base_layer.weight
        U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
        s = S[: layer.r] / layer.scaling
        a.copy_(torch.diag(s.sqrt()) @ Vh[: layer.r])
        b.copy_(U[:, : layer.r] @ torch.diag(s.sqrt()))
        w.copy_((w.float() - layer.scaling * b @ a).to(w.dtype))
        layer.register_buffer("pissa_A", a.detach().clone(), persistent=False)
        layer.register_buffer("pissa_B", b.detach().clone(), persistent=False)
    else:
        cpu = torch.empty(a.shape, dtype=torch.float32)
        if init == "gaussian":
            cpu.normal_(0.0, 1.0 / layer.r, generator=gen)
        else:
            nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=gen)
        a.copy_(cpu)
        b.zero_()
    if layer.dora:
        layer.lora_magnitude_vector.copy_(torch.linalg.norm(layer.dense_weight(torch.float32) + layer.delta_weight(), dim=1))


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
        hit = [p for p, m in mods.items()  # PEFT's rule here is a plain endswith ("norm" takes q_norm too)
               if p and (p.endswith(n) or hf_path(model, p).endswith(n)) and any(True for _ in m.parameters())]
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
        _set_module(model, p, ModulesToSave(mods[p], cp).train(mods[p].training))


def peft_modules_to_save(model: nn.Module, wrapped: list[str], all_paths: list[str]) -> list[str]:
    """Leaf names when they pick exactly the wrapped modules among the model's, else full paths."""
    hf_wrapped = {hf_path(model, p) for p in wrapped}
    leaves = sorted({p.rsplit(".", 1)[-1] for p in hf_wrapped})
    picked = {hf_path(model, p) for p in all_paths if any(hf_path(model, p).endswith(s) for s in leaves)}
    picked = {p for p in picked if not any(p.startswith(q + ".") for q in picked)}
    return leaves if picked == hf_wrapped else sorted(hf_wrapped)


# ---- add_lora ---------------------------------------------------------------------------------------


def check_settings(r: Any, alpha: Any, dropout: Any, init: Any) -> str:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"r: the LoRA rank must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"alpha: must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise AdapterError(f"dropout: must be in [0, 1), got {dropout!r}")
    if init is True:
        init = "default"
    if init not in INITS:
        raise AdapterError(f"init: must be one of {INITS}, got {init!r}")
    return init


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, (LoraLinear, ModulesToSave)) for m in model.modules())


def add_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: str | list[str] = "all-linear",
    vision: bool = True,
    language: bool = True,
    attention: bool = True,
    mlp: bool = True,
    rslora: bool = False,
    dora: bool = False,
    init: str = "default",
    modules_to_save: list[str] | None = None,
    seed: int = 3407,
) -> nn.Module:
    """Adds LoRA adapters to `model` in place (and returns it); everything else is frozen.

    targets: "all-linear" (every decoder / vision-tower linear, not lm_head or the projector),
    module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, out_proj, fc1,
    fc2), or a regex fullmatched on the module path. vision / language / attention / mlp narrow
    it the way unsloth's get_peft_regex does. scaling = alpha / r (alpha / sqrt(r) with rslora).
    init: "default" (PEFT's Kaiming A, zero B), "gaussian", or "pissa" (16-bit bases; the base
    becomes the SVD residual, and the adapter is saved as plain rank-2r LoRA over the original).
    modules_to_save: modules trained in full (e.g. ["embed_tokens", "lm_head"]); see
    `add_modules_to_save` for a tied head. seed: a local generator, the global RNG is untouched.
    """
    init = check_settings(r, alpha, dropout, init)
    if has_adapters(model):
        raise AdapterError("model already has adapters; add_lora / load_adapter work on a model without them")
    all_paths = [n for n, _ in model.named_modules() if n]
    chosen = select_targets(model, targets, vision=vision, language=language, attention=attention, mlp=mlp)
    cands = linear_modules(model)
    if init == "pissa":
        bad = [p for p in chosen if is_4bit(cands[p])]
        if bad:
            raise AdapterError(f"init='pissa' needs 16-bit bases ({bad[0]} is 4-bit): PiSSA rewrites the base "
                               "weight; load the model in 16-bit, or use init='default'")
        if dora:
            raise AdapterError("init='pissa' with dora=True is not supported: the adapter could not be saved as "
                               "plain LoRA over the original base")
    wrapped = match_modules_to_save(model, list(modules_to_save or []), chosen)
    settings = LoraSettings(r=r, alpha=float(alpha), dropout=float(dropout), rslora=rslora, dora=dora, init=init)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed))
    for p in chosen:
        layer = LoraLinear(cands[p], r, settings.scaling, dropout, dora).train(cands[p].training)
        init_adapter(layer, init, gen)
        _set_module(model, p, layer)
    add_modules_to_save(model, wrapped)
    settings.target_modules = peft_target_modules(model, chosen, all_paths)
    settings.modules_to_save = peft_modules_to_save(model, wrapped, all_paths) if wrapped else []
    attach(model, settings)
    return model


# ---- methods bound to the model -------------------------------------------------------------------


class _AdaptersOff:
    """Returned by `model.disable_adapters()`: adapters are already off; leaving a `with`
    block turns them back on."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc: Any) -> None:
        enable_adapters(self.model)


def _set_disabled(model: nn.Module, off: bool) -> None:
    for m in model.modules():
        if isinstance(m, (LoraLinear, ModulesToSave)):
            m.disabled = off


def disable_adapters(model: nn.Module) -> _AdaptersOff:
    """The base model's outputs (merged layers are unmerged first); usable as a context manager."""
    unmerge_lora(model)
    _set_disabled(model, True)
    return _AdaptersOff(model)


def enable_adapters(model: nn.Module) -> None:
    _set_disabled(model, False)


def merge_lora(model: nn.Module) -> None:
    """Folds every adapter into its 16-bit base (in float32, cast once); the forward then skips them."""
    layers = list(lora_layers(model))
    bad = [n for n, m in layers if is_4bit(m.base_layer)]
    if bad:
        raise AdapterError(f"merge_lora: {bad[0]} has a 4-bit base that cannot hold merged weights; "
                           "use save_merged(dir) to write a merged checkpoint instead")
    for _, m in layers:
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.unmerge()


def attach(model: nn.Module, settings: LoraSettings) -> None:
    """Records the settings and binds the adapter methods to this model instance."""
    from . import adapters, merged

    model.lora_settings = settings
    for fn in (disable_adapters, enable_adapters, merge_lora, unmerge_lora,
               adapters.save_adapter, merged.save_merged):
        object.__setattr__(model, fn.__name__, types.MethodType(fn, model))
