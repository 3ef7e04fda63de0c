"""Fused LoRA linear and LoRA MLP with hand-written backward passes.

Matmuls go to cuBLAS; Triton does the NF4 dequantisation and the MLP's gated activation. Frozen
bases (16-bit or NF4) are never saved: NF4 is dequantised again in the backward. The MLP saves
only x and the gate/up pre-activations; its backward recomputes act(e) * g and both activation
gradients in one fused pass. Adapters may be float32 while compute runs in x's dtype: they are cast
for the matmuls and their gradients come back (scaled in float32) in the adapters' own dtype.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from . import reference as ref
from ._backend import HAS_TRITON, Op, use_triton
from .activations import ACTIVATIONS
from .nf4 import NF4Weight, base_shape, base_weight, bf16_bits, out_arg, pack_base

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .activations import _act_bwd, _act_fwd
    from .nf4 import store_cast

# lora_mlp's activation names -> the activations' (whose ACTIVATIONS codes the op and kernels take)
_MLP_ACTS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
_ACT_NAMES = {code: name for name, code in ACTIVATIONS.items()}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 1024

# ---- gated activation: forward, and fused recompute + backward ----------------------------------

if HAS_TRITON:

    @triton.jit
    def _act_fwd_kernel(e_ptr, g_ptr, h_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr, BF16_BITS: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        e = tl.load(e_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        store_cast(h_ptr, offs, _act_fwd(e, ACT) * g, m, BF16_BITS)

    @triton.jit
    def _act_bwd_kernel(
        dh_ptr, e_ptr, g_ptr, h_ptr, de_ptr, dg_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr, BF16_BITS: tl.constexpr,
    ):
        # h_ptr may be dh_ptr: every element is read before it is overwritten, by the same thread.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        dh = tl.load(dh_ptr + offs, mask=m, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        a, da = _act_bwd(e, ACT)
        store_cast(h_ptr, offs, a * g, m, BF16_BITS)
        store_cast(dg_ptr, offs, dh * a, m, BF16_BITS)
        store_cast(de_ptr, offs, dh * g * da, m, BF16_BITS)


def _gated(e: torch.Tensor, g: torch.Tensor, act: int) -> torch.Tensor:
    """h = act(e) * g, computed in float32, rounded once (act an ACTIVATIONS code)."""
    if use_triton(e):
        return _act_fwd_triton(e, g, act)
    if act == ACTIVATIONS["silu"]:
        return ref.swiglu(e, g)
    return ref.geglu(e, g, "tanh" if act == ACTIVATIONS["gelu_tanh"] else "none")


def _gated_bwd(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, act: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, de, dg) from dh = dL/dh and the saved e, g."""
    if use_triton(e):
        return _act_bwd_triton(dh, e, g, act)
    ef, gf, dhf = e.float(), g.float(), dh.float()
    a, da = ref.act_and_grad(ef, _ACT_NAMES[act])
    return (a * gf).to(e.dtype), (dhf * gf * da).to(e.dtype), (dhf * a).to(e.dtype)


def _act_fwd_triton(e: torch.Tensor, g: torch.Tensor, act: int) -> torch.Tensor:
    h = torch.empty_like(e)
    n = e.numel()
    if n:
        _act_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
            e, g, out_arg(h), n, ACT=act, BLOCK=_BLOCK, BF16_BITS=bf16_bits(h), num_warps=4,
        )
    return h


def _act_bwd_triton(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, act: int):
    """h is written over dh (a private buffer of the backward), de and dg are fresh."""
    de, dg = torch.empty_like(e), torch.empty_like(g)
    n = e.numel()
    if n:
        _act_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            dh, e, g, out_arg(dh), out_arg(de), out_arg(dg), n, ACT=act, BLOCK=_BLOCK, BF16_BITS=bf16_bits(dh), num_warps=4,
        )
    return dh, de, dg


