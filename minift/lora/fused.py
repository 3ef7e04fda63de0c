"""The fused LoRA MLP: when the gate, up and down projections of a decoder MLP are all plain
fused LoRA layers, one `ops.lora_mlp` call with a hand-derived backward that saves only x and
the two pre-activations, never a dequantised weight. Off by default (`add_lora(fuse=True)`):
with each decoder layer compiled, plain matmuls that inductor sees into measured as fast or
faster (bench/RESULTS.md: 4-bit Gemma-3-4B 14.2k vs 12.8k tokens/s on an H100).

The decoder's `MLP` knows nothing of LoRA: `set_fused` swaps each MLP for a `FusedLoraMLP`
holding the same child modules (so every parameter keeps its name) and back.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..arch.model import MLP
from .layers import LoraLinear

_MLP_ACTIVATIONS = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu_tanh", "gelu": "geglu"}


class FusedLoraMLP(MLP):
    """An `MLP` that runs as one `ops.lora_mlp` whenever its three projections allow it."""

    def __init__(self, mlp: MLP):
        nn.Module.__init__(self)
        self.act, self.chunk_tokens, self.chunk_fn = mlp.act, mlp.chunk_tokens, mlp.chunk_fn
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.train(mlp.training)

    def forward(self, x: torch.Tensor, post_norm: nn.Module | None = None) -> torch.Tensor:
        if self.chunks(x):  # long context: the plain MLP's token chunks, each projection still fused
            return super().forward(x, post_norm)
        parts = []
        for proj in (self.gate_proj, self.up_proj, self.down_proj):
            p = proj.fused_parts(x) if isinstance(proj, LoraLinear) else None
            if p is None:
                return super().forward(x, post_norm)
            parts.append(p)
        y = ops.lora_mlp(x, *(p for p, _ in parts), activation=_MLP_ACTIVATIONS[self.act],
                         scale=tuple(s for _, s in parts))
        return y if post_norm is None else post_norm(y)

    def unfused(self) -> MLP:
        """A plain MLP over the same modules."""
        plain = MLP.__new__(MLP)
        nn.Module.__init__(plain)
        plain.act, plain.chunk_tokens, plain.chunk_fn = self.act, self.chunk_tokens, self.chunk_fn
        plain.gate_proj, plain.up_proj, plain.down_proj = self.gate_proj, self.up_proj, self.down_proj
        return plain.train(self.training)


def set_fused(model: nn.Module, fuse: bool) -> None:
    """Routes every LoRA layer through the fused custom ops (`ops.lora_linear`, and `ops.lora_mlp`
    for MLPs whose three projections fuse) or back to plain matmuls. Same function either way."""
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.fuse = bool(fuse) and not m.dora
    swaps = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MLP)
             and isinstance(mod, FusedLoraMLP) != bool(fuse)]
    for name, mod in swaps:
        parent, _, attr = name.rpartition(".")
        new = FusedLoraMLP(mod) if fuse else mod.unfused()
        setattr(model.get_submodule(parent) if parent else model, attr, new)
