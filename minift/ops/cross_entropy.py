"""Cross-entropy losses for large vocabularies: `cross_entropy` on (N, V) logits and
`linear_cross_entropy` on hidden states and the lm-head weight, never holding the (N, V) logits.

Semantics (both backends): logits are upcast to fp32 (optionally soft-capped,
z = softcap * tanh(logits / softcap)); the loss is fp32. 'mean' divides by the number of labels
!= ignore_index, and when that number is 0 the loss is 0.0 with zero gradients (torch's
F.cross_entropy returns NaN there; minift does not). 'none' gives per-row losses, 0 at ignored rows.

Memory: cross_entropy saves the logits (as any op must) plus two fp32 numbers per row; its backward
writes the gradient into a NEW tensor in the logits' dtype rather than over the saved logits, since
the caller may still use them and a custom op may not mutate its inputs (torch.compile relies on
it). linear_cross_entropy holds one (chunk, V) logits buffer in the model dtype, which the kernel
turns into dlogits in place, plus (for 'mean'/'sum') the grads of hidden and weight until backward.

Syncs: none on CUDA. The count of non-ignored labels stays on the device.
Labels outside [0, V) that are not ignore_index: the kernels never read out of bounds for them
(the target load is masked) and give that row a NaN loss. The eager check that raises InputError
costs a device->host sync, so `check_labels=None` runs it only where no device is involved (CPU
tensors) and never while compiling; pass `check_labels=True` to force it on CUDA (one sync), or
validate labels in the data pipeline with `check_label_range`. So on the CUDA hot path a bad label
shows up as a NaN loss (with backend "torch" on CUDA, as torch's device-side assert).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from . import _backend
from . import reference as ref
from ._backend import Op
from ._ce_common import _check_labels, _check_linear, _check_options, _chunks, _reduce

if _backend.HAS_TRITON:
    from . import _ce_kernels as _k

# ----------------------------------------------------------------------------- validation


def check_label_range(labels: Tensor, num_classes: int, ignore_index: int = -100) -> None:
    """Raise InputError if a label is outside [0, num_classes) and not ignore_index (one host sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise InputError(
            f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"found {first} ({int(bad.sum())} bad labels)"
        )


def _maybe_check_range(labels: Tensor, v: int, ignore_index: int, check_labels: bool | None) -> None:
    if torch.compiler.is_compiling():
        return  # data-dependent: the kernels' NaN loss is the signal inside compiled code
    if check_labels is None:
        check_labels = labels.device.type == "cpu"
    if check_labels:
        check_label_range(labels, v, ignore_index)





# ----------------------------------------------------------------------------- cross_entropy op


def _ce_impl(logits: Tensor, labels: Tensor, ignore_index: int, softcap: float) -> tuple[Tensor, Tensor]:
    """Per-row fp32 loss (N,) and stats (N, 2): row max and log-sum-exp below it; softcap 0.0 = off."""
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    n = x.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    stats = torch.empty(n, 2, dtype=torch.float32, device=x.device)
    _k.ce_rows_forward(x, labels.contiguous(), loss, stats, ignore_index, softcap)
    return loss, stats


def _ce_fake(logits, labels, ignore_index, softcap):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty((n, 2), dtype=torch.float32)


def _ce_bwd_impl(logits: Tensor, labels: Tensor, stats: Tensor, grad_loss: Tensor, ignore_index: int, softcap: float
                 ) -> Tensor:
    """Gradient w.r.t. logits, a new tensor in the logits' dtype (saved logits may be used elsewhere)."""
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _k.ce_rows_backward(x, labels.contiguous(), stats.contiguous(), grad_loss.float(), dx, ignore_index, softcap)
    return dx


def _ce_bwd_fake(logits, labels, stats, grad_loss, ignore_index, softcap):
    return logits.new_empty(logits.shape)


_ce_bwd_op = Op("cross_entropy_backward", _ce_bwd_impl, _ce_bwd_fake)


def _ce_setup(ctx, inputs, output):
    logits, labels, ctx.ignore_index, ctx.softcap = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.mark_non_differentiable(output[1])


def _ce_backward(ctx, grad_loss, _grad_stats):
    logits, labels, stats = ctx.saved_tensors
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    return _ce_bwd_op(logits, labels, stats, grad_loss, ctx.ignore_index, ctx.softcap), None, None, None


_ce_op = Op("cross_entropy", _ce_impl, _ce_fake, _ce_setup, _ce_backward)


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    check_labels: bool | None = None,
) -> Tensor:
    """Cross-entropy of (N, V) logits (any float dtype) against int labels (N,); fp32 loss.

    Triton: one read of the logits forward, one read + one write (grad, logits' dtype) backward.
    """
    if logits.dim() != 2:
        raise InputError(f"logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise InputError(f"logits must be a float tensor, got dtype {logits.dtype}")
    if logits.shape[1] == 0:
        raise InputError("logits must have at least one class (V >= 1)")
    cap = _check_options(softcap, reduction)
    labels = _check_labels(labels, logits.shape[0], logits.device)
    _maybe_check_range(labels, logits.shape[1], ignore_index, check_labels)
    if _backend.use_triton(logits):
        rows, _ = _ce_op(logits, labels, ignore_index, cap)
    else:
        rows = ref.cross_entropy(logits, labels, ignore_index=ignore_index, softcap=softcap, reduction="none")
    return _reduce(rows, labels, ignore_index, reduction)


# ----------------------------------------------------------------------------- linear_cross_entropy ops


def _chunk_buffer(rows: int, v: int, like: Tensor) -> Tensor:
    """(rows, V) logits buffer whose row stride is a multiple of 16 elements (aligned vector loads)."""
    return torch.empty((rows, -(-v // 16) * 16), dtype=like.dtype, device=like.device)[:, :v]


def vocab_slab(n: int, v: int, chunk_size: int) -> int:
    """Vocabulary columns per slab of the grad_weight pass: the same element budget as one token
    chunk of logits (chunk_size x V), so both passes hold buffers of one size; GEMM-friendly widths."""
    cols = max(1, chunk_size * v // max(n, 1))
    if cols >= 128:
        cols = cols // 128 * 128
    return min(cols, v)


def _lce_gw_impl(hidden: Tensor, weight: Tensor, labels: Tensor, stats: Tensor, g: Tensor, ignore_index: int,
                 softcap: float, slab: int) -> Tensor:
    """d(sum_i g_i loss_i)/d weight, (V, H) in weight's dtype, one vocabulary slab at a time.

    Per slab: logits = hidden @ W[slab].T for all tokens (cuBLAS), the CE kernel turns them into
    dlogits in place from the full rows' saved stats, and grad_weight[slab] = dlogits.T @ hidden is
    one GEMM over every token, written once in the weight's dtype: rounded once, as torch's own
    backward rounds it, and no fp32 (V, H) accumulator (1-4 GiB at Gemma's 262,208 vocabulary).
    """
    n, v = hidden.shape[0], weight.shape[0]
    gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if n == 0:
        return gw.zero_()
    labels, stats, g = labels.contiguous(), stats.contiguous(), g.float()
    buf = _chunk_buffer(n, min(slab, v), hidden)
    for a, b in _chunks(v, slab):
        x = buf[:, : b - a]
        torch.mm(hidden, weight[a:b].t(), out=x)
        _k.ce_rows_backward(x, labels, stats, g, x, ignore_index, softcap, col0=a, v_total=v)
        torch.mm(x.t(), hidden, out=gw[a:b])
    return gw


def _lce_gw_fake(hidden, weight, labels, stats, g, ignore_index, softcap, slab):
    return weight.new_empty(weight.shape)


_lce_gw_op = Op("linear_cross_entropy_grad_weight", _lce_gw_impl, _lce_gw_fake)


def _lce_impl(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, softcap: float, mean: bool,
    chunk_size: int, need_grad_hidden: bool, need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, d loss/d hidden, row stats, 1/count or 1) for 'mean'/'sum'.

    Per token chunk: logits = h @ W.T (cuBLAS), the CE kernel computes the rows' losses and stats
    and (when hidden needs a grad) turns the logits into dlogits in place, and grad_hidden[chunk] =
    dlogits @ W, one GEMM over the whole vocabulary. So a frozen lm_head (LoRA) costs two GEMMs and
    one chunk buffer. grad_weight (need_grad_weight) comes in the backward from `_lce_gw_op`.
    """
    n, v = hidden.shape[0], weight.shape[0]
    dev, labels = hidden.device, labels.contiguous()
    rows = torch.empty(n, dtype=torch.float32, device=dev)
    stats = torch.empty(n, 2, dtype=torch.float32, device=dev)
    count = (labels != ignore_index).sum().clamp(min=1)
    scale = count.float().reciprocal() if mean else torch.ones((), dtype=torch.float32, device=dev)
    gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_grad_hidden else hidden.new_empty(0)
    buf = _chunk_buffer(min(chunk_size, n), v, hidden)
    for s, e in _chunks(n, chunk_size):
        x = buf[: e - s]
        torch.mm(hidden[s:e], weight.t(), out=x)
        _k.ce_rows_forward(x, labels[s:e], rows[s:e], stats[s:e], ignore_index, softcap,
                           g=scale if need_grad_hidden else None, dx=x if need_grad_hidden else None)
        if need_grad_hidden:
            torch.mm(x, weight, out=gh[s:e])
    loss = rows.sum() / count if mean else rows.sum()
    return loss, gh, stats, scale


def _lce_fake(hidden, weight, labels, ignore_index, softcap, mean, chunk_size, need_grad_hidden, need_grad_weight):
    gh = hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty(0)
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty((), **f32), gh, hidden.new_empty((hidden.shape[0], 2), **f32), hidden.new_empty((), **f32)


def _lce_setup(ctx, inputs, output):
    hidden, weight, labels, ctx.ignore_index, ctx.softcap, _, chunk, need_h, need_w = inputs
    ctx.need = (need_h, need_w)
    ctx.slab = vocab_slab(hidden.shape[0], weight.shape[0], chunk)
    if need_w:
        ctx.save_for_backward(output[1], output[3], hidden, weight, labels, output[2])
    else:
        ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1], output[2], output[3])


def _lce_backward(ctx, grad_loss, _gh, _stats, _scale):
    saved = ctx.saved_tensors
    none = (None,) * 7
    if grad_loss is None:
        return (None, None) + none
    # grad_loss is a 0-d fp32 tensor: the product stays in the grad's dtype, computed in fp32.
    dh = saved[0] * grad_loss if ctx.need[0] else None
    dw = None
    if ctx.need[1]:
        _, scale, hidden, weight, labels, stats = saved
        dw = _lce_gw_op(hidden, weight, labels, stats, grad_loss * scale, ctx.ignore_index, ctx.softcap, ctx.slab)
    return (dh, dw) + none


_lce_op = Op("linear_cross_entropy", _lce_impl, _lce_fake, _lce_setup, _lce_backward)


def _lce_rows_impl(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, softcap: float, chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Per-row (loss, stats) for reduction='none'; the backward recomputes logits chunk by chunk
    (per-row upstream grads are only known then)."""
    n, v = hidden.shape[0], weight.shape[0]
    labels = labels.contiguous()
    rows = torch.empty(n, dtype=torch.float32, device=hidden.device)
    stats = torch.empty(n, 2, dtype=torch.float32, device=hidden.device)
    buf = _chunk_buffer(min(chunk_size, n), v, hidden)
    for s, e in _chunks(n, chunk_size):
        x = buf[: e - s]
        torch.mm(hidden[s:e], weight.t(), out=x)
        _k.ce_rows_forward(x, labels[s:e], rows[s:e], stats[s:e], ignore_index, softcap)
    return rows, stats


def _lce_rows_fake(hidden, weight, labels, ignore_index, softcap, chunk_size):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty((n, 2), dtype=torch.float32)


def _lce_rows_bwd_impl(
    hidden: Tensor, weight: Tensor, labels: Tensor, stats: Tensor, grad_rows: Tensor, ignore_index: int,
    softcap: float, chunk_size: int,
) -> Tensor:
    """d(sum_i g_i loss_i)/d hidden, recomputing each token chunk's logits."""
    n, v = hidden.shape[0], weight.shape[0]
    labels, stats, g = labels.contiguous(), stats.contiguous(), grad_rows.float()
    gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    buf = _chunk_buffer(min(chunk_size, n), v, hidden)
    for s, e in _chunks(n, chunk_size):
        x = buf[: e - s]
        torch.mm(hidden[s:e], weight.t(), out=x)
        _k.ce_rows_backward(x, labels[s:e], stats[s:e], g[s:e], x, ignore_index, softcap)
        torch.mm(x, weight, out=gh[s:e])
    return gh


def _lce_rows_bwd_fake(hidden, weight, labels, stats, grad_rows, ignore_index, softcap, chunk_size):
    return hidden.new_empty(hidden.shape)


_lce_rows_bwd_op = Op("linear_cross_entropy_rows_backward", _lce_rows_bwd_impl, _lce_rows_bwd_fake)


def _lce_rows_setup(ctx, inputs, output):
    hidden, weight, labels, ctx.ignore_index, ctx.softcap, ctx.chunk_size = inputs
    ctx.slab = vocab_slab(hidden.shape[0], weight.shape[0], ctx.chunk_size)
    ctx.save_for_backward(hidden, weight, labels, output[1])
    ctx.mark_non_differentiable(output[1])


def _lce_rows_backward(ctx, grad_rows, _grad_stats):
    hidden, weight, labels, stats = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_rows is None or not (need_h or need_w):
        return (None,) * 6
    gh = gw = None
    if need_h:
        gh = _lce_rows_bwd_op(hidden, weight, labels, stats, grad_rows, ctx.ignore_index, ctx.softcap, ctx.chunk_size)
    if need_w:
        gw = _lce_gw_op(hidden, weight, labels, stats, grad_rows, ctx.ignore_index, ctx.softcap, ctx.slab)
    return gh, gw, None, None, None, None


_lce_rows_op = Op("linear_cross_entropy_rows", _lce_rows_impl, _lce_rows_fake, _lce_rows_setup, _lce_rows_backward)


# ----------------------------------------------------------------------------- linear_cross_entropy API


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    check_labels: bool | None = None,
) -> Tensor:
    """cross_entropy(hidden @ weight.T, labels) without the (N, V) logits; hidden (N, H), weight (V, H).

    Triton: chunks of `chunk_size` tokens (default: CHUNK_BYTES of logits). For 'mean'/'sum' the
    hidden gradient is computed in the forward (when hidden requires grad) and scaled by the
    upstream grad in the backward; 'none' recomputes each chunk's logits in the backward. A
    trainable weight's gradient is computed in the backward, one vocabulary slab (the same buffer
    size) at a time, straight into the weight's dtype: two more GEMMs, no fp32 (V, H) buffer.
    """
    labels, cap, chunk = _check_linear(hidden, weight, labels, softcap, reduction, chunk_size)
    _maybe_check_range(labels, weight.shape[0], ignore_index, check_labels)
    if not _backend.use_triton(hidden):
        rows = ref.linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, softcap=softcap, reduction="none")
        return _reduce(rows, labels, ignore_index, reduction)
    if reduction == "none":
        return _lce_rows_op(hidden, weight, labels, ignore_index, cap, chunk)[0]
    grad_on = torch.is_grad_enabled()
    return _lce_op(hidden, weight, labels, ignore_index, cap, reduction == "mean", chunk,
                   grad_on and hidden.requires_grad, grad_on and weight.requires_grad)[0]
