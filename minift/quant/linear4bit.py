"""`Linear4bit`: a frozen linear layer holding one NF4 weight in bitsandbytes' exact layout, and
`FrozenNF4Linear`, the autograd function every 4-bit matmul (plain or under LoRA) goes through.
Dequantisation is `minift.ops.dequantize_nf4`, bit-identical to bitsandbytes'; bitsandbytes
itself is not needed to run a 4-bit model, only to quantise one (`minift.quant.bnb`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import QuantizationError
from ..ops.nf4 import NF4Weight

BLOCKSIZE = 64  # bitsandbytes' NF4 block, what minift writes and what its checkpoints use
NESTED_BLOCKSIZE = 256  # what bitsandbytes' double quantisation uses
# The large packed tensors (codes, block scales): what FSDP2 must shard, so `hold_packed_as_parameters`
# makes them parameters. Their uint8 bytes are then held in a 1-byte float view, since torch < 2.13's
# fully_shard makes every sharded parameter with requires_grad=True first, which integer tensors refuse.
PACKED = ("weight", "absmax")
BYTE_VIEW = torch.float8_e4m3fn
# Inputs of at most this many rows (all dims but the last, flattened) without an input gradient run
# `ops.nf4_matmul`, which reads the packed weight once (~0.52 bytes a weight) where dequantise + GEMM
# moves ~4.5: decoding's one token a sequence. Its kernel pads x to 16 rows (the MMA's smallest
# side), so 1 to 16 rows cost the same; more rows keep dequantise + F.linear, a GEMM's territory.
NF4_MATMUL_MAX_ROWS = 16


def as_bytes(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t`'s bytes as uint8 where it is a BYTE_VIEW (a packed tensor held as a parameter), else `t`."""
    return t.view(torch.uint8) if t is not None and t.dtype == BYTE_VIEW else t


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is one NF4 tensor in bitsandbytes' layout.

    Everything lives in buffers (so `.to(device)` and `state_dict` carry it; under FSDP2 the
    packed two are parameters, `hold_packed_as_parameters`): `weight` (packed
    uint8, two codes a byte, shape (numel/2, 1) like bitsandbytes' Params4bit), `absmax`,
    `quant_map` (the 16 NF4 levels) and, when double-quantised, `nested_absmax`,
    `nested_quant_map` and `offset`. The public surface LoRA builds on: `nf4`, `bias`,
    `in_features`, `out_features`. Casting the module (`.to(torch.bfloat16)`) changes only the
    compute dtype and the bias: the statistics keep their dtypes so dequantisation stays exact.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: torch.dtype = torch.float32,
        blocksize: int = BLOCKSIZE,
        nested_blocksize: int | None = NESTED_BLOCKSIZE,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.blocksize, self.nested_blocksize = compute_dtype, blocksize, nested_blocksize
        n = in_features * out_features
        blocks = -(-n // blocksize)
        nested = nested_blocksize is not None
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("weight", torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        absmax_dtype = torch.uint8 if nested else torch.float32
        self.register_buffer("absmax", torch.empty(blocks, dtype=absmax_dtype, device=device))
        self.register_buffer("quant_map", torch.empty(16, **f32))
        self.register_buffer("nested_absmax", torch.empty(-(-blocks // nested_blocksize), **f32) if nested else None)
        self.register_buffer("nested_quant_map", torch.empty(256, **f32) if nested else None)
        self.register_buffer("offset", torch.empty((), **f32) if nested else None)
        b = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        self.register_parameter("bias", b if bias else None)

    @classmethod
    def from_nf4(cls, w: NF4Weight, bias: torch.Tensor | None = None) -> "Linear4bit":
        """A module around an existing NF4 weight (e.g. `NF4Weight.from_bnb(*quantize_4bit(W))`)."""
        out_f, in_f = (int(s) for s in w.shape)
        m = cls(in_f, out_f, bias is not None, compute_dtype=w.dtype, blocksize=w.blocksize,
                nested_blocksize=w.nested_blocksize, device="meta")
        m.set_nf4(w)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(w.dtype), requires_grad=False)
        return m

    @property
    def nf4(self) -> NF4Weight:
        return NF4Weight(
            as_bytes(self.weight), as_bytes(self.absmax), self.quant_map, torch.Size((self.out_features, self.in_features)),
            self.compute_dtype, self.blocksize, self.nested_absmax, self.nested_quant_map,
            self.nested_blocksize, self.offset,
        )

    def set_nf4(self, w: NF4Weight) -> None:
        """Adopt `w`'s tensors (its dtype becomes the compute dtype)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise QuantizationError(
                f"NF4 weight of shape {tuple(w.shape)} does not fit Linear4bit({self.in_features}, {self.out_features})"
            )
        self._buffers.update(
            weight=w.data, absmax=w.absmax, quant_map=w.code, nested_absmax=w.nested_absmax,
            nested_quant_map=w.nested_code, offset=w.offset,
        )
        self.blocksize, self.nested_blocksize, self.compute_dtype = w.blocksize, w.nested_blocksize, w.dtype

    @property
    def siblings(self) -> tuple["Linear4bit", ...]:
        """The group this linear's weight is dequantised with under torch.compile (`group_siblings`),
        itself included; (self,) without one."""
        group = self.__dict__.get("_siblings")
        return group[0] if group is not None else (self,)

    def dequantize(self, dtype: torch.dtype | None = None, *, again: bool = False) -> torch.Tensor:
        """The dense (out_features, in_features) weight in `dtype` (default: the compute dtype),
        dequantised straight to it, exactly; fresh, never cached.

        While torch.compile traces, it is one `dequantize_nf4_many` call over this linear alone,
        or, once linked by `group_siblings` (opt-in), this linear's part of a call over its
        siblings, which the compiler merges into one call a group a pass. `again` (the backward's
        dequantisation) keeps the backward's call apart from the forward's, so the compiled graph
        dequantises again instead of keeping the dense weights alive from the forward to the
        backward (a whole layer's, in 16 bits, for every layer not checkpointed)."""
        dtype = dtype or self.compute_dtype
        if torch.compiler.is_compiling():
            mods, i = self.__dict__.get("_siblings") or ((self,), 0)
            if any(m.weight.device != self.weight.device for m in mods):
                mods, i = (self,), 0
            flat = ops.dequantize_nf4_many([_in_dtype(m.nf4, dtype) for m in mods], tag=int(again))
            start = sum(m.in_features * m.out_features for m in mods[:i])
            return flat[start:start + self.in_features * self.out_features].view(self.out_features, self.in_features)
        return ops.dequantize_nf4(_in_dtype(self.nf4, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            # Dequantise again in backward instead of keeping a dense 16-bit weight per layer alive.
            return FrozenNF4Linear.apply(x.to(self.compute_dtype), self, bias).to(x.dtype)
        return self.frozen_matmul(x.to(self.compute_dtype), bias).to(x.dtype)

    def frozen_matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias) without a gradient for x: `ops.nf4_matmul` for a few rows (decoding),
        dequantise + GEMM for more."""
        if 0 < x.numel() <= NF4_MATMUL_MAX_ROWS * x.shape[-1]:
            return ops.nf4_matmul(x, self.nf4, bias)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def hold_packed_as_parameters(self) -> None:
        """The PACKED tensors become frozen parameters (uint8 ones in the BYTE_VIEW), for FSDP2,
        which shards parameters and replicates buffers; `nf4` views them back, `_apply` never casts
        them. The small tables (code maps, nested scales, offset) stay buffers. Idempotent."""
        for name in PACKED:
            if name in self._buffers:
                t = self._buffers.pop(name)
                t = t.view(BYTE_VIEW) if t.dtype == torch.uint8 else t
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "Linear4bit":
        before = dict(self._buffers)
        # packed tensors held as parameters (hold_packed_as_parameters): moved, never cast
        packed = {k: self._parameters[k].detach() for k in PACKED if self._parameters.get(k) is not None}
        super()._apply(fn, recurse)
        for k, old in before.items():
            new = self._buffers[k]
            if old is not None and new.dtype != old.dtype:  # a dtype cast: keep the exact statistics
                if k == "quant_map":
                    self.compute_dtype = new.dtype
                self._buffers[k] = old.to(new.device)
        for k, old in packed.items():
            new = self._parameters[k]
            if new.dtype != old.dtype:
                self._parameters[k] = nn.Parameter(old.to(new.device), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, nested={self.nested_blocksize is not None}, "
                f"compute_dtype={self.compute_dtype}")


class FrozenNF4Linear(torch.autograd.Function):
    """x W^T (+ b) for a frozen 4-bit `base` (a Linear4bit), W dequantised to x's dtype: nothing of W
    is saved; the input gradient dequantises it again. Used by Linear4bit and by LoRA over it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.base = base
        return F.linear(x, base.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.base.dequantize(grad.dtype, again=True), None, None


def _in_dtype(w: NF4Weight, dtype: torch.dtype) -> NF4Weight:
    return w if w.dtype == dtype else dataclasses.replace(w, dtype=dtype)


def group_siblings(model: nn.Module) -> None:
    """Opt-in: links the Linear4bit children of each module (a layer's q/k/v/o, its gate/up/down)
    as siblings, whose weights a compiled forward or backward dequantises in one call
    (`Linear4bit.dequantize`): 2 op calls a layer a pass instead of 7. Not the default: on an H100
    (bench/RESULTS.md, 2026-12-07) it left Llama-3.2-1B NF4 training at the same speed (54.1k vs
    54.0k tokens/s, the host time goes elsewhere) and raised its peak by 0.06 GiB (a whole MLP's
    weights dequantised at once). Call it before compiling. Any grouping is correct, each linear
    reads only its own part."""
    for parent in model.modules():
        kids = [m for m in parent.children() if isinstance(m, Linear4bit)]
        if len(kids) < 2:
            continue
        mods = tuple(kids)
        for i, m in enumerate(mods):
            m.__dict__["_siblings"] = (mods, i)  # a plain attribute: not registered as submodules


def bits_per_weight(m: Linear4bit) -> float:
    """Storage of a Linear4bit's weight (bias excluded) in bits per weight: ~4.13 at scale."""
    n = sum(b.numel() * b.element_size() for b in m.buffers())
    return 8 * n / math.prod((m.out_features, m.in_features))
