"""Load time and peak memory: minift.load vs transformers' from_pretrained on the same checkpoint.

Each (impl, quant) runs in its own process so peaks do not mix. Host peak is the process's
max RSS; on CUDA also torch.cuda.max_memory_allocated. Prints one JSON object per run.

  python bench/load.py --shape llama-3.2-1b --quant none,4bit
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def peak_rss_gib() -> float:
    """VmHWM: this process image's peak resident set (ru_maxrss would include the parent's
    peak from before exec on Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(impl: str, path: str, quant: str, device: str) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer  # noqa: F401

    import minift

    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # CUDA context outside the timed region, for both
    rss0 = peak_rss_gib()
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    if impl == "minift":  # includes the tokenizer/processor, which from_pretrained below does not load
        model, _ = minift.load(path, dtype=dtype, device=device, load_in_4bit=quant == "4bit", use_name_map=False)
    else:
        kw = {}
        if quant == "4bit":
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
        cls = transformers.AutoModelForImageTextToText if "gemma3" == json.loads(
            (Path(path) / "config.json").read_text())["model_type"] else transformers.AutoModelForCausalLM
        model = cls.from_pretrained(path, dtype=dtype, device_map=device, **kw)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    out = dict(impl=impl, quant=quant, device=device, load_s=round(secs, 2),
               host_peak_gib=round(peak_rss_gib(), 3), host_peak_over_imports_gib=round(peak_rss_gib() - rss0, 3))
    if device.startswith("cuda"):
        out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["gpu_final_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny-llama")
    ap.add_argument("--path", help="existing checkpoint (default: write a random one of --shape)")
    ap.add_argument("--impls", default="minift,hf")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--device", default=None)
    ap.add_argument("--child", nargs=4, metavar=("IMPL", "PATH", "QUANT", "DEVICE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(*a.child)), flush=True)
        return
    import torch
    from common import environment, write_random_checkpoint

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = a.path
    if path is None:
        path = tempfile.mkdtemp(prefix=f"minift-bench-{a.shape}-")
        t0 = time.perf_counter()
        write_random_checkpoint(a.shape, path)
        print(f"# wrote {a.shape} checkpoint in {time.perf_counter() - t0:.1f}s to {path}", file=sys.stderr)
    env = environment()
    results = []
    for quant in a.quant.split(","):
        for impl in a.impls.split(","):
            r = subprocess.run([sys.executable, __file__, "--child", impl, path, quant, device],
                               capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(line[0][7:]) if line else dict(impl=impl, quant=quant, error=r.stderr[-2000:])
            res.update(shape=a.shape, **env)
            results.append(res)
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
