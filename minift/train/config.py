"""`TrainConfig`: every knob of the training loop, validated before any step runs."""

from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import TrainConfigError

SCHEDULERS = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")
REPORT_TO = ("none", "tensorboard", "wandb", "all")


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
    """False, True (recompute each decoder layer in the backward), "offload" (also keep each
    layer's input in pinned CPU memory until the backward needs it) or "auto": the fastest plan
    whose estimated peak (`minift.train.memory`) fits `memory_budget_gb`, else the GPU's memory -
    no checkpointing, else the fewest layers checkpointed, else all, else offloaded if the host's
    memory can hold the offloaded inputs (else all checkpointed with chunked MLPs; off CUDA without
    a budget: True). The choice is `Trainer.memory_plan` and is logged."""
    memory_budget_gb: float | None = None
    """With gradient_checkpointing="auto": the peak GPU memory (GiB, as torch.cuda.max_memory_allocated
    counts it) the plan must fit in, 10% of it kept as margin. None: what the GPU has (free + held)."""
    mlp_chunk_tokens: int | None = None
    """Long context: each decoder layer's MLP runs over this many tokens at a time, each chunk
    checkpointed, so its intermediate-sized activations (~60% of a Llama layer's) exist for one chunk
    instead of the whole batch. With checkpointed layers the chunks' recomputes replace the layers'
    (no extra FLOPs); without, one more MLP forward a step. None: off, unless
    gradient_checkpointing="auto" finds that even offloaded checkpoints do not fit (then 8192)."""
    merge_micro_batches: bool | str = "auto"
    """Run the grad_accum micro-batches of an optimizer step as one forward and backward over all
    their rows (padded to the longest): the same gradient (the loss is normalised by the step's
    target count either way) at a fraction of the kernel launches, which is what bounds short
    rows at a small batch_size. "auto": on CUDA when the merged batch's estimated peak
    (`minift.train.memory`) fits memory_budget_gb, else the GPU's memory (with
    gradient_checkpointing="auto", when a plan for the merged batch fits without offloading);
    off on CPU. True: always; False: never (the lower peak of one micro-batch at a time)."""
    compile: bool | None = None
    """torch.compile each decoder layer (inductor fuses the elementwise work around our kernels;
    on an H100 this took LoRA training of Llama-3.2-1B from 25-30k to 54k tokens/s, see
    bench/RESULTS.md). None: on when the model is on CUDA, off on CPU (compiling costs more than
    it saves on small CPU runs)."""
    cuda_graphs: bool | str = "auto"
    """Replay each micro-batch's forward and backward as a CUDA graph (train/graphs.py): one launch
    instead of thousands, for steps bound by the host (small models, short rows: the Gemma 3
    vision notebook's job ran 3.8x faster on an H100, see bench/RESULTS.md). Rows are right-padded
    to bucket lengths (<= 12.5% more tokens; the loss and gradients are unchanged); each new length
    runs eagerly once, then is captured; offloaded checkpoints (a vision tower's, "offload")
    are copied to the host inside the graphs, into page-locked buffers kept for the run. Needs CUDA
    and one process.
    "auto": on where it can be, if the step's estimated peak is at most half the memory budget
    (the graphs' memory pool is kept apart); True: on where it can be (else off, with a log line);
    False: off."""
    distributed: str | None = "auto"
    """Data parallel under torchrun: "auto" (DDP when launched by torchrun, else one process),
    "ddp", "fsdp" (FSDP2, each decoder layer sharded) or None (one process). batch_size is per
    rank: a step takes batch_size x grad_accum x world size examples (see train/distributed.py)."""
    seed: int = 3407
    """Seeds torch / python / numpy at the start and the data order of every epoch."""
    logging_steps: int = 1
    """Log (and read the loss back from the device) every this many optimizer steps. A logged
    loss is the mean of the step losses since the previous record (its logging window)."""
    logging_first_step: bool = True
    """Also log step 1 when logging_steps > 1 (transformers' name), so metrics.jsonl and the curves
    start at the loss before the first update; its record's loss is step 1's alone (its window)."""
    loss_explosion_factor: float | None = 3.0
    """Warn (minift.train.LossWarning, once per train() call) when the loss explodes: the mean of the
    last 3 step losses is above this many times the lowest such mean so far and above step 1's loss
    (see train/monitor.py). The usual cause is a too large lr. None: no check."""
    loss_stall_steps: int | None = 10
    """Warn (LossWarning, once per train() call) when the loss does not move for this many steps:
    the learning rate is 0, the gradient norm is 0 (with clipping on) or the step losses stay within
    loss_stall_tolerance (lr=1e6 saturates a model into a constant loss). None: no check."""
    loss_stall_tolerance: float = 1e-5
    """The relative spread ((max - min) / mean) of loss_stall_steps step losses counted as not moving."""
    report_to: str | list[str] = "none"
    """Where the logged metrics also go, beside metrics.jsonl: "none"; "tensorboard" (event files
    through torch.utils.tensorboard in logging_dir; needs `pip install minift[tensorboard]`);
    "wandb" (Weights & Biases; `pip install minift[wandb]`; WANDB_MODE=offline works without a
    network); "all" (each of those that is installed); or a list of them."""
    logging_dir: str | None = None
    """TensorBoard's event directory; None: output_dir/runs."""
    run_name: str | None = None
    """The W&B run name (None: W&B picks one)."""
    wandb_project: str | None = None
    """The W&B project (None: WANDB_PROJECT, else W&B's default)."""
    peak_tflops: float | None = None
    """The accelerator's peak dense TFLOP/s in the compute dtype (e.g. 989 for an H100 SXM in
    bf16): with it each record gets `mfu` = 6 * parameters * tokens/s / (peak_tflops * 1e12)
    (parameters: every weight but an untied input embedding, 4-bit ones counted unpacked);
    None: no MFU."""
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
    save_on_interrupt: bool = True
    """Ctrl-C (SIGINT) during train(): finish the running step, write a resumable checkpoint-N in
    output_dir and raise minift.train.TrainingInterrupted (a KeyboardInterrupt); a second Ctrl-C
    stops at once. False: Ctrl-C raises KeyboardInterrupt wherever it lands, saving nothing."""
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
        if self.distributed not in ("auto", "ddp", "fsdp", None):
            bad("distributed", 'must be "auto", "ddp", "fsdp" or None')
        if self.gradient_checkpointing not in (False, True, "offload", "auto"):
            bad("gradient_checkpointing", 'must be False, True, "offload" or "auto"')
        m = self.mlp_chunk_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            bad("mlp_chunk_tokens", f"must be None or a number of tokens >= 1, got {m!r}")
        if self.merge_micro_batches not in (False, True, "auto"):
            bad("merge_micro_batches", 'must be False, True or "auto"')
        if self.memory_budget_gb is not None:
            b = self.memory_budget_gb
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
                bad("memory_budget_gb", f"must be a number of GiB > 0, got {b!r}")
            if self.gradient_checkpointing != "auto":
                bad("memory_budget_gb", 'is the budget of gradient_checkpointing="auto"; set that too')
        kinds = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        if not isinstance(kinds, (list, tuple)) or not all(isinstance(k, str) and k in REPORT_TO for k in kinds):
            bad("report_to", f"must be one of {REPORT_TO} or a list of them")
        if self.peak_tflops is not None and (
                isinstance(self.peak_tflops, bool) or not isinstance(self.peak_tflops, (int, float))
                or not self.peak_tflops > 0):
            bad("peak_tflops", "must be None or a number > 0")
        f = self.loss_explosion_factor
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 1):
            bad("loss_explosion_factor", "must be None or a number > 1")
        v = self.loss_stall_steps
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 2):
            bad("loss_stall_steps", "must be None or an integer >= 2")
        t = self.loss_stall_tolerance
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1:
            bad("loss_stall_tolerance", "must be a number in [0, 1)")
        if self.cuda_graphs not in (False, True, "auto"):
            bad("cuda_graphs", 'must be False, True or "auto"')
        for name in ("save_on_interrupt", "logging_first_step"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        if not isinstance(self.output_dir, (str, bytes)) and not hasattr(self.output_dir, "__fspath__"):
            bad("output_dir", "must be a path")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output_dir"] = str(self.output_dir)
        return d


_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# transformers' TrainingArguments / TRL names people carry over, and the field each one means
_ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler", "optim": "optimizer",
    "max_seq_len": "max_seq_length", "max_length": "max_seq_length", "warmup": "warmup_steps",
    "resume_from_checkpoint": "resume_from", "report": "report_to",
}
_dataclass_init = TrainConfig.__init__


@functools.wraps(_dataclass_init)
def _checked_init(self, *args, **kwargs):
    """TrainConfig(...) with a misspelt or unknown field raises TrainConfigError naming it and the
    closest valid field, instead of the dataclass's bare TypeError."""
    for k in kwargs:
        if k not in _FIELDS:
            close = _ALIASES.get(k) or next(iter(difflib.get_close_matches(k, _FIELDS, n=1, cutoff=0.6)), None)
            hint = f"; did you mean {close!r}?" if close else f"; the fields are {', '.join(_FIELDS)}"
            raise TrainConfigError(f"TrainConfig: unknown field {k!r}{hint}")
    if len(args) > len(_FIELDS):
        raise TrainConfigError(f"TrainConfig: takes at most {len(_FIELDS)} positional arguments, got {len(args)}")
    for name in _FIELDS[: len(args)]:
        if name in kwargs:
            raise TrainConfigError(f"TrainConfig: field {name!r} given both by position and by name")
    _dataclass_init(self, *args, **kwargs)


TrainConfig.__init__ = _checked_init
