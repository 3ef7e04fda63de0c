"""bitsandbytes NF4 weights: the container minift keeps them in, and their dequantisation.

`dequantize_nf4` is bit-identical to `bitsandbytes.functional.dequantize_4bit`: every value is
`code[nibble] * absmax[block]` in float32 (high nibble first), rounded once to the target dtype,
and a nested absmax is `nested_code[q] * nested_absmax[q_block]` then `+ offset`, two separately
rounded float32 ops (the Triton launch disables FMA contraction so the GPU rounds the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError, QuantizationError
from . import reference as ref
from ._backend import HAS_TRITON, INTERPRET, Op, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Packed bytes one Triton program dequantises (8192 outputs) with 2 warps: 64 bytes a thread. An H100
# sweep (512-8192 bytes x 2-16 warps) made this the fastest, at bitsandbytes' speed; 128 bytes a
# thread spills registers and runs 10x slower.
_BYTES_PER_PROGRAM = 4096


@dataclass
class NF4Weight:
    """One NF4-quantised weight in bitsandbytes' layout (what `quantize_4bit` returns and what
    pre-quantised checkpoints store), without bitsandbytes' Params4bit wrapper.

    data:    uint8 packed codes, two 4-bit values a byte, shape (numel // 2, 1) as bitsandbytes stores.
    absmax:  per-block scale, one per `blocksize` values: uint8 when double-quantised (nested),
             else float32.
    code:    the 16-entry NF4 code book (float32), `quant_map` in checkpoints.
    shape:   the dequantised weight's shape (out_features, in_features).
    dtype:   the dtype dequantisation returns (the model's compute dtype).
    blocksize: values per absmax block (64 here).
    nested_absmax / nested_code / nested_blocksize / offset: double quantisation of absmax
             (float32 scales per nested block, 256-entry dynamic code, block size 256, and the
             mean subtracted before quantising). All None when not nested.
    """

    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int | None = None
    offset: torch.Tensor | None = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def to(self, device: torch.device | str) -> "NF4Weight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(
            mv(self.data), mv(self.absmax), mv(self.code), self.shape, self.dtype, self.blocksize,
            mv(self.nested_absmax), mv(self.nested_code), self.nested_blocksize, mv(self.offset),
        )

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self) -> torch.Tensor:
        return dequantize_nf4(self)

    def validate(self, name: str = "weight") -> None:
        """Raise InputError naming `name.<field>` when the fields cannot describe an NF4 weight."""
        _validate(self, name)

    @classmethod
    def from_bnb(cls, data: torch.Tensor, quant_state: Any) -> "NF4Weight":
        """From `quantize_4bit`'s (packed data, QuantState); data stored as another dtype
        (bitsandbytes' `quant_storage`) is reinterpreted as bytes."""
        qs = quant_state
        if getattr(qs, "quant_type", None) != "nf4":
            raise QuantizationError(f"quant_state.quant_type must be 'nf4', got {getattr(qs, 'quant_type', None)!r}")
        if data.dtype != torch.uint8:
            data = data.contiguous().view(torch.uint8)
        data = data.reshape(-1, 1)
        kw: dict[str, Any] = {}
        if qs.nested:
            s2 = qs.state2
            off = qs.offset if isinstance(qs.offset, torch.Tensor) else torch.tensor(float(qs.offset))
            kw = dict(
                nested_absmax=s2.absmax, nested_code=s2.code, nested_blocksize=int(s2.blocksize),
                offset=off.to(device=data.device, dtype=torch.float32),
            )
        w = cls(data, qs.absmax, qs.code, torch.Size(qs.shape), qs.dtype, int(qs.blocksize), **kw)
        w.validate("quant_state")
        return w

    def to_bnb_quant_state(self) -> Any:
        """The equivalent `bitsandbytes.functional.QuantState` (bitsandbytes imported lazily)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(
                absmax=self.nested_absmax, code=self.nested_code, blocksize=self.nested_blocksize, dtype=torch.float32,
            )
        return QuantState(
            absmax=self.absmax, shape=torch.Size(self.shape), code=self.code, blocksize=self.blocksize,
            quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2,
        )


def _validate(w: NF4Weight, name: str) -> None:
    def bad(field: str, why: str) -> InputError:
        return InputError(f"{name}.{field}: {why}")

    if not isinstance(w, NF4Weight):
        raise InputError(f"{name}: expected NF4Weight, got {type(w).__name__}")
    if len(w.shape) == 0 or any(int(s) <= 0 for s in w.shape):
        raise bad("shape", f"must be non-empty with positive sizes, got {tuple(w.shape)}")
    if w.dtype not in _DTYPES:
        raise bad("dtype", f"must be one of {_DTYPES}, got {w.dtype}")
    if w.blocksize not in _BLOCKSIZES:
        raise bad("blocksize", f"must be one of {_BLOCKSIZES}, got {w.blocksize}")
    n = w.numel()
    if w.data.dtype != torch.uint8 or w.data.numel() != (n + 1) // 2:
        raise bad("data", f"must be uint8 with {(n + 1) // 2} bytes for shape {tuple(w.shape)}, "
                          f"got {w.data.dtype} with {w.data.numel()}")
    if w.code.dtype != torch.float32 or w.code.numel() != 16:
        raise bad("code", f"must be 16 float32 values, got {w.code.dtype} with {w.code.numel()}")
    blocks = -(-n // w.blocksize)
    parts = (w.nested_absmax, w.nested_code, w.nested_blocksize, w.offset)
    if any(p is None for p in parts) and any(p is not None for p in parts):
        raise bad("nested_absmax", "nested_absmax, nested_code, nested_blocksize and offset must be all set or all None")
    want_absmax = torch.uint8 if w.nested else torch.float32
    if w.absmax.dtype != want_absmax or w.absmax.numel() != blocks:
        raise bad("absmax", f"must be {want_absmax} with {blocks} blocks, got {w.absmax.dtype} with {w.absmax.numel()}")
    tensors = [("data", w.data), ("absmax", w.absmax), ("code", w.code)]
    if w.nested:
        if not isinstance(w.nested_blocksize, int) or w.nested_blocksize <= 0:
            raise bad("nested_blocksize", f"must be a positive int, got {w.nested_blocksize!r}")
        nb = -(-blocks // w.nested_blocksize)
        if w.nested_absmax.dtype != torch.float32 or w.nested_absmax.numel() != nb:
            raise bad("nested_absmax", f"must be float32 with {nb} values, got {w.nested_absmax.dtype} "
                                       f"with {w.nested_absmax.numel()}")
        if w.nested_code.dtype != torch.float32 or w.nested_code.numel() != 256:
            raise bad("nested_code", f"must be 256 float32 values, got {w.nested_code.dtype} with {w.nested_code.numel()}")
        if w.offset.dtype != torch.float32 or w.offset.numel() != 1:
            raise bad("offset", f"must be one float32 value, got {w.offset.dtype} with {w.offset.numel()}")
        tensors += [("nested_absmax", w.nested_absmax), ("nested_code", w.nested_code), ("offset", w.offset)]
    for field, t in tensors:
        if t.device != w.data.device:
            raise bad(field, f"is on {t.device} but data is on {w.data.device}")


# ---- packing: custom ops take tensors and ints, not dataclasses ---------------------------------

_DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def pack_base(base: torch.Tensor | NF4Weight) -> tuple[list[torch.Tensor], list[int]]:
    """A dense weight or an NF4Weight as (tensors, ints) for a custom op: dense is ([W], []),
    NF4 is ([data, absmax, code(, nested_absmax, nested_code, offset)], [blocksize,
    nested_blocksize or 0, dtype id, *shape])."""
    if isinstance(base, torch.Tensor):
        return [base], []
    ts = [base.data, base.absmax, base.code]
    if base.nested:
        ts += [base.nested_absmax, base.nested_code, base.offset]
    meta = [int(base.blocksize), int(base.nested_blocksize or 0), _DTYPE_IDS[base.dtype], *[int(s) for s in base.shape]]
    return ts, meta


def unpack_nf4(ts: list[torch.Tensor], meta: list[int]) -> NF4Weight:
    nested = len(ts) == 6
    return NF4Weight(
        ts[0], ts[1], ts[2], torch.Size(meta[3:]), _DTYPES[meta[2]], meta[0],
        ts[3] if nested else None, ts[4] if nested else None, meta[1] if nested else None, ts[5] if nested else None,
    )


def base_shape(ts: list[torch.Tensor], meta: list[int]) -> tuple[int, ...]:
    return tuple(ts[0].shape) if not meta else tuple(meta[3:])


def base_weight(ts: list[torch.Tensor], meta: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The dense weight in `dtype`: the tensor itself, or a fresh dequantisation (never cached)."""
    if not meta:
        return ts[0] if ts[0].dtype == dtype else ts[0].to(dtype)
    return _dequantize_impl(ts, meta).to(dtype)


# ---- the kernel -----------------------------------------------------------------------------------


def bf16_bits(out: torch.Tensor) -> bool:
    """Triton's interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even, so
    under it kernels store bfloat16 as hand-rounded int16 bits (see `store_cast`)."""
    return INTERPRET and out.dtype == torch.bfloat16 and out.device.type == "cpu"


def out_arg(out: torch.Tensor) -> torch.Tensor:
    """What to pass a kernel for `out`: an int16 view where `bf16_bits` holds."""
    return out.view(torch.int16) if bf16_bits(out) else out


if HAS_TRITON:

    @triton.jit
    def store_cast(ptr, offs, v, mask, BF16_BITS: tl.constexpr):
        """Store float32 `v` rounded to ptr's dtype; BF16_BITS: ptr is int16, round to nearest even by hand."""
        if BF16_BITS:
            u = v.to(tl.uint32, bitcast=True)
            r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            r = tl.where(v != v, 0x7FC0, r)
            tl.store(ptr + offs, r.to(tl.int16), mask=mask)
        else:
            tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _code16(nib, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
        """code[nib] as a 4-level select tree on the nibble's bits: registers only, where a table
        gather would issue one scattered load per value."""
        b0 = (nib & 1) != 0
        b1 = (nib & 2) != 0
        b2 = (nib & 4) != 0
        l0 = tl.where(b0, c1, c0)
        l1 = tl.where(b0, c3, c2)
        l2 = tl.where(b0, c5, c4)
        l3 = tl.where(b0, c7, c6)
        l4 = tl.where(b0, c9, c8)
        l5 = tl.where(b0, c11, c10)
        l6 = tl.where(b0, c13, c12)
        l7 = tl.where(b0, c15, c14)
        m0 = tl.where(b1, l1, l0)
        m1 = tl.where(b1, l3, l2)
        m2 = tl.where(b1, l5, l4)
        m3 = tl.where(b1, l7, l6)
        lo = tl.where(b2, m1, m0)
        hi = tl.where(b2, m3, m2)
        return tl.where(nib >= 8, hi, lo)

    @triton.jit
    def _nf4_dequant_kernel(
        data_ptr, absmax_ptr, code_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, out_ptr,
        n_bytes, n_out, n_blocks, nested_bs,
        HALF: tl.constexpr, ROWS: tl.constexpr, NESTED: tl.constexpr, BF16_BITS: tl.constexpr,
    ):
        # One row = one absmax block (HALF packed bytes -> 2*HALF outputs): the block's scale is
        # computed once per row (nested dequant included) and broadcast over its values.
        blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        bmask = blk < n_blocks
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=bmask, other=0).to(tl.int32)
            s = tl.load(ncode_ptr + q, mask=bmask, other=0.0) * tl.load(nabsmax_ptr + blk // nested_bs, mask=bmask, other=0.0)
            scale = s + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=bmask, other=0.0)
        byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]
        b = tl.load(data_ptr + byte, mask=byte < n_bytes, other=0, eviction_policy="evict_first").to(tl.int32)
        c0 = tl.load(code_ptr + 0)
        c1 = tl.load(code_ptr + 1)
        c2 = tl.load(code_ptr + 2)
        c3 = tl.load(code_ptr + 3)
        c4 = tl.load(code_ptr + 4)
        c5 = tl.load(code_ptr + 5)
        c6 = tl.load(code_ptr + 6)
        c7 = tl.load(code_ptr + 7)
        c8 = tl.load(code_ptr + 8)
        c9 = tl.load(code_ptr + 9)
        c10 = tl.load(code_ptr + 10)
        c11 = tl.load(code_ptr + 11)
        c12 = tl.load(code_ptr + 12)
        c13 = tl.load(code_ptr + 13)
        c14 = tl.load(code_ptr + 14)
        c15 = tl.load(code_ptr + 15)
        hi = _code16(b >> 4, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15) * scale[:, None]
        lo = _code16(b & 15, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15) * scale[:, None]
        vals = tl.interleave(hi, lo)  # high nibble is the earlier value
        offs = blk[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        store_cast(out_ptr, offs, vals, offs < n_out, BF16_BITS)


def _dequant_triton(ts: list[torch.Tensor], meta: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel on pack_base's (tensors, ints), read in place: no NF4Weight is rebuilt. `out`: a
    contiguous tensor of the weight's size and dtype to write into (default: a new one)."""
    data, absmax, code = ts[0], ts[1], ts[2]
    nested = len(ts) == 6
    blocksize = meta[0]
    if out is None:
        out = torch.empty(meta[3:], dtype=_DTYPES[meta[2]], device=data.device)
    n = out.numel()
    half = blocksize // 2
    rows = max(1, _BYTES_PER_PROGRAM // half)
    blocks = -(-n // blocksize)
    # The kernel reads each tensor as a flat array. Checkpoints' tensors are contiguous already, and a
    # no-op .contiguous() / .reshape() is still a dispatcher call: ~3-8 us each on an H100 machine's
    # host, which a small model's NF4 step (224 dequantisations, host-bound) pays in full.
    c = lambda t: t if t.is_contiguous() else t.contiguous()  # noqa: E731
    nabsmax, ncode, offset = (c(t) for t in ts[3:]) if nested else (code, code, code)
    _nf4_dequant_kernel[(triton.cdiv(blocks, rows),)](
        c(data), c(absmax), c(code), nabsmax, ncode, offset,
        out_arg(out), data.numel(), n, blocks, meta[1] or 1,
        HALF=half, ROWS=rows, NESTED=nested, BF16_BITS=bf16_bits(out), num_warps=2,
        enable_fp_fusion=False,  # keep nested `code * absmax + offset` as bitsandbytes' two roundings
    )
    return out


def _dequantize_impl(ts: list[torch.Tensor], meta: list[int]) -> torch.Tensor:
    if use_triton(ts[0]):
        return _dequant_triton(ts, meta)
    return ref.dequantize_nf4(unpack_nf4(ts, meta))


def _dequantize_fake(ts: list[torch.Tensor], meta: list[int]) -> torch.Tensor:
    return ts[0].new_empty(tuple(meta[3:]), dtype=_DTYPES[meta[2]])


_dequantize_op = Op("dequantize_nf4", _dequantize_impl, _dequantize_fake)


def dequantize_nf4(w: NF4Weight) -> torch.Tensor:
    """The dense weight (shape w.shape, dtype w.dtype), bit-identical to bitsandbytes."""
    _validate(w, "w")
    return _dequantize_op(*pack_base(w))


# ---- several weights, one call -------------------------------------------------------------------
# A compiled layer's 4-bit linears dequantise their weights through one op call per group (see
# quant.Linear4bit.dequantize): each call from a compiled graph costs ~0.1-0.2 ms of host time on
# an H100 machine (dispatcher, custom-op wrapper, launch), which a small model's NF4 step pays
# 224 times (bench/RESULTS.md, U8) while its GPU waits.


def _pack_many(ws: list[NF4Weight], tag: int = 0) -> tuple[list[torch.Tensor], list[int]]:
    """Weights as one (tensors, ints): the tensors back to back, the ints [count, tag, then per
    weight its tensor count, its int count and pack_base's ints]."""
    ts: list[torch.Tensor] = []
    meta = [len(ws), int(tag)]
    for w in ws:
        t, m = pack_base(w)
        ts += t
        meta += [len(t), len(m), *m]
    return ts, meta


def _unpack_many(ts: list[torch.Tensor], meta: list[int]) -> list[tuple[list[torch.Tensor], list[int]]]:
    parts, i, j = [], 0, 2
    for _ in range(meta[0]):
        nt, nm = meta[j], meta[j + 1]
        parts.append((ts[i:i + nt], meta[j + 2:j + 2 + nm]))
        i, j = i + nt, j + 2 + nm
    return parts


def _dequantize_many_impl(ts: list[torch.Tensor], meta: list[int]) -> torch.Tensor:
    parts = _unpack_many(ts, meta)
    if not use_triton(ts[0]):
        return torch.cat([ref.dequantize_nf4(unpack_nf4(t, m)).reshape(-1) for t, m in parts])
    out = torch.empty(sum(math.prod(m[3:]) for _, m in parts), dtype=_DTYPES[parts[0][1][2]], device=ts[0].device)
    start = 0
    for t, m in parts:
        n = math.prod(m[3:])
        _dequant_triton(t, m, out[start:start + n])
        start += n
    return out


def _dequantize_many_fake(ts: list[torch.Tensor], meta: list[int]) -> torch.Tensor:
    parts = _unpack_many(ts, meta)
    return ts[0].new_empty(sum(math.prod(m[3:]) for _, m in parts), dtype=_DTYPES[parts[0][1][2]])


_dequantize_many_op = Op("dequantize_nf4_many", _dequantize_many_impl, _dequantize_many_fake)


def dequantize_nf4_many(ws: list[NF4Weight] | tuple[NF4Weight, ...], *, tag: int = 0) -> torch.Tensor:
    """Several weights of one dtype and device dequantised by one op call: a flat tensor holding
    each `dequantize_nf4(ws[i])` in turn (`ws[i]` is elements [sum of the earlier numels, + its
    numel)), bit for bit. `tag` never changes the result: a compiled graph merges calls with equal
    arguments, so a caller that wants a separate dequantisation of the same weights (a backward
    that should not keep the forward's dense weights alive until it runs) passes another tag."""
    if not isinstance(ws, (list, tuple)) or not ws:
        raise InputError(f"ws: expected a non-empty list of NF4Weight, got {type(ws).__name__} {ws!r:.60}")
    for i, w in enumerate(ws):
        _validate(w, f"ws[{i}]")
        if w.dtype != ws[0].dtype or w.device != ws[0].device:
            raise InputError(f"ws[{i}]: is {w.dtype} on {w.device}, but ws[0] is {ws[0].dtype} on {ws[0].device}; "
                             "one call dequantises weights of one dtype and device")
    return _dequantize_many_op(*_pack_many(list(ws), tag))


# ---- a frozen NF4 linear ---------------------------------------------------------------------------
# What every 4-bit matmul that needs an input gradient runs (a Linear4bit in training, a LoRA layer's
# base): x W^T with W dequantised inside the op in the forward and again in the backward, so no dense
# weight is ever saved for the backward. A custom op (not an autograd.Function holding the module)
# so a compiled layer's graph holds only ops, which lets AOTAutograd's cache keep its forward and
# backward across processes: a warm compile cache then skips tracing the joint graph.


def _in_dtype_meta(meta: list[int], dtype: torch.dtype) -> list[int]:
    return meta if _DTYPES[meta[2]] == dtype else [meta[0], meta[1], _DTYPE_IDS[dtype], *meta[3:]]


def _nf4_linear_impl(x: torch.Tensor, ts: list[torch.Tensor], meta: list[int],
                     bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, _dequantize_impl(ts, _in_dtype_meta(meta, x.dtype)), bias)


def _nf4_linear_fake(x, ts, meta, bias):
    return x.new_empty((*x.shape[:-1], meta[3]))


def _nf4_linear_dx_impl(grad: torch.Tensor, ts: list[torch.Tensor], meta: list[int]) -> torch.Tensor:
    return grad @ _dequantize_impl(ts, _in_dtype_meta(meta, grad.dtype))


def _nf4_linear_dx_fake(grad, ts, meta):
    return grad.new_empty((*grad.shape[:-1], meta[4]))


_nf4_linear_dx_op = Op("nf4_linear_dx", _nf4_linear_dx_impl, _nf4_linear_dx_fake)


def _nf4_linear_setup(ctx, inputs, output):
    x, ts, meta, _ = inputs
    ctx.save_for_backward(*ts)  # the packed weight (held by the module anyway), never a dense one
    ctx.meta, ctx.x_dtype, ctx.n_ts = meta, x.dtype, len(ts)


def _nf4_linear_backward(ctx, grad):
    dx = _nf4_linear_dx_op(grad, list(ctx.saved_tensors), ctx.meta).to(ctx.x_dtype)
    return dx, [None] * ctx.n_ts, None, None


_nf4_linear_op = Op("nf4_linear", _nf4_linear_impl, _nf4_linear_fake, _nf4_linear_setup, _nf4_linear_backward)


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ bias) for a frozen NF4 weight, W dequantised straight to x's dtype (exactly as
    `dequantize_nf4`). Differentiable in x only (the weight and bias are frozen): the backward
    dequantises W again, in the gradient's dtype, rather than keeping the dense weight alive."""
    _validate(w, "w")
    if x.shape[-1] != w.shape[1]:
        raise InputError(f"x: last dimension {x.shape[-1]} does not match w.shape {tuple(w.shape)} (out, in)")
    if x.dtype not in _DTYPES:
        raise InputError(f"x: expected one of {[str(d) for d in _DTYPES]}, got {x.dtype}")
    return _nf4_linear_op(x, *pack_base(w), bias)  # dequantised in x's dtype by the op
