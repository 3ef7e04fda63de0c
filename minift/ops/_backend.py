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

from ..errors import ConfigError

try:  # triton is a Linux-only dependency; everything must still work without it
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised on machines without triton
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's own switch, read as Triton reads it

_BACKENDS = ("auto", "triton", "torch")
_backend = "auto"


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """'auto' (Triton on CUDA, reference elsewhere), 'triton' (always, CPU via the interpreter) or 'torch'."""
    global _backend
    _backend = _checked(name, _BACKENDS, "ops backend")


def backend(name: str) -> contextlib.AbstractContextManager:
    """Temporarily force an ops backend: `with minift.ops.backend("triton"): ...`."""
    return _scoped(set_backend, get_backend, name)


_COMPILED_ELEMENTWISE = ("reference", "kernel")
_compiled_elementwise = "reference"


def get_compiled_elementwise() -> str:
    return _compiled_elementwise


def set_compiled_elementwise(mode: str) -> None:
    """What rms_norm, layer_norm, rope, swiglu and geglu become inside torch.compile (backend "auto"):
    'reference' (the default) traces their plain-PyTorch references, which inductor fuses with the
    neighbouring adds and casts (measured 1.36-1.45x faster training than opaque kernels, for ~0.4 GiB
    more peak: bench/RESULTS.md); 'kernel' keeps minift's Triton kernels there. Eager calls always use
    the kernels; a change recompiles (torch.compile guards on it)."""
    global _compiled_elementwise
    _compiled_elementwise = _checked(mode, _COMPILED_ELEMENTWISE, "ops compiled_elementwise")


def compiled_elementwise(mode: str) -> contextlib.AbstractContextManager:
    """Temporarily set_compiled_elementwise: `with minift.ops.compiled_elementwise("kernel"): ...`."""
    return _scoped(set_compiled_elementwise, get_compiled_elementwise, mode)


def _checked(value: str, allowed: tuple, what: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{what} must be one of {allowed}, got {value!r}")
    return value


@contextlib.contextmanager
def _scoped(set_, get, value: str) -> Iterator[None]:
    """set_(value) for a with-block, then the previous value back (get's, read on entry)."""
    old = get()
    set_(value)
    try:
        yield
    finally:
        set_(old)


def triton_runnable(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on this tensor's device in this process."""
    if not HAS_TRITON:
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def use_triton(t: torch.Tensor, elementwise: bool = False) -> bool:
    """Dispatch decision for an op whose main input is `t` (`elementwise`: a norm / RoPE /
    activation op that inductor can fuse when compiling)."""
    if _backend == "torch":
        return False
    if _backend == "triton":
        return triton_runnable(t)
    if elementwise and _compiled_elementwise == "reference" and torch.compiler.is_compiling():
        return False
    return HAS_TRITON and t.is_cuda


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _tracing(args: tuple) -> bool:
    """Whether a compiler is tracing this call: dynamo, or AOT autograd tracing a backward (which
    runs the backward of an eager autograd.Function on fake/functional tensors under dispatch
    modes, with `is_compiling()` False). The kernels must then stay behind the custom op. Tensor
    lists (NF4 bases) are looked into: their tensors are as fake as the rest."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    for a in args:  # plain loops: this runs on every eager call
        if type(a) is list:
            if a and isinstance(a[0], torch.Tensor):  # a Tensor[] (a schema's lists are of one type)
                for t in a:
                    if type(t) not in _PLAIN:
                        return True
        elif isinstance(a, torch.Tensor) and type(a) not in _PLAIN:
            return True
    return False


class _Direct(torch.autograd.Function):
    """Runs an `Op`'s implementation with its own setup_context and backward (the Op comes last).

    Only direct tensor arguments are autograd inputs here (a tensor list passes through, as the
    frozen NF4 bases do), so the op's backward's list of Nones for a tensor list becomes one None."""

    @staticmethod
    def forward(ctx, *args):
        op, inputs = args[-1], args[:-1]
        out = op.impl(*inputs)
        op.setup(ctx, inputs, out)
        ctx.minift_op = op
        return out

    @staticmethod
    def backward(ctx, *grads):
        res = ctx.minift_op.backward(ctx, *grads)
        return (*(None if type(g) is list else g for g in res), None)


class Op:
    """A `minift::<name>` custom op that eager calls reach without the dispatcher.

    Under torch.compile, `op(*args)` calls the registered custom op (fake, autograd), which is what
    the compiler must see. In eager mode it runs the same implementation directly, through an
    autograd.Function with the op's own setup_context and backward when a gradient is needed: the
    same code at half the Python cost (the dispatcher took ~40 us of a stubbed rms_norm's ~70 us
    forward on the CI machine, and about as much again in its backward) - which is most of a small
    kernel's time on a GPU when the calls are not compiled. `impl`'s annotations are the custom
    op's schema (`mutates`: the arguments it writes in place, e.g. a KV cache); the backward ops
    themselves are Ops without a backward.
    """

    def __init__(self, name: str, impl, fake, setup=None, backward=None, mutates: tuple[str, ...] = ()) -> None:
        self.impl, self.setup, self.backward = impl, setup, backward
        self.custom = torch.library.custom_op(f"minift::{name}", mutates_args=mutates)(impl)
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


_TICKETS: dict[torch.device, torch.Tensor] = {}


def ticket_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """A device's int32 ticket counters for kernels whose last program of a group finishes the
    group's work (split-K nf4_matmul, split decode_attention): zero between calls, each call's last
    programs resetting theirs. None while a CUDA graph is being captured and the counters would have
    to grow (a tensor kept across calls must not come from a graph's pool). Calls on concurrent
    streams must not share them."""
    t = _TICKETS.get(device)
    if t is None or t.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        t = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _TICKETS[device] = t
    return t


def prepare_tickets(device: torch.device | str, n: int = 4096) -> None:
    """Makes the device's ticket counters now, outside any compiled or CUDA-graphed region: a
    CUDA-graph tree's warm-up run allocates from the graph's private pool, where a tensor kept
    across calls must not live (generation calls this before compiling its decode step)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ticket_counters(device, n)
