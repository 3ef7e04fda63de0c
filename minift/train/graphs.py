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

A checkpointed vision tower stays outside the graphs (`vision_outside`): it runs eagerly before
each replay, offloading its saved layer inputs to the host (copies into host memory that a replay
could not repeat safely; kept on the GPU they cost ~1 GB for four 896-pixel images), and the graph
reads its features from a static leaf tensor whose gradient the tower's eager backward then takes.
The tower's thousands of patches an image keep its kernels large, so it is not what binds the
host; the decoder's short rows are.

One graph per input signature (shapes and dtypes of the padded batch), all sharing one memory
pool: replays run one at a time on one stream and their outputs (the loss, the features'
gradient) are read before the next replay. A signature's first micro-batch runs eagerly
(compiling or recompiling, loading kernels: neither may happen inside a capture); its second is
captured and replayed, and every later one only replayed. A capture that fails (an op that
synchronises with the host, a kernel loaded lazily) turns graphs off for the rest of the run,
with a warning saying why; that micro-batch then runs eagerly, as it would have.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import bucket_length, pad_batch
from .report import log

Signature = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


class _Graph:
    __slots__ = ("graph", "inputs", "loss")

    def __init__(self, graph: Any, inputs: dict[str, torch.Tensor], loss: torch.Tensor):
        self.graph, self.inputs, self.loss = graph, inputs, loss


Inputs = dict[str, torch.Tensor]
Tower = tuple[Inputs, torch.Tensor | None]  # run_tower's result


def run_tower(engine: nn.Module, inputs: Inputs) -> Tower:
    """The vision tower split off a micro-batch: the other inputs and the features of its
    pixel_values (with their autograd graph), or (inputs, None) when it has no images."""
    if "pixel_values" not in inputs:
        return inputs, None
    rest = dict(inputs)
    return rest, engine.image_features(rest.pop("pixel_values"))


def forward_backward(engine: nn.Module, inputs: Inputs, normalizer: torch.Tensor | float, forward_kw: dict[str, Any],
                     vision_outside: bool = False, tower: Tower | None = None) -> torch.Tensor:
    """One micro-batch's forward and backward, eagerly; returns the detached loss.
    `vision_outside`: the tower's features enter as a leaf and its backward runs from that leaf's
    gradient, in two backward calls, as the graphs split it (the same gradients as one);
    `tower`: run_tower's result when the caller ran it already."""
    if not vision_outside:
        loss = engine(**inputs, loss_normalizer=normalizer, **forward_kw).loss
        loss.backward()
        return loss.detach()
    rest, feats = tower if tower is not None else run_tower(engine, inputs)
    if feats is None:
        return forward_backward(engine, rest, normalizer, forward_kw)
    leaf = feats.detach().requires_grad_(feats.requires_grad)  # a frozen tower needs no gradient
    loss = engine(**rest, image_features=leaf, loss_normalizer=normalizer, **forward_kw).loss
    loss.backward()
    if feats.requires_grad:
        feats.backward(leaf.grad)
    return loss.detach()


class MicroBatchGraphs:
    """Runs micro-batches (forward + backward, loss / normaliser) as replayed CUDA graphs.

    engine: what the loop calls (the model); params: the trainable parameters (their `.grad`
    become persistent buffers: zero them with `zero_grad(set_to_none=False)`); max_length: the
    longest row the run allows (no bucket pads past it); max_graphs: signatures beyond this many
    run eagerly (each graph holds its own launch list; memory is shared); vision_outside: a vision
    model's tower runs eagerly outside the graphs (see the module docstring)."""

    def __init__(self, engine: nn.Module, params: list[torch.Tensor], device: torch.device, *, pad_id: int,
                 max_length: int | None = None, forward_kw: dict[str, Any] | None = None, max_graphs: int = 64,
                 vision_outside: bool = False):
        if device.type != "cuda":
            raise ValueError("MicroBatchGraphs needs a CUDA device")
        self.engine, self.params, self.device = engine, params, device
        self.pad_id, self.max_length, self.max_graphs = pad_id, max_length, max_graphs
        self.vision_outside = vision_outside and hasattr(engine, "image_features")
        self.forward_kw = dict(forward_kw or {})
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

    def _eager(self, inputs: Inputs, tower: Tower | None = None) -> torch.Tensor:
        self.eager_runs += 1
        return forward_backward(self.engine, inputs, self._norm, self.forward_kw, self.vision_outside, tower)

    def _capture(self, sig: Signature, inputs: dict[str, torch.Tensor]) -> _Graph | None:
        """Captures one signature's forward + backward reading `inputs` (device tensors allocated
        before the capture, so outside the graphs' pool: they become the graph's static inputs);
        None (and graphs off) when capture fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                loss = self.engine(**inputs, loss_normalizer=self._norm, **self.forward_kw).loss
                loss.backward()
        except Exception as e:  # noqa: BLE001 - any capture failure: fall back to eager for good
            self.enabled, self.failure = False, f"{type(e).__name__}: {e}"
            log.warning("cuda_graphs: capturing a micro-batch of shape %s failed, so the rest of the run "
                        "runs without CUDA graphs (%s)", tuple(inputs["input_ids"].shape), self.failure)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        g = _Graph(graph, inputs, loss.detach())
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
        outside = self.vision_outside and "pixel_values" in padded
        if g is None:
            inputs = self._to_device(padded)
            if sig not in self._warm or len(self.graphs) >= self.max_graphs:
                # a new shape runs eagerly first: it compiles (or recompiles) and loads its kernels,
                # which must not happen inside a capture
                self._warm.add(sig)
                return self._eager(inputs)
            tower = run_tower(self.engine, inputs) if outside else None
            static = inputs
            if tower is not None:  # the graph reads the features from a leaf allocated outside its pool
                feats = tower[1]
                static = {**tower[0], "image_features": torch.empty_like(feats).requires_grad_(feats.requires_grad)}
            torch.cuda.empty_cache()  # the eager runs' cached blocks, back for the graphs' pool
            g = self._capture(sig, static)
            if g is None:
                return self._eager(inputs, tower)
            # capture ran no kernel: replay computes this micro-batch (its inputs are already in place)
        else:
            tower = None
            if outside:
                pixels = padded["pixel_values"].pin_memory().to(self.device, non_blocking=True)
                tower = run_tower(self.engine, {"pixel_values": pixels})
            for k, v in padded.items():
                if k in g.inputs:
                    g.inputs[k].copy_(v.pin_memory(), non_blocking=True)
        if tower is not None:
            leaf = g.inputs["image_features"]
            with torch.no_grad():
                leaf.copy_(tower[1])
        g.graph.replay()
        self.replays += 1
        loss = g.loss.clone()  # the next replay overwrites g.loss
        if tower is not None and tower[1].requires_grad:
            tower[1].backward(leaf.grad)  # the tower's backward, eagerly, from the graph's features gradient
        return loss

    def release(self) -> None:
        """Frees the graphs, their pool and the persistent gradients (call after training)."""
        self.graphs.clear()
        self._pool = None
        for p in self.params:
            p.grad = None

    def stats(self) -> dict[str, Any]:
        return dict(graphs=len(self.graphs), replays=self.replays, eager_runs=self.eager_runs,
                    padded_tokens=self.padded_tokens, vision_outside=self.vision_outside, failure=self.failure)