# ---- one projection: y = x W^T (+ bias) + s (x A^T) B^T, and its backward ------------------------


def _proj_fwd(x2, w, a, b, scale: float, bias=None) -> torch.Tensor:
    y = x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
    if a is not None:
        y.addmm_(x2 @ a.t(), b.t(), alpha=scale)
    return y


def _grad_param(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return t.float().mul_(scale).to(dtype)


def _proj_bwd(gy, x2, w, a, b, scale: float, dtypes, dx):
    """Accumulates dL/dx into dx (None: fresh; w None: skip dx) and returns (dx, dA, dB)."""
    if w is not None:
        dx = gy @ w if dx is None else dx.addmm_(gy, w)
    if a is None:
        return dx, None, None
    gb = gy @ b  # (M, r); x A^T is recomputed below rather than saved
    if w is not None:
        dx.addmm_(gb, a, alpha=scale)
    da = _grad_param(gb.t() @ x2, scale, dtypes[0])
    db = _grad_param(gy.t() @ (x2 @ a.t()), scale, dtypes[1])
    return dx, da, db


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


def _no_grads(inputs: tuple) -> list:
    """A None gradient per op input, shaped as register_autograd wants: a list of Nones for a
    tensor list (an empty base meta counts as one), None for everything else."""
    def one(v):
        if isinstance(v, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in v):
            return [None] * len(v)
        return None
    return [one(v) for v in inputs]


# ---- lora_linear ----------------------------------------------------------------------------------


def _lora_linear_impl(
    x: torch.Tensor, base: list[torch.Tensor], meta: list[int], lora_a: torch.Tensor, lora_b: torch.Tensor,
    scale: float, bias: torch.Tensor | None,
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    w = base_weight(base, meta, x.dtype)
    y = _proj_fwd(x2, w, lora_a.to(x.dtype), lora_b.to(x.dtype), scale, _cast(bias, x.dtype))
    return y.view(*x.shape[:-1], y.shape[-1])


def _lora_linear_fake(x, base, meta, lora_a, lora_b, scale, bias):
    return x.new_empty((*x.shape[:-1], lora_b.shape[0]))


def _lora_linear_bwd_impl(
    grad: torch.Tensor, x: torch.Tensor, base: list[torch.Tensor], meta: list[int], lora_a: torch.Tensor,
    lora_b: torch.Tensor, scale: float, need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gy = grad.reshape(-1, grad.shape[-1]).to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    w = base_weight(base, meta, x.dtype) if need_dx else None
    dx, da, db = _proj_bwd(gy, x2, w, lora_a.to(x.dtype), lora_b.to(x.dtype), scale, (lora_a.dtype, lora_b.dtype), None)
    return (dx.view(x.shape) if need_dx else _empty(x)), da, db


def _lora_linear_bwd_fake(grad, x, base, meta, lora_a, lora_b, scale, need_dx):
    return (x.new_empty(x.shape) if need_dx else _empty(x)), lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


_lora_linear_bwd_op = Op("lora_linear_bwd", _lora_linear_bwd_impl, _lora_linear_bwd_fake)


def _lora_linear_setup(ctx, inputs, output):
    x, base, meta, lora_a, lora_b, scale, _ = inputs
    ctx.save_for_backward(x, lora_a, lora_b, *base)
    ctx.meta, ctx.scale, ctx.no_grads = meta, scale, _no_grads(inputs)


def _lora_linear_backward(ctx, grad):
    x, lora_a, lora_b, *base = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = _lora_linear_bwd_op(grad, x, base, ctx.meta, lora_a, lora_b, ctx.scale, need_dx)
    grads = list(ctx.no_grads)
    grads[0], grads[3], grads[4] = (dx if need_dx else None), da, db
    return tuple(grads)


_lora_linear_op = Op("lora_linear", _lora_linear_impl, _lora_linear_fake, _lora_linear_setup, _lora_linear_backward)


# ---- input checks ---------------------------------------------------------------------------------


def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS or x.dim() < 1:
        raise InputError(f"x: expected a float32/bfloat16/float16 tensor with at least 1 dim, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")


def _frozen(t: torch.Tensor, name: str) -> None:
    if t.requires_grad and torch.is_grad_enabled():
        raise InputError(f"{name}: must be frozen (requires_grad=False); only x and the LoRA matrices get gradients")


def _check_proj(x: torch.Tensor, base, lora_a, lora_b, name: str, in_features: int) -> tuple[int, int]:
    """Validate one projection against its input width; returns (out_features, r)."""
    pre = f"{name}." if name else ""
    if isinstance(base, NF4Weight):
        base.validate(f"{pre}base")
        if len(base.shape) != 2:
            raise InputError(f"{pre}base.shape: must be (out_features, in_features), got {tuple(base.shape)}")
        out, inn = int(base.shape[0]), int(base.shape[1])
        dev = base.data.device
    elif isinstance(base, torch.Tensor):
        if base.dim() != 2:
            raise InputError(f"{pre}base: must be (out_features, in_features), got shape {tuple(base.shape)}")
        if base.dtype != x.dtype:
            raise InputError(f"{pre}base: dtype {base.dtype} differs from x's {x.dtype}")
        _frozen(base, f"{pre}base")
        out, inn = base.shape
        dev = base.device
    else:
        raise InputError(f"{pre}base: expected a weight tensor or NF4Weight, got {type(base).__name__}")
    if dev != x.device:
        raise InputError(f"{pre}base: is on {dev} but x is on {x.device}")
    if inn != in_features:
        src = "gate/up's out_features" if name == "down" else "x's last dim"
        raise InputError(f"{pre}base: in_features {inn} != {src} {in_features}")
    if (lora_a is None) != (lora_b is None):
        raise InputError(f"{pre}lora_a/{pre}lora_b: give both or neither")
    if lora_a is None:
        return out, 0
    for nm, t in ((f"{pre}lora_a", lora_a), (f"{pre}lora_b", lora_b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in _FLOATS:
            raise InputError(f"{nm}: expected a 2-D float tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.device != x.device:
            raise InputError(f"{nm}: is on {t.device} but x is on {x.device}")
    r = lora_a.shape[0]
    if lora_a.shape[1] != in_features:
        raise InputError(f"{pre}lora_a: shape {tuple(lora_a.shape)} needs in_features {in_features} as its columns")
    if lora_b.shape[1] != r:
        raise InputError(f"{pre}lora_b: shape {tuple(lora_b.shape)} needs rank {r} (lora_a's rows) as its columns")
    if lora_b.shape[0] != out:
        raise InputError(f"{pre}lora_b: shape {tuple(lora_b.shape)} needs out_features {out} (base's rows)")
    return out, r


def lora_linear(
    x: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T (+ bias) + scale * (x A^T) B^T with W frozen (16-bit, or NF4 dequantised on the
    fly in forward and backward); gradients for x, lora_a (r, in) and lora_b (out, r) only."""
    _check_x(x)
    if lora_a is None or lora_b is None:
        raise InputError("lora_a/lora_b: lora_linear needs both adapter matrices")
    out, _ = _check_proj(x, base, lora_a, lora_b, "", x.shape[-1])
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out,) or bias.device != x.device:
            raise InputError(f"bias: expected shape ({out},) on {x.device}, got {getattr(bias, 'shape', bias)!r}")
        _frozen(bias, "bias")
    ts, meta = pack_base(base)
    return _lora_linear_op(x, ts, meta, lora_a, lora_b, float(scale), bias)


# ---- lora_mlp ---------------------------------------------------------------------------------------


def _lora_mlp_impl(
    x: torch.Tensor,
    g_base: list[torch.Tensor], g_meta: list[int], g_a: torch.Tensor | None, g_b: torch.Tensor | None,
    u_base: list[torch.Tensor], u_meta: list[int], u_a: torch.Tensor | None, u_b: torch.Tensor | None,
    d_base: list[torch.Tensor], d_meta: list[int], d_a: torch.Tensor | None, d_b: torch.Tensor | None,
    scales: list[float], act: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    e = _proj_fwd(x2, base_weight(g_base, g_meta, dt), _cast(g_a, dt), _cast(g_b, dt), scales[0])
    g = _proj_fwd(x2, base_weight(u_base, u_meta, dt), _cast(u_a, dt), _cast(u_b, dt), scales[1])
    h = _gated(e, g, act)
    y = _proj_fwd(h, base_weight(d_base, d_meta, dt), _cast(d_a, dt), _cast(d_b, dt), scales[2])
    return y.view(*x.shape[:-1], y.shape[-1]), e, g


def _lora_mlp_fake(x, g_base, g_meta, g_a, g_b, u_base, u_meta, u_a, u_b, d_base, d_meta, d_a, d_b, scales, act):
    m = math.prod(x.shape[:-1])
    inter = base_shape(g_base, g_meta)[0]
    out = base_shape(d_base, d_meta)[0]
    return x.new_empty((*x.shape[:-1], out)), x.new_empty((m, inter)), x.new_empty((m, inter))


def _lora_mlp_bwd_impl(
    grad: torch.Tensor, x: torch.Tensor, e: torch.Tensor, g: torch.Tensor,
    g_base: list[torch.Tensor], g_meta: list[int], g_a: torch.Tensor | None, g_b: torch.Tensor | None,
    u_base: list[torch.Tensor], u_meta: list[int], u_a: torch.Tensor | None, u_b: torch.Tensor | None,
    d_base: list[torch.Tensor], d_meta: list[int], d_a: torch.Tensor | None, d_b: torch.Tensor | None,
    scales: list[float], act: int, need_dx: bool,
) -> list[torch.Tensor]:
    """[dx, gate dA, dB, up dA, dB, down dA, dB]; empty tensors where not wanted / no adapter."""
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    dy = grad.reshape(-1, grad.shape[-1]).to(dt)
    out: list = []
    # down: dh = dy Wd + s (dy Bd) Ad; then h, de, dg in one fused pass (h lands in dh's buffer).
    a, b = _cast(d_a, dt), _cast(d_b, dt)
    dh = dy @ base_weight(d_base, d_meta, dt)
    if a is not None:
        gb = dy @ b
        dh.addmm_(gb, a, alpha=scales[2])
    h, de, dg = _gated_bwd(dh, e, g, act)
    da = db = None
    if a is not None:  # down's adapter grads need h, which exists only now
        da = _grad_param(gb.t() @ h, scales[2], d_a.dtype)
        db = _grad_param(dy.t() @ (h @ a.t()), scales[2], d_b.dtype)
    del h, dh
    # up then gate, accumulating dx; each base dequantised only while it is needed.
    dx = None
    for i, (bs, mt, pa, pb, d) in enumerate(((u_base, u_meta, u_a, u_b, dg), (g_base, g_meta, g_a, g_b, de))):
        w = base_weight(bs, mt, dt) if need_dx else None
        dx, pda, pdb = _proj_bwd(d, x2, w, _cast(pa, dt), _cast(pb, dt), scales[1 - i], _dtypes(pa, pb), dx)
        out = [pda, pdb] + out
    res = [dx.view(x.shape) if need_dx else None, *out, da, db]
    return [_empty(x) if t is None else t for t in res]


def _dtypes(a, b):
    return (None, None) if a is None else (a.dtype, b.dtype)


def _lora_mlp_bwd_fake(grad, x, e, g, g_base, g_meta, g_a, g_b, u_base, u_meta, u_a, u_b, d_base, d_meta, d_a, d_b,
                       scales, act, need_dx):
    res = [x.new_empty(x.shape) if need_dx else _empty(x)]
    for t in (g_a, g_b, u_a, u_b, d_a, d_b):
        res.append(_empty(x) if t is None else t.new_empty(t.shape))
    return res


_lora_mlp_bwd_op = Op("lora_mlp_bwd", _lora_mlp_bwd_impl, _lora_mlp_bwd_fake)


def _lora_mlp_setup(ctx, inputs, output):
    x, *proj = inputs[:13]
    _, e, g = output
    bases = [proj[0], proj[4], proj[8]]
    ctx.lens = [len(bs) for bs in bases]
    ctx.metas = [proj[1], proj[5], proj[9]]
    ctx.scales, ctx.act, ctx.no_grads = inputs[13], inputs[14], _no_grads(inputs)
    ctx.save_for_backward(x, e, g, proj[2], proj[3], proj[6], proj[7], proj[10], proj[11], *bases[0], *bases[1], *bases[2])


def _lora_mlp_backward(ctx, grad, _grad_e, _grad_g):
    x, e, g, ga, gb, ua, ub, da, db, *flat = ctx.saved_tensors
    n0, n1, _ = ctx.lens
    bases = [flat[:n0], flat[n0:n0 + n1], flat[n0 + n1:]]
    gm, um, dm = ctx.metas
    need_dx = ctx.needs_input_grad[0]
    res = _lora_mlp_bwd_op(
        grad, x, e, g, bases[0], gm, ga, gb, bases[1], um, ua, ub, bases[2], dm, da, db, ctx.scales, ctx.act, need_dx,
    )
    grads = list(ctx.no_grads)
    grads[0] = res[0] if need_dx else None
    for i, (pos, t) in enumerate(zip((3, 4, 7, 8, 11, 12), (ga, gb, ua, ub, da, db))):
        grads[pos] = None if t is None else res[1 + i]
    return tuple(grads)


_lora_mlp_op = Op("lora_mlp", _lora_mlp_impl, _lora_mlp_fake, _lora_mlp_setup, _lora_mlp_backward)


def _scales(scale) -> list[float]:
    if isinstance(scale, (tuple, list)):
        if len(scale) != 3:
            raise InputError(f"scale: one float or three (gate, up, down), got {len(scale)}")
        return [float(s) for s in scale]
    return [float(scale)] * 3


def lora_mlp(
    x: torch.Tensor,
    gate: tuple,
    up: tuple,
    down: tuple,
    activation: str = "swiglu",
    scale: float | tuple[float, float, float] = 1.0,
) -> torch.Tensor:
    """down(act(gate(x)) * up(x)), each projection a (base, lora_a, lora_b) LoRA linear without bias
    (base 16-bit or NF4Weight; lora_a/lora_b None for no adapter). activation: 'swiglu', 'geglu'
    (erf GELU) or 'geglu_tanh'. Gradients for x and every adapter matrix."""
    _check_x(x)
    if activation not in _MLP_ACTS:
        raise InputError(f"activation: must be one of {tuple(_MLP_ACTS)}, got {activation!r}")
    projs = {"gate": gate, "up": up, "down": down}
    for nm, p in projs.items():
        if not isinstance(p, (tuple, list)) or len(p) != 3:
            raise InputError(f"{nm}: expected (base, lora_a, lora_b), got {type(p).__name__}")
    inter, _ = _check_proj(x, *gate, "gate", x.shape[-1])
    inter_up, _ = _check_proj(x, *up, "up", x.shape[-1])
    if inter_up != inter:
        raise InputError(f"up.base: out_features {inter_up} != gate's {inter}")
    _check_proj(x, *down, "down", inter)
    args = []
    for p in (gate, up, down):
        ts, meta = pack_base(p[0])
        args += [ts, meta, p[1], p[2]]
    y, _, _ = _lora_mlp_op(x, *args, _scales(scale), ACTIVATIONS[_MLP_ACTS[activation]])
    return y
