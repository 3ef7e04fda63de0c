"""Activation offloading for gradient checkpointing: the decoder's with "offload", a vision
tower's whenever it is checkpointed (the Trainer installs both).

With checkpointing, each decoder layer keeps only its input for the backward (the rest is
recomputed). Those inputs are (batch, seq, hidden) per layer, which still adds up for long
sequences (and for a vision tower's thousands of patches an image); here they go to pinned CPU
memory during the forward, on a side stream (overlapping compute), and come back asynchronously
during the backward, each layer's input prefetched while the layer after it recomputes. torch's non-reentrant checkpoint saves a layer's inputs through
the saved-tensor hooks active around it, so hooks installed around the decoder see exactly the
checkpointed layer inputs (the hooks are switched off again at the final norm); everything saved
inside a checkpointed layer goes to the checkpoint's own hooks. On CPU the tensors are already in host memory and are
kept as they are (same code path, no copies).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _Handle:
    """One offloaded tensor: its host copy and, once prefetched, the device copy and event."""

    __slots__ = ("host", "device", "dev", "event", "index")

    def __init__(self, host: torch.Tensor, device: torch.device, index: int):
        self.host, self.device, self.index = host, device, index
        self.dev: torch.Tensor | None = None
        self.event: Any = None


class ActivationOffloader:
    """Saved-tensor hooks that offload (batch, seq, hidden_size) float tensors saved inside one
    module's forward (a TextModel, or a vision tower of that width)."""

    def __init__(self, hidden_size: int):
        self.hidden_size = hidden_size
        self.handles: list[_Handle] = []
        self.offloaded = 0  # tensors packed so far (for tests and logs)
        self._streams: dict[Any, Any] = {}
        self._ctx: Any = None
        self._removables: list[Any] = []

    # -- the hooks -----------------------------------------------------------------------
    def _wanted(self, t: torch.Tensor) -> bool:
        return t.is_floating_point() and t.dim() == 3 and t.shape[-1] == self.hidden_size

    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, t: torch.Tensor) -> Any:
        if not self._wanted(t):
            return t
        self.offloaded += 1
        if not t.is_cuda:
            h = _Handle(t, t.device, len(self.handles))
        else:
            side = self._stream(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(side):
                host = torch.empty_like(t, device="cpu", pin_memory=True)
                host.copy_(t, non_blocking=True)
            t.record_stream(side)  # keep t's memory until the copy has read it
            h = _Handle(host, t.device, len(self.handles))
        self.handles.append(h)
        return h

    def _prefetch(self, h: _Handle) -> None:
        if h.dev is not None or h.device.type != "cuda":
            return
        side = self._stream(h.device)
        with torch.cuda.stream(side):
            h.dev = h.host.to(h.device, non_blocking=True)
            h.event = torch.cuda.Event()
            h.event.record(side)

    def unpack(self, h: Any) -> torch.Tensor:
        if not isinstance(h, _Handle):
            return h
        if h.device.type != "cuda":
            out = h.host
        else:
            self._prefetch(h)
            main = torch.cuda.current_stream(h.device)
            main.wait_event(h.event)
            out = h.dev
            out.record_stream(main)
            h.dev = None
        if h.index > 0 and h.index <= len(self.handles):  # the backward walks layers in reverse:
            self._prefetch(self.handles[h.index - 1])  # fetch the previous input while this one runs
        elif h.index == 0:
            self.handles = []  # the last one: the host copies live on only in the graph
        return out

    # -- installation --------------------------------------------------------------------
    def _enter(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self.handles = []
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            self._ctx.__enter__()

    def _exit(self, *args: Any) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)

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
