"""Triton kernels for cross-entropy over a large vocabulary, and their launchers.

One program per row walks the vocabulary in blocks of BLOCK_V with an online logsumexp, so
V = 262,208 needs no fp32 copy of the logits: each element is read once in the forward and
read + written once in the gradient pass. Maths is fp32 whatever the storage dtype.
Rows whose label is ignore_index skip the forward read entirely (the loop runs 0 times) and
get exact zeros in the gradient pass without reading the logits.
A label outside [0, V) that is not ignore_index is never dereferenced: its loss is NaN.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Largest vocabulary block one program loads at a time. 4096 bf16 = 8 KiB per step with 8 warps
# (16 elements, two 16-byte loads per thread). Tests lower it to exercise block boundaries.
MAX_BLOCK_V = 4096


@triton.jit
def _tanh_parts(y):
    """(tanh(y), e = exp(-2|y|), r = 1 / (1 + e)) without libdevice: an odd Taylor series where
    1 - e would cancel (|y| < 0.35, truncation < 2e-8 relative), (1 - e) / (1 + e) elsewhere (no overflow)."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    r = 1.0 / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (
        62.0 / 2835.0 + a2 * (-1382.0 / 155925.0))))))
    t = tl.where(a < 0.35, small, (1.0 - e) * r)
    return tl.where(y < 0.0, -t, t), e, r


@triton.jit
def _softcap(x, cap, inv_cap):
    t, _, _ = _tanh_parts(x * inv_cap)
    return cap * t


@triton.jit
def _softcap_grad(x, cap, inv_cap):
    """z = cap * tanh(x / cap) and dz/dx = sech^2(x / cap) = 4e / (1 + e)^2: accurate everywhere, unlike
    1 - tanh^2, which cancels where the cap saturates."""
    t, e, r = _tanh_parts(x * inv_cap)
    return cap * t, 4.0 * e * r * r


