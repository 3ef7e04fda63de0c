"""`Trainer`: the training loop.

One optimizer step = grad_accum micro-batches. Their target tokens are counted on the host
before any forward pass, and each micro-batch's loss is its summed cross-entropy divided by that
count (`loss_normalizer`), so the accumulated gradient is exactly that of one big batch. Losses
accumulate on the device; the host reads them back only at logging / saving / eval points.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import random
import tempfile
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np
import torch
from torch import nn

from ..arch.siglip import VisionEncoder
from ..errors import DataError, NonFiniteLossError, TrainConfigError
from . import checkpoint as ckpt
from . import distributed, memory
from .config import TrainConfig
from .data import Batch, Schedule, bucket_length, collate, pack
from .formats import check_columns, columns_of, images_of, normalize_row
from .graphs import MicroBatchGraphs
from .interrupt import SigintGuard, TrainingInterrupted
from .monitor import LossMonitor, LossWarning
from .offload import ActivationOffloader
from .optim import make_optimizer, make_scheduler, trainable_parameters
from .report import Metrics, ensure_logging, flop_parameters, log, make_reporters, mfu, peak_memory_gb, plot_losses
from .report import resolve_report_to
from .tokenize import IGNORE, Example, make_encoder

DEFAULT_MAX_LENGTH = 2048


class _Interrupted(Exception):
    """Internal: Ctrl-C asked the loop to stop at this step boundary (see _stop_interrupted)."""


class _Quiet:
    """The metrics sink of a rank other than 0: rank 0 alone writes metrics.jsonl."""

    records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        pass


@dataclass
class TrainSummary:
    """What `Trainer.train()` returns. losses[i] is the loss of optimizer step i + 1 (mean over
    the step's target tokens)."""

    steps: int
    losses: list[float]
    tokens: int
    time_s: float
    tokens_per_s: float
    peak_memory_gb: float
    eval_loss: float | None = None
    output_dir: str = ""
    final_path: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    truncated: int = 0
    resumed_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _freeze_gc() -> bool:
    """Move every object alive after the first step (modules, compiled graphs, optimizer state) out of
    Python's cyclic GC until training ends. Its full (generation 2) collections walk all of them: on
    an H100, Gemma-3-4B NF4 stalled one step in a dozen by ~0.6 s (8% of 14 steps' throughput) until
    bench/train.py froze them. Garbage made by later steps is still collected. A process that froze
    objects itself keeps its own GC policy (False: nothing frozen here, nothing to undo)."""
    if gc.get_freeze_count():
        return False
    gc.collect()
    gc.freeze()
    return True


def compile_settings() -> contextlib.AbstractContextManager:
    """Dynamo settings the compiled layers are traced under: Python floats (norm eps and offsets,
    scales) as constants. Traced with dynamic shapes, they would first become symbolic inputs; a
    custom op then specialises them and dynamo restarts the whole analysis (`compile_attempt_1`):
    13 s of the notebook job's warm first step on an H200, ~10% of a cold compile on CPU."""
    return torch._dynamo.config.patch(specialize_float=True)


class Trainer:
    """Fine-tunes a minift model (LoRA, 4-bit LoRA, full, modules_to_save) on a dataset.

    train_dataset / eval_dataset: a datasets.Dataset or a list of dicts holding 'text',
    'messages', 'conversations' (ShareGPT) or 'prompt' + 'completion' rows (chats may carry PIL
    images for a vision model's processor). formatting_func maps each raw row first (to a dict
    row or a text string)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer_or_processor: Any,
        train_dataset: Any,
        *,
        eval_dataset: Any = None,
        config: TrainConfig | None = None,
        formatting_func: Callable[[Any], Any] | None = None,
    ):
        ensure_logging()
        self.cfg = cfg = config if config is not None else TrainConfig()
        cfg.validate()
        self.report_to = resolve_report_to(cfg.report_to)  # a missing tensorboard / wandb fails here
        self.model = model
        self.tokenizer = tokenizer_or_processor
        self.formatting_func = formatting_func
        self.output_dir = self._check_output_dir(Path(cfg.output_dir))
        self.max_length = cfg.max_seq_length or model.load_info.max_seq_length or DEFAULT_MAX_LENGTH
        self.device = next(model.parameters()).device
        self.world = distributed.setup(cfg.distributed, self.device)
        if not self.world.main:
            log.setLevel(logging.WARNING)  # one rank speaks
        self.encoder = make_encoder(tokenizer_or_processor, max_length=self.max_length,
                                    responses_only=cfg.train_on_responses_only)
        tok = self.encoder.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

        self.truncated = 0  # train examples cut to max_length
        self.train_units = self._prepare(train_dataset, "train_dataset")
        n_targets = sum(int((u.labels[1:] != -100).sum()) for u in self.train_units)
        if n_targets == 0:
            cause = (
                "train_on_responses_only=True found no assistant tokens: the chat template may not match the data "
                "(no 'assistant' turns, or a template that does not render them), or every response was truncated "
                f"away by max_seq_length={self.max_length}"
                if cfg.train_on_responses_only else
                f"every example is a single token or was masked (max_seq_length={self.max_length})"
            )
            raise DataError(
                f"train_dataset: all labels are -100 after formatting, so there is nothing to learn: {cause}"
            )
        self.eval_units = self._prepare(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.schedule = Schedule(len(self.train_units), cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.shuffle,
                                 world=self.world.size, rank=self.world.rank)
        self.unit_targets = [u.n_targets for u in self.train_units]
        self.total_steps = self.schedule.total_steps(cfg.max_steps, cfg.epochs)
        self.merge, self.memory_plan, self._graphs_choice = self._plan_memory()
        self._mask_always = False  # set by _maybe_compile: every batch with an attention_mask
        # what the loop calls: the model (FSDP2 shards it in place), or DDP around it; before the
        # optimizer, which must hold the sharded parameters
        self.engine = distributed.wrap(model, self.world, self.device)
        # FSDP shards the vision tower: every rank runs it every forward, images or not
        self._forward_kw = ({"always_run_vision": True}
                            if self.world.mode == "fsdp" and hasattr(model, "image_features") else {})
        self.optimizer = make_optimizer(model, cfg)
        self.lr_scheduler = make_scheduler(self.optimizer, cfg, self.total_steps)
        self.params = [p for _, p in trainable_parameters(model)]
        groups = [g.get("group", "") for g in self.optimizer.param_groups]
        self._lr_group = next((i for i, g in enumerate(groups) if g.startswith("body")), 0)  # the one logged
        self.step = 0
        self.losses: list[float] = []
        self.tokens = 0
        self.checkpoints: list[str] = []
        self.last_checkpoint: Path | None = None
        self.metrics: Metrics | None = None
        self._interrupt: SigintGuard | None = None
        self._stop_agreed = False
        self.graph_stats: dict[str, Any] | None = None  # TrainConfig.cuda_graphs' counts after train()

    # -- setup ---------------------------------------------------------------------------
    @staticmethod
    def _check_output_dir(path: Path) -> Path:
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as e:
            raise TrainConfigError(f"TrainConfig.output_dir={str(path)!r} is not a writable directory: {e}") from e
        return path

    def _check_dataset(self, dataset: Any, name: str) -> int:
        """The dataset's row count, after checking it can be read."""
        try:
            n = len(dataset)
        except TypeError as e:
            raise DataError(
                f"{name}: expected a datasets.Dataset or a list of dicts, got {type(dataset).__name__}"
            ) from e
        if n == 0:
            raise DataError(f"{name} is empty")
        if self.formatting_func is None:
            check_columns(columns_of(dataset), name)
        return n

    def _prepare(self, dataset: Any, name: str) -> list[Example]:
        n = self._check_dataset(dataset, name)
        stats = self.encoder.stats
        before = dict(stats)
        ff = self.formatting_func
        # a row's images are read back from the dataset when its batch needs their pixels (a
        # datasets.Dataset decodes them again), so neither decoded images nor pixels pile up
        indexable = hasattr(dataset, "__getitem__")

        def images_at(i: int) -> list[Any]:
            return images_of(normalize_row(dataset[i], i, ff).get("messages") or [])

        examples = []
        for i, row in enumerate(dataset):
            ex = self.encoder.encode(normalize_row(row, i, ff), functools.partial(images_at, i) if indexable else None,
                                     where=f"{name} row {i}")
            if ex is not None:
                examples.append(ex)
        truncated = stats["truncated"] - before["truncated"]
        dropped = stats["dropped_images_too_long"] - before["dropped_images_too_long"]
        if truncated:
            log.info("%s: %d of %d examples were longer than max_seq_length=%d and were truncated",
                     name, truncated, n, self.max_length)
        if dropped:
            log.info("%s: %d examples dropped: their image tokens run past max_seq_length=%d",
                     name, dropped, self.max_length)
        if name == "train_dataset":
            self.truncated = truncated
        if not examples:
            raise DataError(f"{name}: no example is left after formatting (see the lines above)")
        if self.cfg.packing:
            if any(ex.n_images for ex in examples):
                raise TrainConfigError("TrainConfig.packing=True is not supported with images; set packing=False")
            rows_ = pack(examples, self.max_length)
            log.info("%s: packed %d examples into %d rows of <= %d tokens", name, len(examples), len(rows_),
                     self.max_length)
            return rows_
        return examples

    def _batch(self, units: list[Example], idx: list[int]) -> Batch:
        examples = [units[i] for i in idx]
        if self._mask_always and len(examples) == 1:
            # One row in a run of several-row forwards (an epoch's ragged last step, a last eval
            # batch): dynamo specialises a batch of 1 and would compile a second graph mid-run. A
            # second row, the same example without targets, keeps the shape family; it adds nothing
            # to the loss or its gradient (targets and tokens are counted from the real units).
            examples.append(replace(examples[0], labels=torch.full_like(examples[0].labels, IGNORE)))
        return collate(examples, self.pad_id, mask=self._mask_always)

    def _plan_memory(self) -> tuple[bool, memory.MemoryPlan | None, tuple[bool, str | None]]:
        """Whether each step's micro-batches run merged (TrainConfig.merge_micro_batches); with
        gradient_checkpointing="auto", the checkpointing plan for the largest batch this run will
        see (the longest example x the rows of one forward), within memory_budget_gb or the
        device's memory (None otherwise); and whether micro-batches replay as CUDA graphs
        (TrainConfig.cuda_graphs), with the reason when they do not."""
        cfg = self.cfg
        device = next(self.model.parameters()).device
        budget = memory.gib(cfg.memory_budget_gb) if cfg.memory_budget_gb is not None else memory.device_budget(device)
        seq = max(len(u) for u in self.train_units)
        graphs, why_not = self._graphs_possible()
        if graphs:  # replayed rows are padded to bucket lengths
            seq = bucket_length(seq, self.max_length)
        images = max((u.n_images for u in self.train_units), default=0) or 1
        rows = cfg.batch_size * cfg.grad_accum
        auto_ckpt = cfg.gradient_checkpointing == "auto" and budget is not None
        per_image = self.world.mode != "fsdp"  # as _set_checkpointing sets the vision encoder

        def estimate(batch: int) -> float:
            return memory.estimate(self.model, batch=batch, seq=seq, checkpointing=cfg.gradient_checkpointing,
                                   optim=cfg.optimizer, images=images, vision_per_image=per_image,
                                   mlp_chunk=cfg.mlp_chunk_tokens)["total"]

        # offloaded checkpoints take host memory (page-locked on CUDA; on CPU they stay where they are),
        # shared by the ranks on this host: one a GPU, so at most as many as it has GPUs
        offloading = cfg.gradient_checkpointing in ("auto", "offload")
        host = memory.host_budget() if device.type == "cuda" and offloading else None
        if host is not None and self.world.mode is not None:
            host //= max(1, min(self.world.size, torch.cuda.device_count()))

        def plan_for(batch: int) -> memory.MemoryPlan:
            return memory.plan(self.model, batch=batch, seq=seq, budget_bytes=budget, optim=cfg.optimizer,
                               images=images, vision_per_image=per_image, host_budget_bytes=host)

        plan = None
        if cfg.grad_accum == 1:  # one micro-batch: nothing to merge
            merge = False
        elif cfg.merge_micro_batches != "auto":
            merge = bool(cfg.merge_micro_batches)
        elif device.type != "cuda" or budget is None:
            merge = False  # merging removes launch overhead; a CPU step is bound by its arithmetic
        elif auto_ckpt:
            plan = plan_for(rows)
            merge = plan.fits and plan.checkpointing != "offload"
        else:
            merge = estimate(rows) <= budget * (1 - memory.PLAN_MARGIN)
        batch = rows if merge else cfg.batch_size
        if auto_ckpt and (plan is None or not merge):
            plan = plan_for(batch)
        if graphs and cfg.cuda_graphs == "auto":
            # the graphs' pool keeps its blocks apart from the eager allocator's (each shape's
            # first, eager run), so a run can hold up to two steps' worth
            est = plan.estimate if plan is not None else estimate(batch)
            if est * memory.GRAPH_HEADROOM > budget:  # a budget: graphs are possible only on CUDA
                graphs = False
                why_not = (f"the step's estimated peak ({est / memory.GIB:.2f} GiB) is over "
                           f"1/{memory.GRAPH_HEADROOM:g} of the memory budget ({budget / memory.GIB:.2f} GiB)")
        if self.world.main:
            short = (memory.host_shortfall(self.model, batch=batch, seq=seq, host_budget_bytes=host)
                     if cfg.gradient_checkpointing == "offload" else None)
            if short:
                log.warning('gradient_checkpointing="offload": %s, so the run may run out of host memory; '
                            'True or "auto" keeps the checkpoints on the GPU', short)
            if merge:
                log.info("merging the %d micro-batches of each optimizer step into one forward of %d rows",
                         cfg.grad_accum, rows)
            if plan is not None:
                log.info("memory plan for batch %d x %d tokens: %s", batch, seq, plan.describe())
        return merge, plan, (graphs, why_not)

    def _vision_encoder(self) -> VisionEncoder | None:
        tower = getattr(getattr(self.model, "model", None), "vision_tower", None)
        return tower.vision_model.encoder if tower is not None else None

    def _set_checkpointing(self) -> tuple[Any, list[ActivationOffloader]]:
        """Sets the configured (or planned) checkpointing on the model; returns what to restore after
        training (None when the model has no such switch) and the offloading hooks.

        A checkpointed vision tower always offloads its saved layer inputs (one image each, see
        VisionEncoder): they are large (Gemma 3: 9.4 MB an image and layer, 27 layers), the tower
        does ~20k FLOPs per byte copied while the copies run on a side stream, and a step's images
        would otherwise all keep them on the device through the decoder's backward (merged
        micro-batches: ~1 GB for four images)."""
        inner = getattr(self.model, "model", None)
        lm = getattr(self.model, "language_model", inner)
        if inner is None or getattr(inner, "gradient_checkpointing", None) is None:
            return None, []
        enc = self._vision_encoder()
        old = (inner.gradient_checkpointing, lm.checkpoint_layers, enc.per_image if enc is not None else None,
               getattr(lm, "mlp_chunk_tokens", None))
        mode, layers, chunk = self.cfg.gradient_checkpointing, None, self.cfg.mlp_chunk_tokens
        if mode == "auto":
            plan = self.memory_plan
            mode, layers = (plan.checkpointing, plan.checkpoint_layers) if plan is not None else (True, None)
            if chunk is None and plan is not None:
                chunk = plan.mlp_chunk_tokens
        inner.gradient_checkpointing, lm.checkpoint_layers = mode, layers
        if hasattr(lm, "mlp_chunk_tokens"):
            lm.mlp_chunk_tokens = chunk
        offloaders = [ActivationOffloader(self.model.config.hidden_size).install(lm)] if mode == "offload" else []
        if enc is not None:
            enc.per_image = self.world.mode != "fsdp"  # FSDP2: every rank calls each layer once a forward
            if mode:
                tower = inner.vision_tower
                offloaders.append(ActivationOffloader(tower.vision_model.cfg.hidden_size).install(tower))
        return old, offloaders

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether this run replays its micro-batches as CUDA graphs (TrainConfig.cuda_graphs, resolved)."""
        return self._graphs_choice[0]

    def _graphs_possible(self) -> tuple[bool, str | None]:
        """Whether TrainConfig.cuda_graphs can be on in this run, before the memory plan; else why not."""
        cfg = self.cfg
        why = ("cuda_graphs=False" if cfg.cuda_graphs is False else
               "the model is not on CUDA" if self.device.type != "cuda" else
               "training runs under torch.distributed" if self.world.mode is not None else None)
        return why is None, why

    def _make_graphs(self, offloaders: list[ActivationOffloader]) -> MicroBatchGraphs | None:
        """TrainConfig.cuda_graphs' replayer, or None (off: said once, unless the user turned it off
        or "auto" found no single GPU). The offloaders' copies to the host are captured with the rest."""
        on, why = self._graphs_choice
        if not on:
            if self.cfg.cuda_graphs is True or (self.device.type == "cuda" and self.world.mode is None
                                                and self.cfg.cuda_graphs == "auto"):
                log.info("cuda_graphs=%r is off for this run: %s", self.cfg.cuda_graphs, why)
            return None
        log.info("cuda_graphs: each micro-batch's forward and backward replays as a CUDA graph "
                 "(rows padded to bucket lengths; each new length runs eagerly once, then is captured)")
        return MicroBatchGraphs(self.engine, self.params, self.device, pad_id=self.pad_id,
                                max_length=self.max_length, forward_kw=self._forward_kw,
                                offloaders=offloaders)

    def _restore_checkpointing(self, old: tuple[Any, int | None, bool | None, int | None]) -> None:
        inner = self.model.model
        lm = getattr(self.model, "language_model", inner)
        inner.gradient_checkpointing, lm.checkpoint_layers = old[:2]
        if hasattr(lm, "mlp_chunk_tokens"):
            lm.mlp_chunk_tokens = old[3]
        enc = self._vision_encoder()
        if enc is not None:
            enc.per_image = old[2]

    def _maybe_compile(self) -> None:
        """Compiles each decoder layer once (dynamic shapes, so dynamic padding does not recompile
        per length). Idempotent: a layer already compiled is left as it is."""
        want = self.cfg.compile
        if want is None:
            want = next(self.model.parameters()).is_cuda
        lm = getattr(self.model, "language_model", None)
        if not want or lm is None:
            return
        # Rows of several lengths (dynamic padding): dynamic shapes from the first step, so the
        # second length does not recompile every layer's graph (automatic dynamic would, after
        # compiling a static one first). One length (fixed-size rows): static shapes.
        lengths = {len(u) for u in self.train_units}
        dynamic = True if len(lengths) > 1 else None
        # Forwards of several rows of varying lengths are mostly padded (a mask); the odd batch of
        # equal lengths would have none and compile a second graph mid-run: give it an all-ones
        # mask instead (and a one-row batch a second row, `_batch`). Runs of one-row forwards never
        # need padding and keep no mask (SDPA's causal path).
        rows = self.cfg.batch_size * (self.cfg.grad_accum if self.merge else 1)
        self._mask_always = bool(dynamic) and not self.cfg.packing and rows > 1
        # A vision tower's encoder layers see fixed-size images: automatic dynamic shapes (a new
        # image count per forward recompiles once, to a dynamic image dimension). Eager, its many
        # small ops (LoRA, 4-bit dequantisation) cost more host time than the decoder's.
        encoders = [enc for enc in self.model.modules() if isinstance(enc, VisionEncoder)]
        towers = [(enc.layers, None) for enc in encoders]
        for stack in [lm, *encoders]:  # layer 0 shares the other layers' graph (TextModel's comment)
            stack.input_requires_grad = True
        for layers, dyn in [(lm.layers, dynamic), *towers]:
            for layer in layers:
                if getattr(layer, "_compiled_call_impl", None) is None:
                    layer.compile(dynamic=dyn)
        if hasattr(lm, "compile_mlp_chunks") and lm.layers and lm.layers[0].mlp.chunk_fn is None:
            lm.compile_mlp_chunks()  # used only when MLPs run in chunks (long context)

    # -- the loop ------------------------------------------------------------------------
    def train(self) -> TrainSummary:
        """Runs to max_steps (or epochs), logging, evaluating and checkpointing on the way. Ctrl-C
        (with save_on_interrupt) stops at the end of the running step, saves a checkpoint and
        raises TrainingInterrupted (see train/interrupt.py)."""
        cfg = self.cfg
        self._interrupt = (SigintGuard(escalate=self.world.mode is None, announce=self.world.main)
                           if cfg.save_on_interrupt else None)
        self._stop_agreed = False
        try:
            with self._interrupt or contextlib.nullcontext(), compile_settings():
                return self._train()
        finally:
            self._interrupt = None

    def _train(self) -> TrainSummary:
        cfg, model = self.cfg, self.model
        resumed = self._maybe_resume()
        if resumed is None:
            self._seed()
        self._maybe_compile()
        engine = self.engine
        self._flop_params = flop_parameters(model)  # for MFU
        self.metrics = (Metrics(self.output_dir / "metrics.jsonl", self.step if resumed is not None else 0,
                                reporters=make_reporters(
                                    self.report_to, output_dir=self.output_dir, logging_dir=cfg.logging_dir,
                                    config=cfg.to_dict(), resume_step=self.step if resumed is not None else None,
                                    project=cfg.wandb_project, run_name=cfg.run_name))
                        if self.world.main else _Quiet())
        from tqdm.auto import tqdm

        was_training = model.training
        model.train()
        old_ckpt, offloaders = self._set_checkpointing()
        graphs = self._make_graphs(offloaders)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress_bar and self.world.main),
                   desc="training",
                   dynamic_ncols=True)
        cache: dict[str, Any] = {}
        pending: list[tuple[int, torch.Tensor, float, Any, float]] = []
        self._monitor = LossMonitor(cfg.loss_explosion_factor, cfg.loss_stall_steps, cfg.loss_stall_tolerance)
        for v in self.losses:  # a resumed run's history (warnings only from the steps run now)
            self._monitor.observe(0, v, None, math.nan)
        self._monitor.warned.clear()
        self._t0, self._tokens0 = time.perf_counter(), self.tokens
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        gc_frozen = interrupted = False

        def rows_of(step: int) -> tuple[list[int], list[list[int]]]:
            units, mine = self.schedule.step_all(step, cache), self.schedule.step_units(step, cache)
            if self.merge:  # one forward over this rank's rows of the step (the same gradient)
                mine = [[i for mb in mine for i in mb]]
            return units, mine

        def collated(units: list[int], mine: list[list[int]]) -> list[Batch]:
            return [self._batch(self.train_units, mb or units[:1]) for mb in mine]  # an empty slice still joins the reduction

        # Images are processed when their batch is collated (~20 ms an 896x896 image on a core), so
        # the next step's batches are collated on a thread while this step runs on the device
        ahead = (ThreadPoolExecutor(1, thread_name_prefix="minift-collate")
                 if any(u.n_images for u in self.train_units) else None)
        queued: tuple[int, list[int], list[list[int]], Future] | None = None
        try:
            for step in range(self.step, self.total_steps):
                if queued is not None and queued[0] == step:
                    units, mine, batches = queued[1], queued[2], queued[3].result()
                else:
                    units, mine = rows_of(step)
                    batches = collated(units, mine)
                queued = None
                if ahead is not None and step + 1 < self.total_steps:
                    nxt = rows_of(step + 1)
                    queued = (step + 1, *nxt, ahead.submit(collated, *nxt))
                # every rank divides by the global target count / world: the gradient average is
                # then the one-process gradient of the whole global batch
                norm = float(max(1, sum(self.unit_targets[i] for i in units))) / self.world.size
                lrs = self.lr_scheduler.get_last_lr()
                lr = lrs[self._lr_group]
                loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
                for j, (mb, b) in enumerate(zip(mine, batches)):
                    if graphs is not None and graphs.enabled:  # one process: every slice has rows
                        loss_sum += graphs.run(b.tensors, norm).float()
                        continue
                    with distributed.no_sync(engine, self.world, last=j == len(mine) - 1):
                        loss = engine(**b.to(self.device), loss_normalizer=norm, **self._forward_kw).loss
                        if not mb:
                            loss = loss * 0.0
                        loss.backward()
                    loss_sum += loss.detach().float()
                gnorm = None
                if cfg.max_grad_norm:
                    gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm, foreach=True)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=graphs is None)  # graphs keep theirs in place
                self.step = step + 1
                if not gc_frozen:
                    gc_frozen = _freeze_gc()
                self.tokens += sum(len(self.train_units[i]) for i in units)
                pending.append((self.step, loss_sum, lr, gnorm, max(lrs)))
                last = self.step == self.total_steps
                if self.step % cfg.logging_steps == 0 or last or (cfg.logging_first_step and self.step == 1):
                    self._flush(pending, bar)
                if self.eval_units is not None and cfg.eval_steps and self.step % cfg.eval_steps == 0 and not last:
                    self.evaluate()
                if cfg.save_steps and self.step % cfg.save_steps == 0:
                    self._flush(pending, bar)
                    self.save_checkpoint()
                bar.update(1)
                if self._stop_requested():
                    raise _Interrupted
            self._flush(pending, bar)
        except _Interrupted:
            self._flush(pending, bar)
            interrupted = True
        except BaseException:
            if isinstance(self.metrics, Metrics):
                self.metrics.close()  # TensorBoard / W&B keep what was logged
            raise
        finally:
            bar.close()
            if ahead is not None:
                ahead.shutdown(wait=True, cancel_futures=True)
            if gc_frozen:
                gc.unfreeze()
            if graphs is not None:
                self.graph_stats = graphs.stats()
                log.info("cuda_graphs: %s", self.graph_stats)
                graphs.release()
            for off in offloaders:
                off.remove()
            if old_ckpt is not None:
                self._restore_checkpointing(old_ckpt)
            model.train(was_training)
        try:
            if interrupted:
                raise _Interrupted
            eval_loss = self.evaluate() if self.eval_units is not None else None
            if self._stop_requested():
                raise _Interrupted
        except _Interrupted:
            self._stop_interrupted()
        final = self.save_final()
        if self._stop_requested():
            log.info("Ctrl-C came after the last step: the result is saved in %s", final)
        plot_losses(self.metrics.records, self.output_dir / "loss.png") if cfg.plot else None
        if isinstance(self.metrics, Metrics):
            self.metrics.close()  # TensorBoard / W&B
        elapsed = time.perf_counter() - self._t0
        new_tokens = self.tokens - self._tokens0
        return TrainSummary(
            steps=self.step, losses=list(self.losses), tokens=self.tokens, time_s=elapsed,
            tokens_per_s=new_tokens / max(elapsed, 1e-9), peak_memory_gb=peak_memory_gb(self.device),
            eval_loss=eval_loss, output_dir=str(self.output_dir), final_path=str(final) if final else None,
            checkpoints=list(self.checkpoints), truncated=self.truncated,
            resumed_from=str(resumed) if resumed is not None else None,
        )

    def _stop_requested(self) -> bool:
        """Whether Ctrl-C asked the loop to stop here: this process's request, or under torchrun
        the one the ranks agreed on at the last logging point (so every rank stops at one step)."""
        if self._interrupt is None:
            return False
        return self._interrupt.requested if self.world.mode is None else self._stop_agreed

    def _stop_interrupted(self) -> NoReturn:
        """After a step boundary that Ctrl-C asked to stop at: the checkpoint of this step (unless
        save_steps just wrote it), then TrainingInterrupted."""
        path = self.last_checkpoint
        if path is None or path.name != f"checkpoint-{self.step}":
            try:
                path = self.save_checkpoint() if self.step > 0 else None
            except KeyboardInterrupt:  # a second Ctrl-C: the atomic writer left no checkpoint-N behind
                path = None
        if isinstance(self.metrics, Metrics):
            self.metrics.close()
        err = TrainingInterrupted(self.step, self.total_steps, path, self.last_checkpoint)
        if self.world.main:
            log.warning("%s", err)
        raise err

    def _seed(self) -> None:
        s = self.cfg.seed
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s + self.world.rank)  # also every CUDA device; ranks draw their own dropout

    def _flush(self, pending: list, bar: Any) -> None:
        """Reads the pending step losses back (one sync), checks them, and logs one record at the
        last pending step whose loss is the mean over the pending steps (the logging window)."""
        if not pending:
            return
        losses = torch.stack([p[1] for p in pending])
        if self.world.mode is not None and self._interrupt is not None:
            # the ranks' Ctrl-C requests ride on the loss all-reduce: all of them stop at this step
            flag = torch.full((1,), float(self._interrupt.requested), device=self.device)
            vals = (self.world.all_sum(torch.cat([losses, flag])) / self.world.size).tolist()
            self._stop_agreed = self._stop_agreed or vals.pop() > 0
        else:
            vals = (self.world.all_sum(losses) / self.world.size).tolist()
        gn = [p[3].full_tensor() if hasattr(p[3], "full_tensor") else p[3] for p in pending]
        gvals = torch.stack(gn).float().tolist() if all(g is not None for g in gn) else [None] * len(gn)
        for (step, _, lr, _, _), v in zip(pending, vals):
            self.losses.append(v)
            if not math.isfinite(v):
                pending.clear()
                self.metrics.write({"step": step, "loss": v, "lr": lr, "tokens": self.tokens, "nonfinite": True})
                where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                         else "no checkpoint was saved before it")
                msg = (f"loss is {v} at step {step}: training stopped ({where}). Lower lr, check the data for "
                       "empty or corrupt examples, or use max_grad_norm")
                log.error(msg)
                raise NonFiniteLossError(msg)
        if self.world.main:
            for (step, _, _, _, lr_max), v, g in zip(pending, vals, gvals):
                for msg in self._monitor.observe(step, v, g, lr_max):
                    warnings.warn(msg, LossWarning, stacklevel=3)  # at the caller's train()
        step, _, lr, _, _ = pending[-1]
        elapsed = time.perf_counter() - self._t0
        tps = (self.tokens - self._tokens0) / max(elapsed, 1e-9)
        mem = peak_memory_gb(self.device)
        window = sum(vals) / len(vals)  # the mean over the logging window, as transformers logs it
        rec = {"step": step, "loss": window, "lr": lr, "tokens": self.tokens, "epoch": self.schedule.epoch_of(step),
               "grad_norm": gvals[-1], "tokens_per_s": tps, "elapsed_s": elapsed, "peak_memory_gb": mem}
        u = mfu(self._flop_params, tps, self.cfg.peak_tflops)
        if u is not None:
            rec["mfu"] = u
        self.metrics.write(rec)
        bar.set_postfix(loss=f"{window:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}",
                        mem=f"{mem:.2f}GB" + ("" if self.device.type == "cuda" else " rss"), refresh=False)
        pending.clear()

    def evaluate(self) -> float:
        """Mean loss over every target token of eval_dataset (also logged to metrics.jsonl)."""
        if self.eval_units is None:
            raise TrainConfigError("evaluate() needs an eval_dataset")
        with torch.no_grad(), compile_settings():
            return self._evaluate()

    def _evaluate(self) -> float:
        model = self.model
        was_training = model.training
        model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        n = 0
        bs = self.cfg.batch_size
        # DDP: each rank scores its share, summed after; FSDP: every rank runs every forward (its
        # collectives need them all), so the sums are taken on one rank's full pass
        ddp = self.world.mode == "ddp"
        idx = list(range(len(self.eval_units)))[self.world.rank::self.world.size] if ddp else list(range(len(self.eval_units)))
        try:
            for i in range(0, len(idx), bs):
                if self._interrupt is not None and self._interrupt.requested and self.world.mode is None:
                    raise _Interrupted  # Ctrl-C: an eval changes no state, so it can stop anywhere
                b = self._batch(self.eval_units, idx[i: i + bs])
                out = model(**b.to(self.device), return_logits=False, loss_normalizer=1.0, **self._forward_kw)
                total += out.loss.float()
                n += b.n_targets
        finally:
            model.train(was_training)
        if ddp:
            sums = self.world.all_sum(torch.stack([total, torch.tensor(float(n), device=self.device)]))
            total, n = sums[0], int(sums[1].item())
        loss = total.item() / max(n, 1)
        log.info("step %d: eval loss %.4f over %d tokens", self.step, loss, n)
        if self.metrics is not None:
            self.metrics.write({"step": self.step, "eval": True, "eval_loss": loss, "eval_tokens": n})
        return loss

    # -- checkpoints ---------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "losses": self.losses, "tokens": self.tokens, "total_steps": self.total_steps,
            "data": {"epoch": self.step // self.schedule.steps_per_epoch,
                     "step_in_epoch": self.step % self.schedule.steps_per_epoch,
                     "units": self.schedule.n_units, "per_step": self.schedule.per_step},
            "config": self.cfg.to_dict(), "max_length": self.max_length, "world_size": self.world.size,
        }

    def save_checkpoint(self) -> Path:
        """output_dir/checkpoint-{step}: weights, optimizer, scheduler, RNG and data position,
        written by rank 0 (under DDP every rank holds the same weights and optimizer state).
        FSDP2 (`distributed.shards_checkpoints`): an adapter run's trainable parameters and
        optimizer state are gathered whole onto rank 0 first, so the files are those one process
        writes; a full fine-tune's are written as shards, each rank its own, into the temporary
        directory rank 0 then completes and renames into place (a collective either way)."""
        path = self.output_dir / f"checkpoint-{self.step}"
        sharded = distributed.shards_checkpoints(self.model, self.world)
        gathered = (distributed.gather_train_state(self.model, self.optimizer, self.world)
                    if self.world.mode == "fsdp" and not sharded else None)
        rngs = distributed.gather_rng(self.world)
        if self.world.main:
            path = ckpt.save_checkpoint(self.output_dir, self.step, self.model, self.optimizer, self.lr_scheduler,
                                        self._state(), total_limit=self.cfg.save_total_limit, gathered=gathered,
                                        write_shards=self._write_shards if sharded else None, rank_rng=rngs)
        elif sharded:
            self._write_shards(None)  # with rank 0, inside its checkpoint writer
        self.world.barrier()
        self.last_checkpoint = path
        self.checkpoints = [str(p) for _, p in ckpt.list_checkpoints(self.output_dir)]
        log.info("saved %s", path)
        return path

    def _write_shards(self, tmp: Path | None) -> str:
        """Every rank's shards into sharded/ of rank 0's temporary checkpoint directory `tmp`
        (shared with the others, which pass None); the optimizer's param groups as JSON."""
        shared = self.world.share_path(tmp)
        return distributed.save_shards(self.model, self.optimizer, shared / distributed.SHARDED_DIR)

    def _maybe_resume(self) -> Path | None:
        if self.world.main:
            ckpt.clean_partial(self.output_dir)
        self.world.barrier()
        if not self.cfg.resume_from:
            return None
        path = ckpt.resolve_resume(self.cfg.resume_from, self.output_dir)
        if path is None:
            log.info("resume_from='latest': no checkpoint in %s yet, starting from scratch", self.output_dir)
            return None
        state = json.loads((path / ckpt.STATE_FILE).read_text())
        c = state.get("config", {})
        # the same global batch per step on another world size continues the same data order
        keys = ("batch_size", "grad_accum") if state.get("world_size", 1) == self.world.size else ()
        mismatched = [k for k in (*keys, "seed", "packing", "shuffle") if k in c and c[k] != getattr(self.cfg, k)]
        if state["data"].get("per_step", self.schedule.per_step) != self.schedule.per_step:
            mismatched.append("global batch (batch_size x grad_accum x world size)")
        if state.get("max_length") != self.max_length:
            mismatched.append("max_seq_length")
        if state["data"]["units"] != self.schedule.n_units:
            mismatched.append("dataset size")
        if mismatched:
            raise TrainConfigError(
                f"cannot resume from {path}: {', '.join(mismatched)} differ from the checkpoint's run, so the data "
                "order would not continue where it stopped"
            )
        state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.lr_scheduler,
                                     load_sharded=distributed.load_train_state if self.world.mode == "fsdp" else None,
                                     rank=self.world.rank)
        self.step = int(state["step"])
        self.losses = [float(v) for v in state["losses"]][: self.step]
        self.tokens = int(state["tokens"])
        self.last_checkpoint = path
        self.checkpoints = [str(p) for _, p in ckpt.list_checkpoints(self.output_dir)]
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def save_final(self) -> Path | None:
        """The trained result in output_dir/final: the adapter (LoRA, PEFT format) or, for full
        fine-tuning, the trainable weights as safetensors with config and tokenizer. Rank 0
        writes it (under FSDP2 an adapter from its unsharded modules, a full fine-tune from its
        state dict gathered onto rank 0's CPU one tensor at a time)."""
        out = self.output_dir / "final"
        if self.world.mode == "fsdp" and not ckpt.has_lora(self.model):
            whole = distributed.gather_full_state(self.model, self.world)
            if self.world.main:
                self._write_final(out, whole)
        else:
            with distributed.unsharded(self.model, self.world):
                if self.world.main:
                    self._write_final(out)
        self.world.barrier()
        return out

    def _write_final(self, out: Path, gathered: dict[str, torch.Tensor] | None = None) -> None:
        if ckpt.has_lora(self.model):
            self.model.save_adapter(out, overwrite=True, tokenizer=self.tokenizer)
        else:  # full fine-tuning (a partly frozen model: its trained parameters only), atomically
            full = all(p.requires_grad for p in self.model.parameters() if p.is_floating_point())
            ckpt.save_full(self.model, self.tokenizer, out, trainable_only=not full, gathered=gathered)
        log.info("saved the result to %s", out)
