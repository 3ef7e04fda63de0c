"""LoRA training-step throughput and peak memory of minift on the peers' workload W
(shared/bench/README.md): LoRA r=16, alpha=16 on q,k,v,o,gate,up,down; batch 4 x 2048 random
tokens; gradient checkpointing; fused AdamW; bf16 or NF4 base; tokens/s over the timed steps after
warm-up; peak = torch.cuda.max_memory_allocated(). Run the peers (shared/bench/peer_bench.py) in the
same session and compare as ratios. Each (shape, quant, variant) runs in its own process.

  python bench/train.py --shapes llama-3.2-1b,gemma-3-4b --quant none,4bit
  python bench/train.py --shapes llama-3.1-8b --quant 4bit --variants auto@8,auto@16,auto@24+compile
  python bench/train.py --shapes llama-3.1-8b --quant 4bit --max-context 80 --variants offload+compile,offload+compile+mlpchunk
  python bench/train.py --shapes gemma-3-4b-vision --quant 4bit --first-step

`auto@G`: TrainConfig(gradient_checkpointing="auto")'s plan for a G GiB budget (minift.train.memory),
reported beside the measured peak. `--max-context G`: batch 1, the longest sequence whose step fits
G GiB (the process capped with torch.cuda.set_per_process_memory_fraction), by bisection over
fresh processes. `--first-step`: a fresh process's load + add_lora + first optimizer step
(compilation included), then one more step (the warm figure). Variants `unsloth`, `unsloth+ckpt` and
`unsloth+nockpt` run the same batches through unsloth with its offloaded, plain or no checkpointing
(the budgets stage's peer column: the fastest of them that fits a budget, by their peaks).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _profile_step(step, dev: str) -> dict:
    """GPU time of one more step by kernel (top 15) and in all, beside its wall time: a GPU-busy
    fraction well under 1 means the step waits on Python, not on kernels; then `cpu_top` (host
    time by op, self time, top 15) says where the host spends it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.time()
        step(0)
        torch.cuda.synchronize()
        wall = time.time() - t0
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) / 1e3
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]
    host = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    cpu_top = sorted(host, key=lambda e: -e.self_cpu_time_total)[:15]
    return dict(wall_ms=round(wall * 1e3, 1), gpu_ms=round(total, 1),
                top=[(e.key[:90], e.count, round(e.self_device_time_total / 1e3, 2)) for e in top],
                cpu_top=[(e.key[:90], e.count, round(e.self_cpu_time_total / 1e3, 2)) for e in cpu_top])


def _graphed_step(model, opt, params, batches, offloaders):
    """The Trainer's TrainConfig(cuda_graphs=True) path: each micro-batch's forward and backward
    replays as a CUDA graph (train/graphs.py; the first run of a shape eager, the second captured),
    the optimizer and zeroing eager between replays. W's rows are bucket lengths already."""
    from minift.train.graphs import MicroBatchGraphs

    ids0 = batches[0]["input_ids"]
    graphs = MicroBatchGraphs(model, params, ids0.device, pad_id=0, offloaders=offloaders)
    norm = float(ids0.shape[0] * (ids0.shape[1] - 1))
    host = [{k: v.cpu() for k, v in b.items()} for b in batches]  # the Trainer collates on the host

    def step(i: int):
        loss = graphs.run(host[i % len(host)], norm)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    step.graphs = graphs
    return step


