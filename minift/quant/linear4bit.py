"""`Linear4bit`: a frozen linear layer holding one NF4 weight in bitsandbytes' exact layout. Its
matmuls with an input gradient (plain or under LoRA) run `minift.ops.nf4_linear`, which never
keeps a dense weight for the backward. Dequantisation is `minift.ops.dequantize_nf4`,
bit-identical to bitsandbytes'; bitsandbytes itself is not needed to run a 4-bit model, only to
quantise one (`minift.quant.bnb`)."""

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

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out_features, in_features) weight in `dtype` (default: the compute dtype),
        dequantised straight to it, exactly; fresh, never cached."""
        return ops.dequantize_nf4(_in_dtype(self.nf4, dtype or self.compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            # Dequantise again in backward instead of keeping a dense 16-bit weight per layer alive.
            return ops.nf4_linear(x.to(self.compute_dtype), self.nf4, bias).to(x.dtype)
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


def _in_dtype(w: NF4Weight, dtype: torch.dtype) -> NF4Weight:
    return w if w.dtype == dtype else dataclasses.replace(w, dtype=dtype)


def bits_per_weight(m: Linear4bit) -> float:
    """Storage of a Linear4bit's weight (bias excluded) in bits per weight: ~4.13 at scale."""
    n = sum(b.numel() * b.element_size() for b in m.buffers())
    return 8 * n / math.prod((m.out_features, m.in_features))
