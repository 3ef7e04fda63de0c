"""Ctrl-C during `Trainer.train()` (TrainConfig.save_on_interrupt): stop at a step boundary,
write a resumable checkpoint, then raise `TrainingInterrupted`.

A KeyboardInterrupt raised wherever the signal lands could cut an optimizer step in half (AdamW's
moments updated, the weights not yet), and the RNG would have drawn part of the next step's
dropout, so a checkpoint written then would not resume to the uninterrupted losses. Instead,
while `SigintGuard` is active, the first SIGINT only records the request; the loop checks it after
each step (and between eval batches) and stops there, in exactly the state a `save_steps`
checkpoint captures. A second SIGINT in one process raises KeyboardInterrupt at once: a save it
lands in is abandoned by the atomic writer (checkpoint-N absent, its temporary removed), the
earlier checkpoints are kept. Under torchrun (which forwards the signal to every rank and kills
them after its own timeout) further signals are ignored while the ranks finish, and the ranks
agree on the stop through the loss all-reduce of the next logging point.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("minift.train")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `Trainer.train()` at the end of step `step`. A KeyboardInterrupt (code that
    stops on Ctrl-C still stops; `except Exception` does not swallow it) that says where the
    resumable checkpoint is (`checkpoint`; None when a second Ctrl-C abandoned its save, then
    `last_checkpoint` is the newest complete one, if any)."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path | None, last_checkpoint: Path | None):
        self.step, self.total_steps = step, total_steps
        self.checkpoint, self.last_checkpoint = checkpoint, last_checkpoint
        if checkpoint is not None:
            where = f"saved a resumable checkpoint in {checkpoint}"
        elif last_checkpoint is not None:
            where = f"interrupted again while saving, so no checkpoint of step {step}; the last complete one is {last_checkpoint}"
        else:
            where = "no checkpoint was saved"
        self.what = f"training interrupted after step {step} of {total_steps}: {where}"
        resume = "; resume with TrainConfig(resume_from='latest')" if (checkpoint or last_checkpoint) else ""
        super().__init__(self.what + resume)

    @property
    def resumable(self) -> Path | None:
        """The checkpoint resume_from='latest' continues from."""
        return self.checkpoint or self.last_checkpoint


class SigintGuard:
    """While active, the first SIGINT sets `requested` instead of raising; a second one raises
    KeyboardInterrupt when `escalate` (one process), else is ignored. Installed only in the main
    thread and only over Python's default SIGINT handler (an application's own handler, or an
    ignored SIGINT, is left as it is: then Ctrl-C behaves as without the guard)."""

    def __init__(self, escalate: bool, announce: bool = True):
        self.escalate = escalate
        self.announce = announce  # log the request (rank 0 only)
        self.requested = False
        self.active = False
        self._old: Any = None

    def __enter__(self) -> "SigintGuard":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handle)
            self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def restore(self) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self._old)
            self.active = False

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            self.requested = True
            if self.announce:
                log.warning("Ctrl-C: stopping after this step and saving a checkpoint%s",
                            " (Ctrl-C again stops at once, without it)" if self.escalate else "")
            return
        if self.escalate:
            self.restore()
            raise KeyboardInterrupt
