"""Decode speed: minift's `model.generate` against transformers' `generate` (its default dynamic
cache, and its static cache, which transformers compiles) on random-weight models of real shapes,
each (shape, quant, impl) in its own process, which loads the model once and times each batch
size. Prints one JSON line a run, then a table. (Without CUDA it runs on the CPU: a dry run,
e.g. `--shapes tiny-llama --impls minift,hf --prompt 16 --new 8`.)

    python bench/generate.py --shapes llama-3.2-1b,gemma-3-4b --quant none,4bit --batch 1,8

Decode tokens/s = batch x (new - 1) / (time of the whole generate - time of a 1-token generate),
prompt and new token counts fixed (eos off), after one warm-up generate (compilation).
Roofline: a decode step must read every weight once plus the KV cache so far."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# also minift-nofuse (decode layers unfused: norms, adds apart), minift-attn[<n>] (one-launch decode attention;
# <n>: at most n programs a (row, KV head)) and minift-lora (r=16 adapters, unmerged)
IMPLS = ("minift", "hf", "hf-static", "unsloth")


def _timed(fn) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def _profile(fn, steps: int) -> dict:
    """Top CUDA kernels of one `fn()` (a whole generate) and the kernel count per decode step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in ev) / 1e3
    top = sorted(ev, key=lambda e: -e.self_device_time_total)[:12]
    return dict(gpu_ms=round(total, 2), kernels_per_step=round(sum(e.count for e in ev) / steps, 1),
                top=[(e.key[:80], e.count, round(e.self_device_time_total / 1e3, 2)) for e in top])


