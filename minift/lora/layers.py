"""The LoRA layers (LoRA / rsLoRA over a frozen 16-bit `nn.Linear` or 4-bit `Linear4bit`, and
DoRA as a subclass), the modules_to_save wrapper, and PEFT's initialisations.

Parameter names are PEFT's (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`), so a
layer's state maps 1:1 onto the keys of PEFT's `adapter_model.safetensors`. Adapters are kept
in float32 and cast to the activations' dtype for compute. A layer runs as plain matmuls unless
its `fuse` flag is set (`add_lora(fuse=True)`): then `ops.lora_linear` does the forward and
backward whenever dropout is off (dropout must only touch the LoRA input path, as in PEFT, which
the fused op cannot express). DoRA follows PEFT's arithmetic term for term.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from .. import ops
from ..errors import AdapterError
from ..ops.nf4 import NF4Weight
from ..quant import Linear4bit


def is_4bit(m: nn.Module) -> bool:
    return isinstance(m, Linear4bit)


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_4bit(m)


def dense_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A linear's weight as a dense tensor of `dtype` (NF4 dequantised straight to it, exactly)."""
    if is_4bit(base):
        return base.dequantize(dtype)
    return base.weight.detach().to(dtype)


def frozen_linear(x: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """x W^T (no bias) with the base frozen; gradient for x only (a 4-bit W is dequantised again
    in the backward rather than kept)."""
    if is_4bit(base):
        if torch.is_grad_enabled() and x.requires_grad:
            return ops.nf4_linear(x, base.nf4)
        return base.frozen_matmul(x)  # decoding: the NF4 matmul kernel for a few rows
    return ops.linear(x, base.weight.to(x.dtype))


class LoraLinear(nn.Module):
    """y = base(x) + scaling * B A dropout(x).

    `base_layer` is the frozen original; `weight`, `bias`, `in_features`, `out_features` proxy
    it so code reading `module.weight` keeps working. `fuse`: run through the fused custom op
    `ops.lora_linear` (and, in an MLP whose three projections fuse, `ops.lora_mlp`)."""

    dora = False

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0, *, fuse: bool = False):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.r, self.scaling = int(r), float(scaling)
        dev = base.nf4.device if is_4bit(base) else base.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = skip_init(nn.Linear, self.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = skip_init(nn.Linear, r, self.out_features, bias=False, device=dev, dtype=torch.float32)
        self.fuse = bool(fuse)
        self.disabled = False
        self.merged = False

    # -- proxies of the base ---------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor | NF4Weight:
        """What ops.lora_linear takes: the 16-bit weight or the NF4Weight."""
        return self.base_layer.nf4 if is_4bit(self.base_layer) else self.base_layer.weight

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dense_weight(self.base_layer, dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in float32."""
        return (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()) * self.scaling

    def _dropping(self) -> bool:
        return self.training and isinstance(self.lora_dropout, nn.Dropout) and self.lora_dropout.p > 0

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        a, b = self.lora_A.weight, self.lora_B.weight
        bias = self.bias
        if bias is None and is_4bit(self.base_layer) and x.numel() == x.shape[-1] and not self._dropping():
            # one row (decoding) on a 4-bit base: the adapter in the NF4 GEMV's epilogue, same rounding
            return ops.nf4_matmul(x, self.base_layer.nf4, low_rank=(a, b, self.scaling))
        if self.fuse and not self._dropping() and self._fusable_base(x) and (bias is None or not bias.requires_grad):
            return ops.lora_linear(x, self.base_weight(), a, b, self.scaling, bias)
        lora = F.linear(F.linear(self.lora_dropout(x), a.to(x.dtype)), b.to(x.dtype))
        y = frozen_linear(x, self.base_layer)  # (a 4-bit W is not kept for backward)
        return (y if bias is None else y + bias.to(x.dtype)) + self.scaling * lora

    def decode_parts(self) -> tuple | None:
        """(weight, bias, (A, B, scaling)) for the model's fused decoding kernels, which compute this
        layer's forward for one row in the base's GEMV (`ops.gemv(low_rank=)`); the base's own parts when
        the adapter is off or merged; None for a base those kernels do not take (4-bit) or while
        dropout is active."""
        get = getattr(self.base_layer, "decode_parts", None)
        base = get() if get is not None else None
        if base is None or self.disabled or self.merged:
            return base
        if self._dropping():
            return None
        return base[0], base[1], (self.lora_A.weight, self.lora_B.weight, self.scaling)

    def _fusable_base(self, x: torch.Tensor) -> bool:
        """The fused ops take a frozen base in x's dtype, or an NF4 one."""
        base = self.base_weight()
        return isinstance(base, NF4Weight) or (base.dtype == x.dtype and not base.requires_grad)

    def fused_parts(self, x: torch.Tensor) -> tuple[tuple, float] | None:
        """((base, lora_A, lora_B), scaling) when this layer's forward is exactly a plain fused LoRA
        linear without bias or dropout, so the MLP around it may fuse all three (ops.lora_mlp)."""
        if not self.fuse or self.disabled or self.merged or self.bias is not None or self._dropping():
            return None
        if not self._fusable_base(x):
            return None
        return (self.base_weight(), self.lora_A.weight, self.lora_B.weight), self.scaling

    # -- merging ----------------------------------------------------------------------------------

    def merged_weight(self) -> torch.Tensor:
        """The merged weight in float32 (the base as it is when already merged)."""
        w = self.dense_weight(torch.float32)
        return w if self.merged else w + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the adapter into the 16-bit base in float32, cast once."""
        if self.merged:
            return
        if is_4bit(self.base_layer):
            raise AdapterError("merge_lora: a 4-bit base cannot hold merged weights; use save_merged(dir) to write "
                               "a merged 16-bit (or re-quantised) checkpoint instead")
        w = self.base_layer.weight
        w.copy_(self._fold(w.float()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Exact in float32; in 16-bit up to the one rounding merging made (as PEFT)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_(self._unfold(w.float()).to(w.dtype))
        self.merged = False

    def _fold(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta_weight()

    def _unfold(self, w: torch.Tensor) -> torch.Tensor:
        return w - self.delta_weight()

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dora={self.dora}"


class DoraLinear(LoraLinear):
    """PEFT's DoRA: the LoRA-updated weight's rows rescaled to a trained magnitude vector, in
    PEFT's arithmetic term for term. Never fused (the row norm needs the dense weight)."""

    dora = True

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0, *, fuse: bool = False):
        super().__init__(base, r, scaling, dropout, fuse=False)
        dev = self.lora_A.weight.device
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=dev, dtype=torch.float32))
        self._merge_norm: torch.Tensor | None = None  # the norm used at merge, for unmerge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """With m = magnitude / ||W + s B A||_row (the norm detached):
        base(x) + (m - 1) * x' W^T + m * (x' A^T B^T) * s, x' the dropped-out input."""
        if self.disabled or self.merged:
            return self.base_layer(x)
        drop = self._dropping()
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

    def fused_parts(self, x: torch.Tensor) -> None:
        return None

    def decode_parts(self) -> tuple | None:
        """The base's parts while the adapter is off or merged; else None (the kernels hold no
        magnitude rescaling)."""
        return super().decode_parts() if self.disabled or self.merged else None

    def merged_weight(self) -> torch.Tensor:
        w = super().merged_weight()
        if self.merged:
            return w
        return (self.lora_magnitude_vector.detach().float() / torch.linalg.norm(w, dim=1)).unsqueeze(1) * w

    def _fold(self, w: torch.Tensor) -> torch.Tensor:
        new = w + self.delta_weight()
        self._merge_norm = torch.linalg.norm(new, dim=1)
        return (self.lora_magnitude_vector.float() / self._merge_norm).unsqueeze(1) * new

    def _unfold(self, w: torch.Tensor) -> torch.Tensor:
        old = w / (self.lora_magnitude_vector.float() / self._merge_norm).unsqueeze(1)
        self._merge_norm = None
        return old - self.delta_weight()


def make_layer(base: nn.Module, r: int, scaling: float, dropout: float = 0.0, *, dora: bool = False,
               fuse: bool = False) -> LoraLinear:
    """A LoRA (or, with `dora`, DoRA) layer over `base`, in `base`'s train/eval mode."""
    cls = DoraLinear if dora else LoraLinear
    return cls(base, r, scaling, dropout, fuse=fuse).train(base.training)


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
