"""The Gemma 3 vision notebook's job through minift's Trainer (the job of
shared/bench/vision_notebook_job.py, whose peers run in their own trainers): a random-weight
Gemma-3-4B vision checkpoint, 4-bit (or bf16) base, LoRA r=16 on vision and language layers, rows
of one image and a short LaTeX answer, batch 1 x grad accumulation 4, max_grad_norm 0.3, cosine,
fused AdamW; `--impls unsloth` runs the same job through unsloth's FastVisionModel, TRL's
SFTTrainer and UnslothVisionDataCollator, as the peers' harness does (which loads 4-bit only; here
`--quant none` gives both a bf16 base). Prints one JSON line a run: samples/s over the steps after the first two, peak GiB,
the first two steps' time (compilation), `first_step_s` (load + add_lora + the Trainer's setup + the
first optimizer step: issue 14 target 3; cold or warm as the compile caches are), and with --profile one profiled optimizer step: GPU busy
time against wall time, kernel launches, the top kernels and host ops; with --phases the peak
GiB of each phase of a step (where the memory goes).

  python bench/notebook.py --quant 4bit,none --steps 12 --profile
  python bench/notebook.py --quant none --impls unsloth,minift --steps 30   # target 0, 16-bit base
  python bench/notebook.py --phases --set merge_micro_batches=False
  python bench/notebook.py --phases --answer 2500 --set batch_size=4 --set grad_accum=1   # W + images
  python bench/notebook.py --set merge_micro_batches=False      # a TrainConfig field, as a variant
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def dataset(n: int, size: int, seed: int = 0, answer: int | None = None) -> list[dict]:
    """LaTeX_OCR-shaped rows: one random image (size/4 x size/2) and 8-30 LaTeX symbols each (or
    `answer` symbols: long rows, cut to max_seq_length)."""
    import numpy as np
    from PIL import Image

    rng, r = random.Random(seed), np.random.default_rng(seed)
    syms = ["x", "y", "\\alpha", "\\beta", "+", "-", "=", "\\frac{1}{2}", "^{2}", "_{i}", "\\sum", "\\int", "dx"]
    rows = []
    for _ in range(n):
        img = Image.fromarray(r.integers(0, 255, (size // 4, size // 2, 3), dtype=np.uint8))
        text = " ".join(rng.choice(syms) for _ in range(answer or rng.randint(8, 30)))
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "Write the LaTeX representation for this image."},
                                         {"type": "image", "image": img}]},
            {"role": "assistant", "content": [{"type": "text", "text": text}]}]})
    return rows


def _profiled(trainer, at: int) -> dict:
    """Profiles optimizer step `at` (1-based) of trainer.train() through a step post-hook."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    state: dict = {"n": 0}
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def hook(*_):
        state["n"] += 1
        if state["n"] == at - 1:
            torch.cuda.synchronize()
            prof.__enter__()
            state["t0"] = time.perf_counter()
        elif state["n"] == at:
            torch.cuda.synchronize()
            state["wall"] = time.perf_counter() - state["t0"]
            prof.__exit__(None, None, None)

    handle = trainer.optimizer.register_step_post_hook(hook)
    summary = trainer.train()
    handle.remove()
    ev = prof.key_averages()
    kern = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
    host = [e for e in ev if e.device_type == torch.autograd.DeviceType.CPU]
    gpu = sum(e.self_device_time_total for e in kern) / 1e3
    return summary, dict(
        wall_ms=round(state["wall"] * 1e3, 1), gpu_busy_ms=round(gpu, 1), kernels=sum(e.count for e in kern),
        top=[(e.key[:80], e.count, round(e.self_device_time_total / 1e3, 2))
             for e in sorted(kern, key=lambda e: -e.self_device_time_total)[:12]],
        cpu_top=[(e.key[:80], e.count, round(e.self_cpu_time_total / 1e3, 2))
                 for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:12]])


def _phases(trainer) -> dict:
    """Peak allocated GiB of each phase of the steps (max over steps), read through module,
    tensor and optimizer hooks: "vision_forward" (embeddings and the tower), "decoder_forward"
    (the decoder and the loss), "decoder_backward" (down to the image features' gradient),
    "vision_backward" (the tower's backward, to the optimizer step) and "optimizer"; "at" holds
    the GiB allocated when each phase ended. The phases' peaks reset the CUDA peak counter: the
    run's peak is their max."""
    import torch

    gib, peaks, at = 2**30, {}, {}

    def mark(name: str) -> None:
        peaks[name] = round(max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / gib), 3)
        at[name] = round(torch.cuda.memory_allocated() / gib, 3)
        torch.cuda.reset_peak_memory_stats()

    model = trainer.model

    def after_projector(mod, args, out):
        mark("vision_forward")
        if out.requires_grad:
            out.register_hook(lambda g: mark("decoder_backward"))

    model.register_forward_pre_hook(lambda *a: mark("vision_backward"))  # unmerged: the last micro-batch's
    model.register_forward_hook(lambda *a: mark("decoder_forward"))
    model.model.multi_modal_projector.register_forward_hook(after_projector)
    trainer.optimizer.register_step_pre_hook(lambda *a: mark("vision_backward"))
    trainer.optimizer.register_step_post_hook(lambda *a: mark("optimizer"))
    return {"peak_gib": peaks, "allocated_gib_after": at}


