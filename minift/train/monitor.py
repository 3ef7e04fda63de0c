"""Watching the loss for the two failures a user fixes by changing the learning rate: a loss that
explodes, and a loss that does not move (lr=1e6 saturates a model into a constant loss with a
zero gradient; lr=0 or frozen weights never move it). `LossMonitor` sees the step losses and
gradient norms the Trainer already reads back at each logging point, so it adds no device sync,
and it warns (`LossWarning`) at most once per kind per `train()` call.

Exploding: `EXPLOSION_WINDOW`-step running means of the step losses are compared with the lowest
such mean so far (the first steps' partial means included, so step 1's loss counts: the model
before any update). A running mean above both `explosion_factor` x that lowest mean and step 1's
loss (worse than where training started) warns: smoothing over a few steps and requiring "worse
than the start" keep one hard batch, or a hard batch after the loss fell far, from warning.

Not moving: over the last `stall_steps` steps, every step's learning rate was 0 in every
parameter group, or every step's gradient norm was 0 (when clipping computes it), or the step
losses' spread (max - min) stayed within `stall_tolerance` x their mean.
"""

from __future__ import annotations

import math
from collections import deque

EXPLOSION_WINDOW = 3  # steps in the running mean the explosion check compares


class LossWarning(UserWarning):
    """The training loss is exploding or not moving (TrainConfig.loss_explosion_factor,
    loss_stall_steps, loss_stall_tolerance); the message says which and what to change."""


class LossMonitor:
    """Feeds on (step, loss, grad_norm, lr) and returns the warnings due, each kind once."""

    def __init__(self, explosion_factor: float | None, stall_steps: int | None, stall_tolerance: float):
        self.explosion_factor = explosion_factor
        self.stall_steps = stall_steps
        self.stall_tolerance = stall_tolerance
        self.first: float | None = None
        self.lowest = math.inf
        self.recent: deque[float] = deque(maxlen=EXPLOSION_WINDOW)
        self.window: deque[tuple[float, float | None, float]] = deque(maxlen=stall_steps or 1)
        self.warned: set[str] = set()

    def observe(self, step: int, loss: float, grad_norm: float | None, lr: float) -> list[str]:
        """The warning messages this step triggers (empty for almost every step). `lr` is the
        largest learning rate over the parameter groups for this step."""
        out = []
        self.recent.append(loss)
        mean = sum(self.recent) / len(self.recent)
        if self.first is None:
            self.first = loss
        f = self.explosion_factor
        if f is not None and "explode" not in self.warned and mean > f * self.lowest and mean > self.first:
            self.warned.add("explode")
            n = len(self.recent)
            out.append(
                f"loss is exploding: {mean:.4g} at step {step} (mean of the last {n} steps) is more than "
                f"{f:g}x the lowest so far ({self.lowest:.4g}) and above step 1's loss ({self.first:.4g}). The "
                f"learning rate is probably too high: lower learning_rate (now {lr:g} at most), add warmup or "
                "keep max_grad_norm on (TrainConfig.loss_explosion_factor=None silences this)"
            )
        self.lowest = min(self.lowest, mean)
        if self.stall_steps is None or "stall" in self.warned:
            return out
        self.window.append((loss, grad_norm, lr))
        if len(self.window) < self.stall_steps:
            return out
        losses = [w[0] for w in self.window]
        norms = [w[1] for w in self.window]
        causes = []
        if all(w[2] == 0 for w in self.window):
            causes.append("the learning rate is 0 in every parameter group")
        if all(g is not None and g == 0 for g in norms):
            causes.append("the gradient norm is 0 (nothing receives a gradient: saturated outputs, frozen "
                          "weights or all labels -100)")
        spread = max(losses) - min(losses)
        if spread <= self.stall_tolerance * abs(sum(losses) / len(losses)):
            causes.append(f"the loss stayed at {losses[-1]:.6g} (spread {spread:.3g}, within "
                          f"loss_stall_tolerance={self.stall_tolerance:g} relative)")
        if causes:
            self.warned.add("stall")
            out.append(
                f"loss is not moving over the last {self.stall_steps} steps (to step {step}): "
                + "; ".join(causes) + ". Training is not learning: a far too large learning_rate (e.g. 1e6) "
                f"saturates the model, a zero one never moves it (now {lr:g} at most); check learning_rate and "
                "which parameters are trainable (TrainConfig.loss_stall_steps=None silences this)"
            )
        return out
