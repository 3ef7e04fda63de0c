"""Parameter groups, optimizers and learning-rate schedules.

The schedules reproduce transformers' get_linear / get_cosine / get_constant_schedule_with_warmup
formulas exactly (as LambdaLR multipliers), so a run matches an HF/TRL run step for step.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..errors import TrainConfigError
from .config import TrainConfig

EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_out")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter, each once (tied weights appear once)."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def is_embedding(name: str) -> bool:
    return any(part in EMBEDDING_NAMES for part in name.split("."))


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Up to four groups: {matrices, vectors} x {body, embeddings}. Vectors (biases, norms) get
    no weight decay; embeddings / lm_head (modules_to_save) get `embedding_lr` when it is set."""
    named = trainable_parameters(model)
    if not named:
        raise TrainConfigError(
            "the model has no trainable parameters: add adapters with minift.add_lora(model, ...) or load it with "
            "minift.load(..., full_finetuning=True)"
        )
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    names: dict[tuple[bool, bool], list[str]] = {}
    for name, p in named:
        key = (cfg.embedding_lr is not None and is_embedding(name), p.ndim >= 2)
        groups.setdefault(key, []).append(p)
        names.setdefault(key, []).append(name)
    out = []
    for (emb, decay), params in groups.items():
        out.append({
            "params": params,
            "lr": cfg.embedding_lr if emb else cfg.lr,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "names": names[(emb, decay)],
            "group": ("embedding" if emb else "body") + ("" if decay else "_no_decay"),
        })
    return out


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA, foreach on CPU), bitsandbytes AdamW8bit, or SGD."""
    groups = param_groups(model, cfg)
    for g in groups:
        g.pop("names")
    params = [p for g in groups for p in g["params"]]
    on_cuda = all(p.is_cuda for p in params)
    if cfg.optimizer == "adamw":
        kw: dict[str, Any] = dict(lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        if on_cuda:
            kw["fused"] = True
        else:
            kw["foreach"] = True
        return torch.optim.AdamW(groups, **kw)
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
            raise TrainConfigError("optimizer='adamw_8bit' needs bitsandbytes (pip install bitsandbytes)") from e
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                   weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def _linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _cosine(step: int, warmup: int, total: int, num_cycles: float = 0.5) -> float:
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def _constant(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    return 1.0


SCHEDULES = {"linear": _linear, "cosine": _cosine, "constant": _constant}


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """warmup_steps if set, else ceil(warmup_ratio * total) (transformers' get_warmup_steps)."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> LambdaLR:
    """LambdaLR with the multiplier of cfg.scheduler; stepped once per optimizer step."""
    fn = partial(SCHEDULES[cfg.scheduler], warmup=warmup_steps(cfg, total), total=total)
    return LambdaLR(optimizer, fn)