@triton.jit
def _grad_row(x_row, dx_row, target, m, logd, g, keep, V, softcap,
              HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """dx = (softmax(z) - onehot(target)) * dz/dx * g for one row; zeros (no loads) when not keep.

    softmax = exp((z - m) - logd) with m the row max: z - m is exact near the max, where a rounded
    fp32 logsumexp of large logits (ulp 2.4e-4 at 3000) would not be.

    target is an int32 column, -1 for an out-of-range label (no one-hot term).

    dx_row may equal x_row (in place): every element is loaded before it is stored, by this program only.
    """
    v_load = tl.where(keep, V, 0)
    inv_cap = 1.0 / softcap
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=cols < v_load, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z, dz = _softcap_grad(x, softcap, inv_cap)
            grad = (tl.exp((z - m) - logd) - tl.where(cols == target, 1.0, 0.0)) * dz
        else:
            grad = tl.exp((x - m) - logd) - tl.where(cols == target, 1.0, 0.0)
        grad = tl.where(keep, grad * g, 0.0)
        tl.store(dx_row + cols, grad.to(dx_row.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd_kernel(x_ptr, x_stride, labels_ptr, loss_ptr, stats_ptr, g_ptr, g_stride, dx_ptr, dx_stride,
                   V, ignore_index, softcap,
                   HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per-row loss and stats (row max m, log sum exp(z - m)); with WRITE_GRAD also the scaled
    gradient (a second pass over the row)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < V)
    v_end = tl.where(ignored, 0, V)

    inv_cap = 1.0 / softcap
    m = tl.full([], float("-inf"), tl.float32)
    d = tl.full([], 0.0, tl.float32)
    for start in range(0, v_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            x = tl.where(mask, _softcap(x, softcap, inv_cap), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # A block of only -inf logits must not produce exp(-inf - -inf) = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
    logd = tl.log(tl.where(d > 0.0, d, 1.0))  # d == 0 only when m == -inf (loss NaN, as torch)

    tgt = tl.load(x_row + label, mask=in_range & (~ignored), other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        tgt = _softcap(tgt, softcap, inv_cap)
    loss = tl.where(in_range, (m - tgt) + logd, float("nan"))  # not lse - tgt: see _grad_row
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(stats_ptr + 2 * row, tl.where(ignored, 0.0, m))
    tl.store(stats_ptr + 2 * row + 1, tl.where(ignored, 0.0, logd))
    if WRITE_GRAD:
        g = tl.load(g_ptr + row * g_stride).to(tl.float32)
        target = tl.where(in_range, label, -1).to(tl.int32)
        _grad_row(x_row, dx_ptr + row * dx_stride, target, m, logd, g, ~ignored, V, softcap, HAS_SOFTCAP, BLOCK_V)


@triton.jit
def _ce_bwd_kernel(x_ptr, x_stride, labels_ptr, stats_ptr, g_ptr, g_stride, dx_ptr, dx_stride,
                   V, col0, V_total, ignore_index, softcap,
                   HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Gradient of per-row losses, each scaled by its upstream grad g[row * g_stride] (stride may be 0).

    x may be a slab of the vocabulary: columns [col0, col0 + V) of V_total, with the full row's stats.
    """
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    m = tl.load(stats_ptr + 2 * row)
    logd = tl.load(stats_ptr + 2 * row + 1)
    g = tl.load(g_ptr + row * g_stride).to(tl.float32)
    # Slab-local target column; a label in another slab (or out of range) lands outside [0, V).
    target = tl.where((label >= 0) & (label < V_total), label - col0, -1).to(tl.int32)
    _grad_row(x_ptr + row * x_stride, dx_ptr + row * dx_stride, target, m, logd, g, label != ignore_index,
              V, softcap, HAS_SOFTCAP, BLOCK_V)


def _launch_config(v: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(v, 1)), MAX_BLOCK_V)
    return block, max(2, min(16, block // 512))


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device; make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.dim() > 0 else 0


def ce_rows_forward(x: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, stats: torch.Tensor,
                    ignore_index: int, softcap: float,
                    g: torch.Tensor | None = None, dx: torch.Tensor | None = None) -> None:
    """Write per-row loss (n,) and stats (n, 2) (max, log-sum-exp below it), fp32, of logits x (n, V).

    With dx, also write dx = d(sum_i g_i * loss_i)/dx (g 0-d or (n,), any stride); dx may be x itself.
    """
    n, v = x.shape
    if n == 0:
        return
    block, warps = _launch_config(v)
    write = dx is not None
    g_arg = g if write else loss
    with _device_guard(x):
        _ce_fwd_kernel[(n,)](
            x, x.stride(0), labels, loss, stats, g_arg, _row_stride(g_arg) if write else 0,
            dx if write else x, dx.stride(0) if write else 0,
            v, ignore_index, softcap if softcap > 0 else 1.0,
            HAS_SOFTCAP=softcap > 0, WRITE_GRAD=write, BLOCK_V=block, num_warps=warps,
        )


def ce_rows_backward(x: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor, g: torch.Tensor,
                     dx: torch.Tensor, ignore_index: int, softcap: float,
                     col0: int = 0, v_total: int | None = None) -> None:
    """dx (n, V) = gradient of sum_i g_i * loss_i w.r.t. logits x; dx may be x itself.

    x may hold only vocabulary columns [col0, col0 + V) of v_total (stats are the full rows').
    """
    n, v = x.shape
    if n == 0:
        return
    block, warps = _launch_config(v)
    with _device_guard(x):
        _ce_bwd_kernel[(n,)](
            x, x.stride(0), labels, stats, g, _row_stride(g), dx, dx.stride(0),
            v, col0, v if v_total is None else v_total, ignore_index, softcap if softcap > 0 else 1.0,
            HAS_SOFTCAP=softcap > 0, BLOCK_V=block, num_warps=warps,
        )
