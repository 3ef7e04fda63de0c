"""CUDA graphs over a micro-batch's forward and backward (`TrainConfig(cuda_graphs=True)`).

A LoRA step on a small model, or on short rows, is bound by the host: Python, the compiled
graphs' wrappers and thousands of kernel launches a step, while the GPU waits. Replaying a
captured CUDA graph launches all of a micro-batch's forward and backward kernels in one call.

How it stays the same training step:
- a graph replays fixed shapes, so each micro-batch is right-padded to a bucket length
  (`data.bucket_length`: at most 12.5% more tokens, 8 lengths per doubling) with `data.pad_batch`,
  which changes no real token's loss or gradient (causal model, -100 labels on the pads);
- gradients accumulate in place into `.grad` tensors allocated once, outside the graphs (the
  optimizer, clipping and zeroing run eagerly between replays, so the learning-rate schedule and
  every optimizer work unchanged);
- the loss normaliser is a device scalar the graph reads, filled before each replay.

Offloaded checkpoints (a checkpointed vision tower's, always; the decoder's with "offload") are
captured too: their copies to the host and back become nodes of the graph, into page-locked host
buffers that belong to the graphs (`offload.HostArena`), laid out from what the same signature
offloaded when it ran eagerly. Kept on the GPU instead, the tower's checkpoints cost ~1 GB for
four 896-pixel images; run eagerly outside the graphs (the fourteenth session's design), the
tower made the notebook job's step 2.4x longer (3.98 samples/s on an H100 against 9.65 with it
inside; bench/RESULTS.md).

One graph per input signature (shapes and dtypes of the padded batch), all sharing one memory
pool: replays run one at a time on one stream and their output (the loss) is read before the
next replay. A signature's first micro-batch runs eagerly
(compiling or recompiling, loading kernels: neither may happen inside a capture); its second is
captured and replayed, and every later one only replayed. A capture that fails (an op that
synchronises with the host, a kernel loaded lazily) turns graphs off for the rest of the run,
with a warning saying why; that micro-batch then runs eagerly, as it would have.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .data import bucket_length, pad_batch
from .report import log

Signature = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


def _release_generator(device: torch.device) -> None:
    """After a failed capture: the device's random generator, registered with that capture, was
    never released by it (torch releases it only when the capture ends cleanly), and would refuse
    every later random draw outside a capture. It gets a fresh state with the same seed and offset."""
    gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    gen.graphsafe_set_state(gen.clone_state())


class _Graph:
    __slots__ = ("graph", "inputs", "loss", "arenas")

    def __init__(self, graph: Any, inputs: dict[str, torch.Tensor], loss: torch.Tensor, arenas: list[Any]):
        self.graph, self.inputs, self.loss = graph, inputs, loss
        self.arenas = arenas  # the host buffers its offloading copies write and read at every replay


class MicroBatchGraphs:
    """Runs micro-batches (forward + backward, loss / normaliser) as replayed CUDA graphs.

    engine: what the loop calls (the model); params: the trainable parameters (their `.grad`
    become persistent buffers: zero them with `zero_grad(set_to_none=False)`); max_length: the
    longest row the run allows (no bucket pads past it); max_graphs: signatures beyond this many
    run eagerly (each graph holds its own launch list; memory is shared); offloaders: the
    ActivationOffloaders installed on the model (their copies to the host are captured too, into
    host buffers kept for the graphs' life)."""

    def __init__(self, engine: nn.Module, params: list[torch.Tensor], device: torch.device, *, pad_id: int,
                 max_length: int | None = None, forward_kw: dict[str, Any] | None = None, max_graphs: int = 64,
                 offloaders: list[Any] | None = None):
        if device.type != "cuda":
            raise ValueError("MicroBatchGraphs needs a CUDA device")
        self.engine, self.params, self.device = engine, params, device
        self.pad_id, self.max_length, self.max_graphs = pad_id, max_length, max_graphs
        self.forward_kw = dict(forward_kw or {})
        self.offloaders = list(offloaders or [])
        self._traces: dict[Signature, list[Any]] = {}  # what each offloader copied in a signature's eager run
        self.graphs: dict[Signature, _Graph] = {}
        self.enabled = True
        self.failure: str | None = None
        self.eager_runs = 0  # micro-batches run without a graph (each signature's first; after a failure)
        self.replays = 0
        self.padded_tokens = 0  # bucket padding added over the run (tokens)
        self._pool: Any = None
        self._warm: set[Signature] = set()  # signatures run eagerly once (compiled, kernels loaded)
        self._norm = torch.zeros((), dtype=torch.float32, device=device)
        for p in params:  # persistent gradients: the graphs' backward accumulates into them
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _pad(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = tensors["input_ids"].shape[1]
        length = bucket_length(n, self.max_length)
        self.padded_tokens += (length - n) * tensors["input_ids"].shape[0]
        return pad_batch(tensors, length, self.pad_id)

    @staticmethod
    def _signature(tensors: dict[str, torch.Tensor]) -> Signature:
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(tensors.items()))

    def _to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in tensors.items()}

    def _eager(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.eager_runs += 1
        loss = self.engine(**inputs, loss_normalizer=self._norm, **self.forward_kw).loss
        loss.backward()
        for off in self.offloaders:
            off.join()
        return loss.detach()

    def _capture(self, sig: Signature, inputs: dict[str, torch.Tensor]) -> _Graph | None:
        """Captures one signature's forward + backward reading `inputs` (device tensors allocated
        before the capture, so outside the graphs' pool: they become the graph's static inputs);
        None (and graphs off) when capture fails."""
        graph = torch.cuda.CUDAGraph()
        traces = self._traces.get(sig, [[] for _ in self.offloaders])
        try:
            with contextlib.ExitStack() as stack:
                arenas = [stack.enter_context(off.capturing(tr)) for off, tr in zip(self.offloaders, traces)]
                # a recompile would run the compiler's benchmarks inside the capture and invalidate it
                # with an unrelated error; this way the failure names the guard that changed
                stack.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
                with torch.cuda.graph(graph, pool=self._pool):
                    try:
                        loss = self.engine(**inputs, loss_normalizer=self._norm, **self.forward_kw).loss
                        loss.backward()
                    finally:  # the capture ends joined, so an error inside it is the one reported
                        for off in self.offloaders:
                            off.join()
        except Exception as e:  # noqa: BLE001 - any capture failure: fall back to eager for good
            _release_generator(self.device)
            self.enabled, self.failure = False, f"{type(e).__name__}: {e}"
            log.warning("cuda_graphs: capturing a micro-batch of shape %s failed, so the rest of the run "
                        "runs without CUDA graphs (%s)", tuple(inputs["input_ids"].shape), self.failure)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        g = _Graph(graph, inputs, loss.detach(), arenas)
        self.graphs[sig] = g
        return g

    def run(self, tensors: dict[str, torch.Tensor], normalizer: float) -> torch.Tensor:
        """One micro-batch's forward and backward (host tensors from `collate`); returns its loss
        (summed cross-entropy / normalizer) as a device scalar, without a host sync."""
        self._norm.fill_(normalizer)
        if not self.enabled:
            return self._eager(self._to_device(tensors))
        padded = self._pad(tensors)
        sig = self._signature(padded)
        g = self.graphs.get(sig)
        if g is None:
            inputs = self._to_device(padded)
            if sig not in self._warm or len(self.graphs) >= self.max_graphs:
                # a new shape runs eagerly first: it compiles (or recompiles) and loads its kernels,
                # which must not happen inside a capture; what it offloads lays out the capture's host buffers
                self._warm.add(sig)
                for off in self.offloaders:  # a module this micro-batch does not run must not keep an old trace
                    off.trace = []
                loss = self._eager(inputs)
                self._traces[sig] = [list(off.trace) for off in self.offloaders]
                return loss
            torch.cuda.empty_cache()  # the eager runs' cached blocks, back for the graphs' pool
            g = self._capture(sig, inputs)
            if g is None:
                return self._eager(inputs)
            # capture ran no kernel: replay computes this micro-batch (its inputs are already in place)
        else:
            for k, v in padded.items():
                g.inputs[k].copy_(v.pin_memory(), non_blocking=True)
        g.graph.replay()
        self.replays += 1
        return g.loss.clone()  # the next replay overwrites g.loss

    def release(self) -> None:
        """Frees the graphs, their pool and the persistent gradients (call after training)."""
        self.graphs.clear()
        self._pool = None
        for p in self.params:
            p.grad = None

    def stats(self) -> dict[str, Any]:
        return dict(graphs=len(self.graphs), replays=self.replays, eager_runs=self.eager_runs,
                    padded_tokens=self.padded_tokens, failure=self.failure,
                    host_arena_bytes=sum(off.arena_bytes for off in self.offloaders),
                    unused_fetches=sum(off.unused_fetches for off in self.offloaders))  # 0: no copy wasted