def _batch(model, bs: int, seq: int, g, dev: str) -> dict:
    """A batch of W: random tokens as labels too; on a vision model each row starts with one image
    (bos, <start_of_image>, its soft tokens, <end_of_image>), its tokens out of the loss, as the
    peers' harness builds them."""
    import torch

    cfg = model.config  # minift's or transformers' (unsloth's runs)
    vision = getattr(cfg, "vision_config", None) or getattr(cfg, "vision", None)
    vocab = cfg.get_text_config().vocab_size if hasattr(cfg, "get_text_config") else cfg.vocab_size
    ids = torch.randint(4, vocab, (bs, seq), generator=g)
    if vision is None:
        ids = ids.to(dev)
        return {"input_ids": ids, "labels": ids}
    ids = torch.randint(200, cfg.boi_token_index - 1, (bs, seq), generator=g)
    head = [2, cfg.boi_token_index] + [cfg.image_token_index] * cfg.mm_tokens_per_image + [cfg.eoi_token_index]
    ids[:, :len(head)] = torch.tensor(head)
    labels = ids.masked_fill(ids == cfg.image_token_index, -100)
    size = vision.image_size
    pix = torch.randn(bs, 3, size, size, generator=g).to(torch.bfloat16)
    return {"input_ids": ids.to(dev), "labels": labels.to(dev), "pixel_values": pix.to(dev),
            "token_type_ids": (ids == cfg.image_token_index).long().to(dev)}


UNSLOTH_GC = {"unsloth": "unsloth", "unsloth+ckpt": True, "unsloth+nockpt": False}


def run_unsloth(path: str, quant: str, bs: int, seq: int, warmup: int, steps: int, r: int, variant: str) -> dict:
    """Workload W through unsloth's FastLanguageModel with one of its checkpointing settings
    (`unsloth`: its offloaded checkpoints, the peers' harness's; `unsloth+ckpt`: plain checkpointing;
    `unsloth+nockpt`: none), timed as minift's runs are: the peer column of target 2 (issue 14), where
    each budget gets unsloth's fastest setting that fits it."""
    import torch
    from unsloth import FastLanguageModel  # before transformers, which unsloth patches on import

    if variant not in UNSLOTH_GC:
        raise SystemExit(f"unknown unsloth variant {variant!r}: one of {', '.join(UNSLOTH_GC)}")
    torch.manual_seed(0)
    t_load = time.time()
    gc_mode = UNSLOTH_GC[variant]
    if json.loads((Path(path) / "config.json").read_text())["model_type"] == "gemma3":  # as the peers' harness
        from unsloth import FastVisionModel

        model, _ = FastVisionModel.from_pretrained(path, max_seq_length=seq, dtype=torch.bfloat16,
                                                   load_in_4bit=quant == "4bit")
        model = FastVisionModel.get_peft_model(model, finetune_vision_layers=True, finetune_language_layers=True,
                                               finetune_attention_modules=True, finetune_mlp_modules=True, r=r,
                                               lora_alpha=r, lora_dropout=0, bias="none", random_state=0,
                                               use_gradient_checkpointing=gc_mode, target_modules="all-linear")
        FastVisionModel.for_training(model, use_gradient_checkpointing=gc_mode)
    else:
        model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=seq, dtype=torch.bfloat16,
                                                     load_in_4bit=quant == "4bit")
        model = FastLanguageModel.get_peft_model(model, r=r, lora_alpha=r, lora_dropout=0, bias="none",
                                                 target_modules=TARGETS, use_gradient_checkpointing=gc_mode,
                                                 random_state=0)
    t_load = time.time() - t_load
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator(device="cpu").manual_seed(1)
    batches = [_batch(model, bs, seq, g, "cuda") for _ in range(4)]

    def step(i: int):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t_warm = time.time()
    losses = [float(step(i)) for i in range(warmup)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t_warm = time.time() - t_warm
    t0 = time.time()
    for i in range(steps):
        loss = step(i)
    torch.cuda.synchronize()
    dt = time.time() - t0
    return dict(impl="unsloth", variant=variant, quant=quant, bs=bs, seq=seq, steps=steps,
                tokens_per_s=bs * seq * steps / dt, step_s=dt / steps,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3), load_s=t_load, warmup_s=t_warm,
                first_loss=losses[0] if losses else None, last_loss=float(loss))


