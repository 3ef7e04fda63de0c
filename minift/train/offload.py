"""Activation offloading for gradient checkpointing: the decoder's with "offload", a vision
tower's whenever it is checkpointed (the Trainer installs both).

With checkpointing, each decoder layer keeps only its input for the backward (the rest is
recomputed). Those inputs are (batch, seq, hidden) per layer, which still adds up for long
sequences (and for a vision tower's thousands of patches an image); here they go to page-locked
host memory during the forward, on a side stream (overlapping compute), and come back during the
backward, each layer's input prefetched while the layer after it recomputes. torch's
non-reentrant checkpoint saves a layer's inputs through the saved-tensor hooks active around it,
so hooks installed around the decoder see exactly the checkpointed layer inputs (the hooks are
switched off again at the final norm); everything saved inside a checkpointed layer goes to the
checkpoint's own hooks. On CPU the tensors are already in host memory and are kept as they are.

Every copy is ordered by events between the compute stream and the side stream, never by
`record_stream`: a device tensor being copied out stays referenced until the compute stream has
waited for its copy (at most `depth` copies in flight, then the oldest is waited for), and a
tensor coming back is allocated on the compute stream before the side stream fills it. So the
same code is safe inside a CUDA graph capture (`train/graphs.py`), where the allocator's
deferred `record_stream` frees would keep every offloaded tensor's memory until the capture ends.
A captured copy writes the same host address at every replay, so under capture the host side is a
`HostArena`: buffers that belong to the graphs for their life, registered with CUDA directly
rather than taken from PyTorch's caching host allocator (whose blocks go back to a shared cache),
each with the shape, dtype and strides the same micro-batch's eager copy had (`Slot`). A capture
ends with `join`: the compute stream waits for the side stream, as CUDA requires of every stream
a capture forked, also when the capture failed midway.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn


class Slot(NamedTuple):
    """One tensor a forward offloaded: a capture's host buffer must have its shape, dtype and the
    strides its eager host copy had (`torch.empty_like`'s: the tensor's own when dense, e.g. a vision
    tower's patch-major activations). Other strides would hand the checkpoint's recompute an input
    laid out differently from the eager run's, and the compiled layer would recompile inside the
    capture."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> "Slot":
        return cls(tuple(t.shape), torch.empty_like(t, device="meta").stride(), t.dtype)


Trace = list[Slot]  # each tensor a forward offloaded, in pack order
_ALIGN = 4096  # host buffers start on page boundaries


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


class HostArena:
    """Page-locked host memory for the copies of captured micro-batches, one flat buffer registered
    with CUDA (`cudaHostRegister`; not from PyTorch's caching host allocator, see the module
    docstring). `views(trace)` carves one dense buffer per offloaded tensor of a forward from its
    start; graphs replay one at a time on one stream, so every graph's views may share it."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8)
        start = (-self._raw.data_ptr()) % _ALIGN
        self.flat = self._raw[start:start + nbytes]
        self._registered = False
        if nbytes and torch.cuda.is_available():
            # all of it: a view's `is_pinned()` (checked by every copy under capture) asks about its
            # storage's start, which precedes the aligned region
            err = torch.cuda.cudart().cudaHostRegister(self._raw.data_ptr(), self._raw.numel(), 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes of host memory failed (error {int(err)})")
            self._registered = True

    @staticmethod
    def size(trace: Trace) -> int:
        return sum(-(-_nbytes(s.shape, s.dtype) // _ALIGN) * _ALIGN for s in trace)

    def views(self, trace: Trace) -> list[torch.Tensor]:
        if self.size(trace) > self.nbytes:
            raise ValueError(f"HostArena: {self.size(trace)} bytes asked of {self.nbytes}")
        out, off = [], 0
        for s in trace:  # dense strides: the buffer's n bytes hold every element once
            n = _nbytes(s.shape, s.dtype)
            out.append(self.flat[off:off + n].view(s.dtype).as_strided(s.shape, s.stride))
            off += -(-n // _ALIGN) * _ALIGN
        return out

    def close(self) -> None:
        if self._registered:
            self._registered = False
            torch.cuda.cudart().cudaHostUnregister(self._raw.data_ptr())

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may be gone already
            pass


class _Handle:
    """One offloaded tensor: its host copy and, once prefetched, the device copy and event."""

    __slots__ = ("host", "device", "dev", "event", "index", "used")

    def __init__(self, host: torch.Tensor, device: torch.device, index: int):
        self.host, self.device, self.index = host, device, index
        self.dev: torch.Tensor | None = None
        self.event: Any = None
        self.used = False  # unpacked once: never prefetched again


class ActivationOffloader:
    """Saved-tensor hooks that offload (batch, seq, hidden_size) float tensors saved inside one
    module's forward (a TextModel, or a vision tower of that width). `depth`: copies to the host in
    flight before the compute stream waits for the oldest (each keeps its device tensor alive)."""

    def __init__(self, hidden_size: int, depth: int = 2):
        self.hidden_size, self.depth = hidden_size, depth
        self.handles: list[_Handle] = []
        self.offloaded = 0  # tensors packed so far (for tests and logs)
        self.trace: Trace = []  # the last forward's offloaded tensors (what a capture's arena must hold)
        self._streams: dict[Any, Any] = {}
        self._ctx: Any = None
        self._removables: list[Any] = []
        self._inflight: collections.deque[tuple[torch.Tensor, Any]] = collections.deque()
        self._hosts: list[torch.Tensor] | None = None  # under capture: the arena's buffers, in pack order
        self._arena: HostArena | None = None
        self._forked: set[torch.device] = set()  # devices whose side stream has work since the last join
        self.unused_fetches = 0  # copies brought back but never unpacked (counted by join)

    # -- the hooks -----------------------------------------------------------------------
    def _wanted(self, t: torch.Tensor) -> bool:
        return t.is_floating_point() and t.dim() == 3 and t.shape[-1] == self.hidden_size

    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _host_buffer(self, t: torch.Tensor) -> torch.Tensor:
        if self._hosts is None:
            return torch.empty_like(t, device="cpu", pin_memory=True)
        i = len(self.trace) - 1
        h = self._hosts[i] if i < len(self._hosts) else None
        if h is None or Slot(tuple(h.shape), h.stride(), h.dtype) != self.trace[i]:
            raise RuntimeError(f"offloading under capture: tensor {i} is {self.trace[i]}, not what the same "
                               "micro-batch offloaded when it ran eagerly")
        return h

    def _wait_oldest(self, main: Any) -> None:
        t, event = self._inflight.popleft()
        main.wait_event(event)  # its copy has read t: t's memory may be reused from here on
        del t

    def pack(self, t: torch.Tensor) -> Any:
        if not self._wanted(t):
            return t
        self.offloaded += 1
        self.trace.append(Slot.of(t))
        if not t.is_cuda:
            h = _Handle(t, t.device, len(self.handles))
        else:
            host = self._host_buffer(t)
            main, side = torch.cuda.current_stream(t.device), self._stream(t.device)
            side.wait_stream(main)
            self._forked.add(t.device)
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
            self._inflight.append((t, event))
            while len(self._inflight) > self.depth:
                self._wait_oldest(main)
            h = _Handle(host, t.device, len(self.handles))
        self.handles.append(h)
        return h

    def _fetch(self, h: _Handle) -> None:
        """Starts h's copy back to the device, on the side stream."""
        main = torch.cuda.current_stream(h.device)
        h.dev = torch.empty_like(h.host, device=h.device)  # on the compute stream; the host copy's strides
        side = self._stream(h.device)
        side.wait_stream(main)
        self._forked.add(h.device)
        with torch.cuda.stream(side):
            h.dev.copy_(h.host, non_blocking=True)
        h.event = torch.cuda.Event()
        h.event.record(side)

    def unpack(self, h: Any) -> torch.Tensor:
        if not isinstance(h, _Handle):
            return h
        if h.device.type != "cuda":
            out = h.host
        else:
            if h.dev is None:
                self._fetch(h)
            torch.cuda.current_stream(h.device).wait_event(h.event)
            out, h.dev, h.event = h.dev, None, None
        h.used = True
        if 0 < h.index <= len(self.handles):  # the backward walks layers in reverse:
            prev = self.handles[h.index - 1]  # fetch the previous input while this one runs
            if prev.device.type == "cuda" and not prev.used and prev.dev is None:
                self._fetch(prev)
        elif h.index == 0:
            self.handles = []  # the last one: the host copies live on only in the graph
        return out

    def join(self) -> int:
        """Makes the compute stream wait for everything the side streams were given since the
        last join, and drops copies brought back but never unpacked (returns how many). A CUDA
        graph capture must end with every stream it forked joined, also when it failed midway."""
        left = 0
        for h in self.handles:
            if h.dev is not None:
                left, h.dev, h.event = left + 1, None, None
        self.unused_fetches += left
        for device in self._forked:
            torch.cuda.current_stream(device).wait_stream(self._streams[device])
        self._forked.clear()
        self._inflight.clear()  # their copies are waited for now
        return left

    # -- CUDA graphs -----------------------------------------------------------------------
    @property
    def arena_bytes(self) -> int:
        """Page-locked host memory held for captured copies (the graphs' stats report it)."""
        return self._arena.nbytes if self._arena is not None else 0

    @contextlib.contextmanager
    def capturing(self, trace: Trace) -> Iterator[HostArena | None]:
        """While a micro-batch is captured: its offloaded tensors (`trace`, recorded when the same
        micro-batch shape ran eagerly) go to buffers of this offloader's arena (made, or grown, now,
        before the capture). Yields the arena, which the graph must keep alive."""
        if not trace or not torch.cuda.is_available():
            yield None
            return
        need = HostArena.size(trace)
        if self._arena is None or self._arena.nbytes < need:
            old = self._arena.nbytes if self._arena is not None else 0
            self._arena = HostArena(max(need, old + old // 4))  # older graphs keep the old one
        self._hosts = self._arena.views(trace)
        try:
            yield self._arena
        finally:  # after a failed capture its events and handles are void: the next forward starts afresh
            self._hosts, self.handles = None, []
            self._inflight.clear()
            self._forked.clear()

    # -- installation --------------------------------------------------------------------
    def _enter(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self.handles, self.trace = [], []
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            self._ctx.__enter__()

    def _exit(self, *args: Any) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)
            while self._inflight:  # every copy joins the compute stream (a capture must end joined)
                t, _ = self._inflight[0]
                self._wait_oldest(torch.cuda.current_stream(t.device))

    def install(self, module: nn.Module) -> "ActivationOffloader":
        """Hooks around `module`'s forward: on from its start until its end or, for a TextModel
        (whose layers are checkpointed), its final norm, so exactly the layer inputs are caught.
        A vision tower's (its encoder layers checkpointed) also catch the post-LayerNorm's input."""
        self._removables = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._exit, always_call=True),
        ]
        norm = getattr(module, "norm", None)
        if isinstance(norm, nn.Module):
            self._removables.append(norm.register_forward_pre_hook(self._exit))
        return self

    def remove(self) -> None:
        for r in self._removables:
            r.remove()
        self._removables = []
        self.handles = []
        self._arena = None