def run_one(path: str, quant: str, steps: int, sets: dict, prof: bool, phases: bool = False,
            answer: int | None = None) -> dict:
    import torch

    import minift
    from minift.train import TrainConfig, Trainer

    t0 = time.time()
    model, processor = minift.load(path, load_in_4bit=quant == "4bit")
    parts = {"load": time.time() - t0}  # where setup_s goes (target 3's first step includes it)
    processor = minift.get_chat_template(processor, "gemma-3")  # the notebook's step
    minift.add_lora(model, r=16, alpha=16, dropout=0.0, vision=True, language=True, attention=True, mlp=True,
                    seed=3407)
    parts["template_and_lora"] = time.time() - t0 - sum(parts.values())
    job = dict(batch_size=1, grad_accum=4, max_steps=steps, lr=2e-4, max_grad_norm=0.3, warmup_ratio=0.03,
               scheduler="cosine", weight_decay=0.01, optimizer="adamw", seed=3407, max_seq_length=2048,
               output_dir=tempfile.mkdtemp(), logging_steps=1, progress_bar=False, plot=False)
    cfg = TrainConfig(**{**job, **sets})
    rows = dataset(4 * steps + 8, 896, answer=answer)
    parts["dataset"] = time.time() - t0 - sum(parts.values())
    tr = Trainer(model, processor, rows, config=cfg)
    parts["trainer"] = time.time() - t0 - sum(parts.values())
    setup = time.time() - t0
    extra_parts = {k: round(v, 2) for k, v in parts.items()}
    extra = {"setup_parts_s": extra_parts}
    phases = phases and torch.cuda.is_available() and not tr.uses_cuda_graphs  # replays run no hooks
    if phases:
        extra["phases"] = _phases(tr)
    if prof:
        s, extra["profile"] = _profiled(tr, steps - 1)
    else:
        s = tr.train()
    recs = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl")) if line.strip()]
    el = [(r["step"], r["elapsed_s"]) for r in recs if "elapsed_s" in r and not r.get("eval")]
    (s0, e0), (s1, e1) = el[1], el[-1]
    if prof:  # the profiled step is slower: time the steps before it
        (s1, e1) = el[-3]
    from common import compile_counts, compile_seconds

    extra["compile_s"] = compile_seconds()  # the first steps' compile phases
    extra["compile_counts"] = compile_counts()  # kernels generated, FX graph cache hits, dynamo restarts
    return dict(impl="minift", quant=quant, sets=sets, samples_per_s=4 * (s1 - s0) / (e1 - e0),
                peak_gib=(max(extra["phases"]["peak_gib"].values()) if phases else
                          torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else None, setup_s=round(setup, 1),
                first_steps_s=round(e0, 1), first_step_s=round(setup + el[0][1], 1), steps=s.steps, last_loss=s.losses[-1], graphs=tr.graph_stats,
                reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3) if torch.cuda.is_available() else None,
                **extra)


def _cprofiled(fn, *args, n: int = 40):
    """Run fn under cProfile, minift and its imports loaded first (so module imports and op
    registration stay out of it); return its result and the n functions with the most cumulative
    and the most own time, and minift's own functions by cumulative time, as
    "file:line(function)": [calls, seconds]."""
    import cProfile
    import pstats

    import minift.train  # noqa: F401  (torch, transformers and the ops come with it)

    prof = cProfile.Profile()
    res = prof.runcall(fn, *args)
    stats = pstats.Stats(prof).stats  # {(file, line, func): (prim calls, calls, own s, cumulative s, callers)}

    def name(k):
        f, line, func = k
        return f"{'/'.join(f.split('/')[-3:])}:{line}({func})"

    def top(col, keep=lambda k: True):
        rows = sorted((kv for kv in stats.items() if keep(kv[0])), key=lambda kv: kv[1][col], reverse=True)[:n]
        return {name(k): [v[1], round(v[col], 2)] for k, v in rows}

    return res, {"cumulative": top(3), "own": top(2), "minift": top(3, lambda k: "/minift/" in k[0])}


