"""Gated activations (SwiGLU, GeGLU): Triton kernels with custom autograd.

Forward reads gate and up once and writes act(gate) * up; backward recomputes act(gate) and its
derivative from the saved inputs, so no intermediate is stored. Inputs are read through
(row, column) strides, so `gate, up = gate_up.chunk(2, -1)` views and expanded (stride-0)
gradients need no copies.

No libdevice (the interpreter has none): the sigmoid is written overflow-free from exp, tanh-GELU
uses the identity 0.5 * (1 + tanh(u)) = sigmoid(2u), which also avoids the cancellation of
1 + tanh(u) for negative inputs, and exact GELU uses `tl.math.erf` (a core Triton op on both).
These activation helpers and their ACTIVATIONS codes are also lora_mlp's (ops.lora).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from . import reference as ref
from ._backend import HAS_TRITON, Op, use_triton

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The activations' codes, the ACT constexpr of every kernel that applies one (here and lora_mlp's).
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _sigmoid(x):
        """1 / (1 + exp(-x)) without overflow: exp only ever sees -|x|."""
        e = tl.exp(-tl.abs(x))
        r = 1.0 / (1.0 + e)
        return tl.where(x >= 0, r, e * r)

    @triton.jit
    def _act_fwd(g, ACT: tl.constexpr):
        """act(g) in float32, ACT an ACTIVATIONS code."""
        if ACT == 0:
            f = g * _sigmoid(g)
        elif ACT == 1:
            f = g * _sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))  # 2 * sqrt(2/pi)
        else:
            f = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        return f

    @triton.jit
    def _act_bwd(g, ACT: tl.constexpr):
        """(act(g), act'(g))."""
        if ACT == 0:
            s = _sigmoid(g)
            f = g * s
            df = s * (1.0 + g * (1.0 - s))
        elif ACT == 1:
            s = _sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
            f = g * s
            df = s + g * s * (1.0 - s) * (1.5957691216057308 * (1.0 + 0.134145 * g * g))
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            f = g * cdf
            df = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1 / sqrt(2 pi)
        return f, df

    @triton.jit
    def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's (rows, cols, mask) of an (M, N) grid of (BLOCK_M, BLOCK_N) tiles."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return rows, cols, (rows < M)[:, None] & (cols < N)[None, :]

    @triton.jit
    def _load_f32(P, rows, cols, mask, s_m, s_n):
        return tl.load(P + rows[:, None] * s_m + cols[None, :] * s_n, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _glu_fwd_kernel(G, U, Y, M, N, sg_m, sg_n, su_m, su_n,
                        ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
        g = _load_f32(G, rows, cols, mask, sg_m, sg_n)
        u = _load_f32(U, rows, cols, mask, su_m, su_n)
        y = _act_fwd(g, ACT) * u
        tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(DY, G, U, DG, DU, M, N, sdy_m, sdy_n, sg_m, sg_n, su_m, su_n,
                        ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
        dy = _load_f32(DY, rows, cols, mask, sdy_m, sdy_n)
        g = _load_f32(G, rows, cols, mask, sg_m, sg_n)
        u = _load_f32(U, rows, cols, mask, su_m, su_n)
        f, df = _act_bwd(g, ACT)
        out = rows[:, None] * N + cols[None, :]
        tl.store(DG + out, (dy * u * df).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + out, (dy * f).to(DU.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (rows, last dim) view (a copy only when no view exists); any strides, stride 0 included."""
    return t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)


def _grid(m: int, n: int):
    """(grid, BLOCK_M, BLOCK_N, num_warps): ~4096-element tiles, narrow rows stacked several per tile."""
    block_n = min(triton.next_power_of_2(n), 1024)
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(m)))
    num_warps = 8 if block_m * block_n >= 4096 else 4
    return (triton.cdiv(m, block_m), triton.cdiv(n, block_n)), block_m, block_n, num_warps


def _fwd(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() == 0:
        return out
    g2, u2 = _rows(gate), _rows(up)
    m, n = g2.shape
    grid, bm, bn, nw = _grid(m, n)
    _glu_fwd_kernel[grid](g2, u2, out, m, n, *g2.stride(), *u2.stride(),
                          ACT=ACTIVATIONS[act], BLOCK_M=bm, BLOCK_N=bn, num_warps=nw)
    return out


def _swiglu_impl(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _fwd(gate, up, "silu")


def _geglu_impl(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    return _fwd(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")


def _glu_fake(gate, up, approximate=None):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


def _glu_bwd_impl(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of act(gate) * up, act in 'silu' | 'gelu_tanh' | 'gelu'."""
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel() == 0:
        return dg, du
    dy2, g2, u2 = _rows(dy), _rows(gate), _rows(up)
    m, n = g2.shape
    grid, bm, bn, nw = _grid(m, n)
    _glu_bwd_kernel[grid](dy2, g2, u2, dg, du, m, n, *dy2.stride(), *g2.stride(), *u2.stride(),
                          ACT=ACTIVATIONS[act], BLOCK_M=bm, BLOCK_N=bn, num_warps=nw)
    return dg, du


def _glu_bwd_fake(dy, gate, up, act):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(up.shape, dtype=up.dtype, device=up.device))


_glu_bwd_op = Op("glu_backward", _glu_bwd_impl, _glu_bwd_fake)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.act = "silu"


def _geglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.act = "gelu_tanh" if inputs[2] == "tanh" else "gelu"


def _glu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = _glu_bwd_op(dy, gate, up, ctx.act)
    return (dg, du) + (None,) * (ctx.act != "silu")


_swiglu_op = Op("swiglu", _swiglu_impl, _glu_fake, _swiglu_setup, _glu_backward)
_geglu_op = Op("geglu", _geglu_impl, _glu_fake, _geglu_setup, _glu_backward)


def _check(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    """Shape/dtype/device checks in plain Python (guards under torch.compile, never graph breaks)."""
    if gate.shape != up.shape:
        raise InputError(f"{op}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    for name, t in (("gate", gate), ("up", up)):
        if not t.is_floating_point():
            raise InputError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if up.device != gate.device:
        raise InputError(f"{op}: up is on {up.device} but gate is on {gate.device}")


def _kernel_ok(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return use_triton(gate, elementwise=True) and gate.dtype in _KERNEL_DTYPES and up.dtype in _KERNEL_DTYPES


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32, cast to gate's dtype (float64 uses the reference)."""
    _check("swiglu", gate, up)
    if _kernel_ok(gate, up):
        return _swiglu_op(gate, up)
    return ref.swiglu(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate) * up in fp32, cast to gate's dtype; approximate is 'tanh' (Gemma) or 'none' (erf)."""
    _check("geglu", gate, up)
    if approximate not in ("tanh", "none"):
        raise InputError(f"geglu: approximate must be 'tanh' or 'none', got {approximate!r}")
    if _kernel_ok(gate, up):
        return _geglu_op(gate, up, approximate)
    return ref.geglu(gate, up, approximate)