def run_one(path: str, quant: str, bs: int, seq: int, warmup: int, steps: int, r: int, variant: str,
            prof: bool = False) -> dict:
    import torch

    import minift

    minift.ops.set_compiled_elementwise("kernel" if "kernelew" in variant else "reference")
    from minift.train.trainer import compile_settings

    compile_settings().__enter__()  # traced as the Trainer traces its layers (for this process's life)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if "torchops" in variant:  # plain-PyTorch references everywhere (inductor fuses them when compiled)
        minift.ops.set_backend("torch")
    torch.manual_seed(0)
    t_load = time.time()
    model, _ = minift.load(path, dtype=torch.bfloat16, device=dev, load_in_4bit=quant == "4bit", use_name_map=False)
    vision = model.config.model_type == "gemma3"
    minift.add_lora(model, r=r, alpha=r, targets="all-linear" if vision else TARGETS, seed=0,
                    fuse="fusedlora" in variant)  # fused LoRA custom ops or plain matmuls
    lm = model.language_model if hasattr(model, "language_model") else model.model
    base_variant = variant.split("+")[0]
    plan = None
    if base_variant.startswith("auto@"):  # the Trainer's memory planner for this batch and budget
        from minift.train import memory

        plan = memory.plan(model, batch=bs, seq=seq, budget_bytes=memory.gib(float(base_variant[5:])),
                           host_budget_bytes=memory.host_budget())
        ckpt_mode = plan.checkpointing
        lm.checkpoint_layers = plan.checkpoint_layers
        lm.mlp_chunk_tokens = plan.mlp_chunk_tokens
    else:
        ckpt_mode = {"ckpt": True, "offload": "offload", "nockpt": False}.get(base_variant, True)
    chunk = re.search(r"mlpchunk(\d*)", variant)
    if chunk:  # each MLP over 8192 (or mlpchunkN: N) tokens at a time (TrainConfig.mlp_chunk_tokens)
        lm.mlp_chunk_tokens = int(chunk.group(1) or 8192)
    if hasattr(model, "vision_tower"):
        model.model.gradient_checkpointing = ckpt_mode  # the decoder and the vision encoder
    else:
        lm.gradient_checkpointing = ckpt_mode
    if ckpt_mode == "offload":  # as the Trainer does: the hooks that move checkpointed inputs to the host
        from minift.train import memory
        from minift.train.offload import ActivationOffloader

        short = memory.host_shortfall(model, batch=bs, seq=seq, host_budget_bytes=memory.host_budget())
        if dev == "cuda" and short:  # fail here (a try that does not fit) rather than be killed for host memory
            raise MemoryError(f"host memory: {short}")
        offloaders = [ActivationOffloader(model.config.hidden_size).install(lm)]
    else:
        offloaders = []
    if "compile" in variant:
        for layer in lm.layers:
            layer.compile()  # as the Trainer: static first, dynamic once a second length comes
        lm.compile_mlp_chunks()  # as the Trainer: chunked MLPs (+mlpchunk) compiled on their own
    t_load = time.time() - t_load
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev == "cuda")
    g = torch.Generator(device="cpu").manual_seed(1)
    if "varylen" in variant:  # dynamic padding: every batch its own length, from seq / 4 to seq
        lens = torch.randint(seq // 4, seq + 1, (max(4, warmup + steps),), generator=g).tolist()
    else:
        lens = [seq] * 4
    batches = [_batch(model, bs, n, g, dev) for n in lens]
    from torch._dynamo.utils import counters

    compiles_before = counters["stats"]["unique_graphs"]
    losses = []

    def step(i: int):
        out = model(**batches[i % len(batches)])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    t_warm = time.time()
    for i in range(warmup):
        losses.append(float(step(i)))
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if "+graph" in variant and dev == "cuda":
        # replays allocate nothing, so the peak is the capture's (and the eager first runs')
        step = _graphed_step(model, opt, params, batches, offloaders)
        for i in range(2):  # each batch's shape: an eager run, then the capture
            losses.append(float(step(i)))
    t_warm = time.time() - t_warm
    if "gcfreeze" in variant:  # long-lived objects (modules, compiled code) out of the cyclic GC
        gc.collect()
        gc.freeze()
    pauses: list[tuple[int, float]] = []  # Python's cyclic GC during the timed steps: (generation, ms)
    started: dict[str, float] = {}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            pauses.append((info["generation"], round((time.perf_counter() - started.pop("t")) * 1e3, 1)))

    gc.callbacks.append(on_gc)
    # CUDA events between steps time each step on the GPU's clock without a host sync: one slow
    # step (a recompile, an allocator stall) shows apart from a uniformly slower loop
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if dev == "cuda" else []
    first = warmup if "varylen" in variant else 0  # varylen: timed batches of lengths not seen in warm-up
    graphs_warm = counters["stats"]["unique_graphs"]
    t0 = time.time()
    host_ms = []  # host time per step: near step_ms means the GPU waited on Python
    for i in range(steps):
        if events:
            events[i].record()
        h = time.perf_counter()
        loss = step(first + i)
        host_ms.append(round((time.perf_counter() - h) * 1e3, 1))
    if dev == "cuda":
        events[-1].record()
        torch.cuda.synchronize()
    dt = time.time() - t0
    step_ms = [round(a.elapsed_time(b), 1) for a, b in zip(events, events[1:])]
    gc.callbacks.remove(on_gc)
    gc_ms = {f"gen{g}": round(sum(ms for gg, ms in pauses if gg == g), 1) for g in sorted({g for g, _ in pauses})}
    losses.append(float(loss))
    extra = dict(profile=_profile_step(step, dev)) if prof and dev == "cuda" else {}
    # graphs compiled over the run (each decoder layer shares one): > 1 after warm-up = recompiles
    extra["unique_graphs"] = counters["stats"]["unique_graphs"] - compiles_before
    extra["graphs_in_timed_steps"] = counters["stats"]["unique_graphs"] - graphs_warm  # recompiles: 0 wanted
    if hasattr(step, "graphs"):
        extra["graphs"] = step.graphs.stats()
    from common import compile_counts, compile_seconds

    extra["compile_s"] = compile_seconds()  # where compile time went (issue 14 target 3, the first step)
    extra["compile_counts"] = compile_counts()  # kernels generated, FX graph cache hits, dynamo restarts
    if plan is not None:
        extra.update(plan=plan.describe(), plan_estimate_gib=round(plan.estimate / 2**30, 3),
                     plan_budget_gib=round(plan.budget / 2**30, 3))
    from minift.train import memory

    # minift.train.memory's estimate of this very setting, beside the measured peak
    extra["estimate_gib"] = round(memory.estimate(
        model, batch=bs, seq=seq, checkpointing=ckpt_mode, checkpoint_layers=lm.checkpoint_layers,
        mlp_chunk=lm.mlp_chunk_tokens)["total"] / 2**30, 3)
    return dict(**extra, impl="minift", variant=variant, quant=quant, bs=bs, seq=seq, steps=steps,
                tokens_per_s=sum(batches[(first + i) % len(batches)]["input_ids"].numel() for i in range(steps)) / dt, step_s=dt / steps, step_ms=step_ms, host_ms=host_ms, gc_ms=gc_ms,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None,
                reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3) if dev == "cuda" else None,
                load_s=t_load, warmup_s=t_warm, trainable=sum(p.numel() for p in params),
                first_loss=losses[0], last_loss=losses[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama-3.2-1b")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--variants", default="ckpt+compile", help="unsloth, unsloth+ckpt, unsloth+nockpt (the peer), or minift's ckpt, offload, nockpt or auto@GIB, each optionally +compile (the Trainer default on CUDA), +varylen (a new length every batch: counts recompiles), +torchops, +fusedlora, +kernelew (our norm/rope/act kernels inside compiled layers), +gcfreeze (gc.freeze() after warm-up), +mlpchunk (MLPs in 8192-token chunks: long context; +mlpchunkN: N-token chunks), +graph (each micro-batch's forward and backward replayed as a CUDA graph: TrainConfig.cuda_graphs)")
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "minift_bench_models"))
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--profile", action="store_true", help="add one profiled step's top kernels to each result")
    ap.add_argument("--max-context", type=float, default=None, metavar="GIB",
                    help="batch 1: the longest sequence whose step fits GIB (bisection, a process a try)")
    ap.add_argument("--context-range", default="4096,1048576", help="--max-context's lo,hi sequence lengths")
    ap.add_argument("--first-step", action="store_true",
                    help="load + add_lora + the first optimizer step of a fresh process, then one warm step")
    ap.add_argument("--cap-gib", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=3, metavar=("PATH", "QUANT", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        path, quant, variant = a.child
        if a.cap_gib is not None:  # an accelerator of cap GiB: the allocator refuses beyond it
            import torch

            torch.cuda.set_per_process_memory_fraction(a.cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        if variant.startswith("unsloth"):
            res = run_unsloth(path, quant, a.bs, a.seq, a.warmup, a.steps, a.r, variant)
        else:
            res = run_one(path, quant, a.bs, a.seq, a.warmup, a.steps, a.r, variant, a.profile)
        print("RESULT " + json.dumps(res), flush=True)
        return
    from common import checkpoint, environment

    env = environment()
    for shape in a.shapes.split(","):
        path = checkpoint(shape, a.root)
        for quant in a.quant.split(","):
            for variant in a.variants.split(","):
                if a.max_context is not None:
                    res = _max_context(a, path, quant, variant)
                else:
                    bs, warmup, steps = (a.bs, 1, 1) if a.first_step else (a.bs, a.warmup, a.steps)
                    res = _child(a, path, quant, variant, bs, a.seq, warmup, steps)
                    if a.first_step and "load_s" in res:
                        res["first_step_s"] = round(res["load_s"] + res["warmup_s"], 2)
                res.update(shape=shape, **env)
                print(json.dumps(res), flush=True)


def _child(a, path: str, quant: str, variant: str, bs: int, seq: int, warmup: int, steps: int,
           cap: float | None = None) -> dict:
    """One run in a fresh process: its RESULT, or the error it ended with."""
    cmd = [sys.executable, __file__, "--child", path, quant, variant, "--bs", str(bs), "--seq", str(seq),
           "--warmup", str(warmup), "--steps", str(steps), "--r", str(a.r)] + ["--profile"] * a.profile
    if cap is not None:
        cmd += ["--cap-gib", str(cap)]
    from common import run_child

    t0 = time.time()
    res, out = run_child(cmd, a.timeout)
    if res is None:
        res = dict(impl="minift", variant=variant, quant=quant, seq=seq, error=out[-1500:])
    res["process_s"] = round(time.time() - t0, 1)
    return res


def _max_context(a, path: str, quant: str, variant: str) -> dict:
    """Bisection (to 1/64 of the bracket, multiples of 256) for the longest batch-1 sequence whose
    warm-up and timed step run under the memory cap; each try a fresh process."""
    lo, hi = (int(v) for v in a.context_range.split(","))
    tries, best = [], None
    while hi - lo > max(256, (hi - lo) // 64) and len(tries) < 12:
        mid = (lo + hi) // 2 // 256 * 256
        res = _child(a, path, quant, variant, 1, mid, 1, 1, cap=a.max_context)
        ok = "error" not in res
        tries.append(dict(seq=mid, ok=ok, peak_gib=res.get("peak_gib"), tokens_per_s=res.get("tokens_per_s")))
        if ok:
            lo, best = mid, res
        else:
            hi = mid
    return dict(impl="minift", kind="max_context", variant=variant, quant=quant, cap_gib=a.max_context,
                max_context=lo if best is not None else None, best=best, tries=tries)


if __name__ == "__main__":
    main()
