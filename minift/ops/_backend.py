"""Chooses between a Triton kernel and the plain-PyTorch reference for each op call.

Triton runs on CUDA tensors natively, and on CPU tensors only under the interpreter
(`TRITON_INTERPRET=1`, which must be set before triton is imported; the tests do this).
`auto` picks Triton for CUDA tensors and the reference elsewhere, so a CPU user gets plain
PyTorch (which `torch.compile` fuses) and a GPU user gets the kernels.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

try:  # triton is a Linux-only dependency; everything must still work without it
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised on machines without triton
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_BACKENDS = ("auto", "triton", "torch")
_backend = os.environ.get("MINIFT_OPS_BACKEND", "auto")


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """'auto' (Triton on CUDA, reference elsewhere), 'triton' (always, CPU via the interpreter) or 'torch'."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"ops backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Temporarily force an ops backend: `with minift.ops.backend("triton"): ...`."""
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def triton_runnable(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on this tensor's device in this process."""
    if not HAS_TRITON:
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


# Under torch.compile in "auto" mode, elementwise and norm ops (rms_norm, layer_norm, rope,
# swiglu, geglu) trace as their references, so inductor fuses them with the neighbouring adds and
# casts, which an opaque custom op prevents. MINIFT_COMPILED_ELEMENTWISE=kernel keeps the kernels.
_COMPILED_ELEMENTWISE = os.environ.get("MINIFT_COMPILED_ELEMENTWISE", "reference")


def use_triton(t: torch.Tensor, elementwise: bool = False) -> bool:
    """Dispatch decision for an op whose main input is `t` (`elementwise`: a norm / RoPE /
    activation op that inductor can fuse when compiling)."""
    if _backend == "torch":
        return False
    if _backend == "triton":
        return triton_runnable(t)
    if elementwise and _COMPILED_ELEMENTWISE == "reference" and torch.compiler.is_compiling():
        return False
    return HAS_TRITON and t.is_cuda


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _tracing(args: tuple) -> bool:
    """Whether a compiler is tracing this call: dynamo, or AOT autograd tracing a backward (which
    runs the backward of an eager autograd.Function on fake/functional tensors under dispatch
    modes, with `is_compiling()` False). The kernels must then stay behind the custom op."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN for a in args)


class _Direct(torch.autograd.Function):
    """Runs an `Op`'s implementation with its own setup_context and backward (the Op comes last)."""

    @staticmethod
    def forward(ctx, *args):
        op, inputs = args[-1], args[:-1]
        out = op.impl(*inputs)
        op.setup(ctx, inputs, out)
        ctx.minift_op = op
        return out

    @staticmethod
    def backward(ctx, *grads):
        return (*ctx.minift_op.backward(ctx, *grads), None)


class Op:
    """A `minift::<name>` custom op that eager calls reach without the dispatcher.

    Under torch.compile, `op(*args)` calls the registered custom op (fake, autograd), which is what
    the compiler must see. In eager mode it runs the same implementation directly, through an
    autograd.Function with the op's own setup_context and backward when a gradient is needed: the
    same code at half the Python cost (the dispatcher took ~40 us of a stubbed rms_norm's ~70 us
    forward on the CI machine, and about as much again in its backward) - which is most of a small
    kernel's time on a GPU when the calls are not compiled.
    """

    def __init__(self, name: str, impl, fake, setup=None, backward=None) -> None:
        self.impl, self.setup, self.backward = impl, setup, backward
        self.custom = torch.library.custom_op(f"minift::{name}", mutates_args=())(impl)
        self.custom.register_fake(fake)
        if backward is not None:
            self.custom.register_autograd(backward, setup_context=setup)

    def __call__(self, *args):
        if _tracing(args):
            return self.custom(*args)
        if self.backward is not None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return _Direct.apply(*args, self)
        return self.impl(*args)
