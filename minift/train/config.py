"""`TrainConfig`: every knob of the training loop, validated before any step runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import TrainConfigError

SCHEDULERS = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")


@dataclass
class TrainConfig:
    """Training settings. Defaults follow common LoRA recipes (unsloth's notebooks).

    Data order: each epoch's examples (or packed rows) are shuffled once with
    `torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))`; optimizer step i
    of an epoch takes the next `batch_size * grad_accum` of them, so the order never depends on
    how a step is split into micro-batches.
    """

    batch_size: int = 2
    """Examples (or packed rows, with `packing`) per micro-batch, i.e. per forward pass."""
    grad_accum: int = 4
    """Micro-batches per optimizer step. The loss of a step is normalised by the target-token
    count of all its micro-batches, so k micro-batches of n equal one batch of k*n."""
    max_steps: int | None = None
    """Optimizer steps to run. Takes precedence over `epochs`; None: run `epochs` epochs."""
    epochs: float = 1.0
    """Passes over the data when `max_steps` is None (fractions allowed: 0.5 = half an epoch)."""
    lr: float = 2e-4
    """Peak learning rate (after warmup) of every trainable parameter but the embedding group."""
    embedding_lr: float | None = None
    """Learning rate of trainable embeddings / lm_head (modules_to_save); None: `lr`. Useful
    because embeddings tolerate only a much smaller rate (unsloth suggests lr / 2..10)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to matrices only (not biases, norms or 1-d vectors)."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to `lr`. Takes precedence over `warmup_ratio` when > 0."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps (ceil, as transformers does) when warmup_steps is 0."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warmup, with transformers' get_*_schedule_with_warmup formulas."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None or 0 disables clipping."""
    optimizer: Literal["adamw", "adamw_8bit", "sgd"] = "adamw"
    """"adamw": torch AdamW (fused on CUDA, foreach on CPU); "adamw_8bit": bitsandbytes'
    8-bit AdamW (optimizer state in 8 bits); "sgd": plain SGD (no momentum)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_seq_length: int | None = None
    """Longest example (or packed row) in tokens; longer examples are truncated and counted.
    None: the model's `max_seq_length` from `minift.load`, else 2048."""
    packing: bool = False
    """Padding-free packing: examples are concatenated into rows of up to max_seq_length tokens,
    position ids restart per example and attention never crosses examples. Text only."""
    train_on_responses_only: bool = False
    """Loss on assistant turns (or completions) only; every other token gets label -100."""
    gradient_checkpointing: bool | str = True
    """False, True (recompute each decoder layer in the backward) or "offload" (also keep each
    layer's input in pinned CPU memory until the backward needs it)."""
    compile: bool | None = None
    """torch.compile each decoder layer (inductor fuses the elementwise work around our kernels;
    on an H100 this took LoRA training of Llama-3.2-1B from 25-30k to 54k tokens/s, see
    bench/RESULTS.md). None: on when the model is on CUDA, off on CPU (compiling costs more than
    it saves on small CPU runs)."""
    seed: int = 3407
    """Seeds torch / python / numpy at the start and the data order of every epoch."""
    logging_steps: int = 1
    """Log (and read the loss back from the device) every this many optimizer steps."""
    eval_steps: int | None = None
    """Evaluate on eval_dataset every this many steps (and at the end); None: only at the end."""
    save_steps: int | None = None
    """Write a checkpoint every this many steps; None: no intermediate checkpoints."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (the oldest are deleted); None: keep all."""
    output_dir: str = "outputs"
    """Where metrics.jsonl, checkpoint-N/, the final adapter/weights and loss.png go."""
    resume_from: str | None = None
    """A checkpoint directory, or "latest" (the newest complete one in output_dir)."""
    shuffle: bool = True
    """Shuffle the data each epoch (seeded); False keeps dataset order."""
    progress_bar: bool = True
    """Show a tqdm progress bar."""
    plot: bool = True
    """Write loss.png at the end (needs matplotlib; otherwise one log line says it was skipped)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form values copied into the checkpoint's trainer_state.json (e.g. a run name)."""

    def validate(self) -> None:
        """Raises TrainConfigError naming the first bad field."""
        def bad(name: str, why: str) -> None:
            raise TrainConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("batch_size", "grad_accum", "logging_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be an integer >= 1")
        for name in ("max_steps", "eval_steps", "save_steps", "save_total_limit", "max_seq_length"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                bad(name, "must be None or an integer >= 1")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            bad("max_seq_length", "must be >= 2 (a next-token loss needs two tokens)")
        if self.max_steps is None and not (self.epochs > 0):
            bad("epochs", "must be > 0 when max_steps is None")
        if not (self.lr >= 0):
            bad("lr", "must be >= 0")
        if self.embedding_lr is not None and not (self.embedding_lr >= 0):
            bad("embedding_lr", "must be None or >= 0")
        if not (self.weight_decay >= 0):
            bad("weight_decay", "must be >= 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            bad("warmup_steps", "must be an integer >= 0")
        if not (0.0 <= self.warmup_ratio < 1.0):
            bad("warmup_ratio", "must be in [0, 1)")
        if self.scheduler not in SCHEDULERS:
            bad("scheduler", f"must be one of {SCHEDULERS}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"must be one of {OPTIMIZERS}")
        if self.max_grad_norm is not None and not (self.max_grad_norm >= 0):
            bad("max_grad_norm", "must be None or >= 0")
        if self.gradient_checkpointing not in (False, True, "offload"):
            bad("gradient_checkpointing", 'must be False, True or "offload"')
        if not isinstance(self.output_dir, (str, bytes)) and not hasattr(self.output_dir, "__fspath__"):
            bad("output_dir", "must be a path")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output_dir"] = str(self.output_dir)
        return d