def _run(cmd: list[str], timeout: float) -> tuple[list[dict], str]:
    """A child's `RESULT {json}` rows and output, the rows it printed before a timeout included."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        text = [t.decode(errors="replace") if isinstance(t, bytes) else (t or "") for t in (e.stdout, e.stderr)]
        out = "".join(text) + f"\nTIMEOUT after {timeout}s"
    return [json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("RESULT ")], out


def run_one(path: str, quant: str, impl: str, batches: list[int], prompt: int, new: int, prof: bool = False,
            repeats: int = 2):
    """Loads the model once, then times each batch size in turn: yields a result a batch."""
    import torch

    g = torch.Generator().manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if impl.startswith("minift"):
        import minift

        if impl == "minift-nofuse":  # the decode step as before the fused layer: norms and skip adds apart
            from minift.arch.model import DecoderLayer

            DecoderLayer._fused_decoding = lambda self, x: False
        if impl.startswith("minift-attn"):  # one-launch decode attention (ops.decode_attention), off by default
            import importlib

            from minift.arch.cache import KVCache

            KVCache.fused_attention = True
            if impl[11:]:  # e.g. minift-attn1: one program a (row, KV head), no split
                importlib.import_module("minift.ops.decode_attention").MAX_SPLITS = int(impl[11:])

        model, _ = minift.load(path, dtype=torch.bfloat16, device=dev, load_in_4bit=quant == "4bit",
                               use_name_map=False)
        if impl == "minift-lora":  # right after training: r=16 adapters on every linear, not merged
            minift.add_lora(model, r=16, alpha=16, seed=0)

        def gen(ids, n):
            return model.generate(ids, max_new_tokens=n, eos_token_id=[])
    elif impl == "unsloth":  # FastLanguageModel.for_inference: unsloth's fast generation path
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=prompt + new, dtype=torch.bfloat16,
                                                     load_in_4bit=quant == "4bit")
        FastLanguageModel.for_inference(model)

        def gen(ids, n):
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
    else:
        import transformers

        kw = dict(dtype=torch.bfloat16, device_map=dev)
        if quant == "4bit":
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()
        extra = {"cache_implementation": "static"} if impl == "hf-static" else {}

        def gen(ids, n):
            with torch.no_grad():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0, **extra)
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    params = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for batch in batches:
        ids = torch.randint(10, c.vocab_size - 10, (batch, prompt), generator=g).to(dev)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = gen(ids, new)  # compiles this batch's shapes
        warm_s = time.perf_counter() - t0
        assert out.shape == (batch, prompt + new), out.shape
        gen(ids, 1)
        prefill = min(_timed(lambda: gen(ids, 1)) for _ in range(repeats))
        total = min(_timed(lambda: gen(ids, new)) for _ in range(repeats))
        decode_tps = batch * (new - 1) / (total - prefill)
        extra_info = _profile(lambda: gen(ids, new), new) if prof else {}
        kv_avg = batch * (prompt + new / 2) * c.num_hidden_layers * c.num_key_value_heads * hd * 2 * 2  # bf16 K, V
        yield dict(impl=impl, quant=quant, batch=batch, prompt=prompt, new=new, decode_tok_s=round(decode_tps, 1),
                   prefill_ms=round(prefill * 1e3, 1), total_s=round(total, 3), first_call_s=round(warm_s, 1),
                   weight_bytes=params, kv_bytes_avg=int(kv_avg),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None,
                   **extra_info)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama-3.2-1b")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--bandwidth", type=float, default=4.8e12, help="HBM bytes/s for the roofline column")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "minift_bench_models"))
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2, help="timed generates of each length (the fastest counts)")
    ap.add_argument("--profile", action="store_true", help="add the top kernels of one profiled generate")
    ap.add_argument("--child", nargs=4, metavar=("PATH", "QUANT", "IMPL", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        path, quant, impl, batch = a.child
        for res in run_one(path, quant, impl, [int(b) for b in batch.split(",")], a.prompt, a.new, a.profile,
                           a.repeats):
            print("RESULT " + json.dumps(res), flush=True)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import checkpoint, environment

    env = environment()
    rows = []
    batches = [int(b) for b in a.batch.split(",")]
    for shape in a.shapes.split(","):
        path = checkpoint(shape, a.root)
        for quant in a.quant.split(","):
            for impl in a.impls.split(","):  # one process an impl: it loads once and times each batch size
                cmd = [sys.executable, os.path.abspath(__file__), "--child", path, quant, impl, a.batch,
                       "--prompt", str(a.prompt), "--new", str(a.new), "--repeats", str(a.repeats)] + ["--profile"] * a.profile
                results, out = _run(cmd, a.timeout * len(batches))
                done = {r["batch"] for r in results}
                results += [dict(impl=impl, quant=quant, batch=b, error=out[-1500:]) for b in batches if b not in done]
                hints = [ln.strip()[:200] for ln in out.splitlines() if "cudagraph" in ln.lower() or "recompil" in ln.lower()]
                for res in results:
                    if hints:
                        res["compile_notes"] = hints[:5]
                    res.update(shape=shape, **env)
                    if "weight_bytes" in res:  # a step reads every weight and the KV cache so far
                        res["roofline_tok_s"] = round(res["batch"] * a.bandwidth / (res["weight_bytes"] + res["kv_bytes_avg"]), 1)
                    rows.append(res)
                    print(json.dumps(res), flush=True)
    rows.sort(key=lambda r: (r["shape"], r["quant"], r["batch"]))  # the table groups each row's peers
    print("\n| shape | quant | batch | impl | decode tok/s | vs hf | vs hf-static | vs unsloth | % of HBM roofline | first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "decode_tok_s" not in r:
            print(f"| {r['shape']} | {r['quant']} | {r['batch']} | {r['impl']} | error | | | | | |")
            continue
        peers = {p["impl"]: p.get("decode_tok_s") for p in rows
                 if p.get("shape") == r["shape"] and p["quant"] == r["quant"] and p["batch"] == r["batch"]}

        def ratio(k):
            return f"{r['decode_tok_s'] / peers[k]:.2f}x" if peers.get(k) else ""

        print(f"| {r['shape']} | {r['quant']} | {r['batch']} | {r['impl']} | {r['decode_tok_s']:,.0f} | {ratio('hf')} | "
              f"{ratio('hf-static')} | {ratio('unsloth')} | {100 * r['decode_tok_s'] / r['roofline_tok_s']:.0f}% | {r['first_call_s']} |")


if __name__ == "__main__":
    main()