def run_unsloth(path: str, quant: str, steps: int) -> dict:
    """The same job through unsloth + TRL, set up as unsloth's Gemma 3 vision notebook does (the peers'
    harness's settings, its base precision a flag here). Step ends are timed by a callback after a
    device sync; samples/s over the steps after the first two, as for minift."""
    import torch
    from unsloth import FastVisionModel  # before trl and transformers, which unsloth patches on import
    from unsloth.trainer import UnslothVisionDataCollator

    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    t0 = time.time()
    model, processor = FastVisionModel.from_pretrained(path, load_in_4bit=quant == "4bit")
    model = FastVisionModel.get_peft_model(
        model, finetune_vision_layers=True, finetune_language_layers=True, finetune_attention_modules=True,
        finetune_mlp_modules=True, r=16, lora_alpha=16, lora_dropout=0, bias="none", random_state=3407,
        use_rslora=False, loftq_config=None, target_modules="all-linear")
    FastVisionModel.for_training(model)
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            ends.append(time.time())

    args = SFTConfig(
        per_device_train_batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, max_grad_norm=0.3, warmup_ratio=0.03,
        max_steps=steps, learning_rate=2e-4, lr_scheduler_type="cosine", weight_decay=0.01,
        optim="adamw_torch_fused", seed=3407, logging_steps=1, save_strategy="no", report_to="none",
        output_dir=tempfile.mkdtemp(), remove_unused_columns=False, dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True}, max_length=2048)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset(4 * steps + 8, 896),
                         processing_class=processor.tokenizer, callbacks=[StepClock()],
                         data_collator=UnslothVisionDataCollator(model, processor))
    setup = time.time() - t0
    t1 = time.time()
    out = trainer.train()
    return dict(impl="unsloth", quant=quant, samples_per_s=4 * (len(ends) - 2) / (ends[-1] - ends[1]),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30, setup_s=round(setup, 1),
                first_steps_s=round(ends[1] - t1, 1), steps=len(ends), mean_loss=out.training_loss,
                reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gemma-3-4b-vision", help="a bench/common.py vision shape (tiny-gemma3-vision: a CPU dry run)")
    ap.add_argument("--quant", default="4bit")
    ap.add_argument("--impls", default="minift", help="minift and/or unsloth (each run in its own process)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--set", action="append", default=[], help="FIELD=VALUE: a TrainConfig field (a variant)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--phases", action="store_true", help="the peak of each phase of a step (CUDA)")
    ap.add_argument("--cprofile", action="store_true",
                    help="minift's run under cProfile: the top functions by cumulative and own time in the "
                         "output (where a warm compile cache's load time goes, issue 14 target 3)")
    ap.add_argument("--answer", type=int, default=None,
                    help="symbols an answer (default 8-30); with --set batch_size=4 --set grad_accum=1, 2500 "
                         "gives workload W's 4 x 2048 tokens with an image a row (cut at max_seq_length)")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "minift_bench_models"))
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--child", nargs=3, metavar=("PATH", "QUANT", "IMPL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.steps < 3:
        ap.error("--steps must be at least 3: samples/s is timed over the steps after the first two")
    sets = {}
    for item in a.set:
        k, v = item.split("=", 1)
        sets[k] = json.loads(v.lower()) if v.lower() in ("true", "false", "null") or v[:1].isdigit() else v
    impls = a.impls.split(",")
    if not set(impls) <= {"minift", "unsloth"}:
        ap.error(f"--impls: minift and/or unsloth, got {a.impls!r}")
    if "unsloth" in impls and (sets or a.profile or a.phases or a.answer or a.cprofile):
        ap.error("--set, --profile, --phases, --cprofile and --answer apply to minift's runs only: run unsloth apart")
    if a.child:
        path, quant, impl = a.child
        if impl == "unsloth":
            res = run_unsloth(path, quant, a.steps)
        elif a.cprofile:
            res, top = _cprofiled(run_one, path, quant, a.steps, sets, a.profile, a.phases, a.answer)
            res["cprofile"] = top
        else:
            res = run_one(path, quant, a.steps, sets, a.profile, a.phases, a.answer)
        print("RESULT " + json.dumps(res), flush=True)
        return
    from common import environment, write_random_checkpoint

    path = Path(a.root) / a.shape
    if not (path / "config.json").exists():
        write_random_checkpoint(a.shape, path)
    for quant, impl in [(q, i) for q in a.quant.split(",") for i in impls]:
        cmd = [sys.executable, __file__, "--child", str(path), quant, impl, "--steps", str(a.steps)]
        cmd += [x for s in a.set for x in ("--set", s)] + (["--profile"] if a.profile else []) + (["--phases"] if a.phases else []) + (["--cprofile"] if a.cprofile else []) + (["--answer", str(a.answer)] if a.answer else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            out = p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            out = f"TIMEOUT {(e.stdout or b'')[-800:]!r} {(e.stderr or b'')[-800:]!r}"
        res = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
        print(json.dumps(res[0] | {"env": environment()} if res else dict(impl=impl, quant=quant, sets=sets, error=out[-2000:])),
              flush=True)


if __name__ == "__main__":
    main()
