"""Shapes of real models and random-weight checkpoints of those shapes (load and step speed do
not depend on the weights' values), plus the environment block every benchmark prints."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

SHAPES = {
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, head_dim=16,
                       tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, head_dim=64,
                         rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, head_dim=128,
                         rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=131072),
    "gemma-3-4b": dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
                       sliding_window=1024, query_pre_attn_scalar=256, max_position_embeddings=131072),
}
VISION = {
    "gemma-3-4b-vision": dict(text="gemma-3-4b", vision=dict(hidden_size=1152, intermediate_size=4304,
                              num_hidden_layers=27, num_attention_heads=16, image_size=896, patch_size=14,
                              vision_use_head=False), mm_tokens_per_image=256),
    "tiny-gemma3-vision": dict(text=None, vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=2, image_size=64, patch_size=8, vision_use_head=False),
                               mm_tokens_per_image=16),
}
TINY_GEMMA3_TEXT = dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024,
                        sliding_window=32, query_pre_attn_scalar=16)


def hf_config(shape: str):
    from transformers import AutoConfig, Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    if shape in SHAPES:
        spec = dict(SHAPES[shape])
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    v = VISION[shape]
    t = dict(SHAPES[v["text"]] if v["text"] else TINY_GEMMA3_TEXT)
    t.pop("model_type")
    V = t["vocab_size"]
    return Gemma3Config(text_config=Gemma3TextConfig(**t), vision_config=SiglipVisionConfig(**v["vision"]),
                        mm_tokens_per_image=v["mm_tokens_per_image"], boi_token_index=V - 4,
                        eoi_token_index=V - 3, image_token_index=V - 2)


def write_random_checkpoint(shape: str, path: str | Path, shard_bytes: int = 2 << 30) -> Path:
    """config.json + bf16 safetensors shards (+ index) + a word-level tokenizer, for `shape`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(shape)
    with torch.device("meta"):
        model = (Gemma3ForConditionalGeneration(cfg) if shape in VISION else AutoModelForCausalLM.from_config(cfg))
    sd = model.state_dict()
    tied = getattr(cfg, "tie_word_embeddings", False) or getattr(cfg.get_text_config(), "tie_word_embeddings", False)
    if tied:
        sd.pop("lm_head.weight", None)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        n = t.numel() * 2
        if size + n > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        x = torch.empty(t.shape, dtype=torch.bfloat16, device=dev)
        x.normal_(0.0, 0.02, generator=g) if "norm" not in k else x.fill_(1.0 if "gemma" not in shape else 0.0)
        shards[-1][k] = x.cpu()
        size += n
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(path)
    tok = _word_tokenizer(cfg.get_text_config().vocab_size, vision=shape in VISION)
    tok.save_pretrained(path)
    if shape in VISION:
        _processor(cfg, tok).save_pretrained(path)
    return path


def checkpoint(shape: str, root: str) -> str:
    """The random-weight checkpoint of `shape` under `root`, written on first use."""
    path = os.path.join(root, shape)
    if not os.path.exists(os.path.join(path, "config.json")):
        write_random_checkpoint(shape, path)
    return path


def run_child(cmd: list[str], timeout: float) -> tuple[dict | None, str]:
    """Runs one benchmark child process: (the dict of its `RESULT {json}` line or None, its output;
    "TIMEOUT after Ns" when it ran past `timeout`)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        out = f"TIMEOUT after {timeout}s"
    rows = [json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("RESULT ")]
    return (rows[0] if rows else None), out


def _processor(cfg, tok):
    """A Gemma3Processor over the word-level tokenizer (torchvision or PIL image processor)."""
    from transformers import Gemma3Processor

    size = cfg.vision_config.image_size
    try:
        from transformers import Gemma3ImageProcessor as IP

        ip = IP(size={"height": size, "width": size}, do_pan_and_scan=False)
    except ImportError:
        from transformers import Gemma3ImageProcessorPil as IP

        ip = IP(size={"height": size, "width": size}, do_pan_and_scan=False)
    return Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=cfg.mm_tokens_per_image)


def _word_tokenizer(vocab_size: int, vision: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    extra = {}
    if vision:  # ids match hf_config's boi / eoi / image token indices
        names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        for off, (k, t) in zip((4, 3, 2), names.items()):
            vocab.pop(f"t{vocab_size - off}", None)
            vocab[t] = vocab_size - off
            extra[k] = t
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=extra)


def compile_seconds(top: int = 25) -> dict[str, float]:
    """Where this process's compile time went: dynamo's per-phase totals in seconds, the largest
    `top` (phases nest, so they overlap)."""
    from torch._dynamo.utils import compilation_time_metrics as ctm

    return {k: round(sum(v), 2) for k, v in sorted(ctm.items(), key=lambda kv: -sum(kv[1]))[:top]}


def compile_counts() -> dict[str, int]:
    """What this process compiled: inductor's counters (FX graph cache hits and misses, autotuning,
    ...), the kernels it generated, and dynamo's frames and restarts: with `compile_seconds`, what
    the first step's compile time is made of (issue 14 target 3)."""
    from torch._dynamo.utils import counters
    from torch._inductor import metrics

    out = {f"inductor.{k}": int(v) for k, v in counters["inductor"].items()}
    out.update({f"stats.{k}": int(v) for k, v in counters["stats"].items()})
    out.update({f"frames.{k}": int(v) for k, v in counters["frames"].items()})
    out.update({f"aot_autograd.{k}": int(v) for k, v in counters["aot_autograd"].items()})  # its cache's hits
    out["generated_kernels"] = int(metrics.generated_kernel_count)
    return out


def environment() -> dict:
    import transformers

    env = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, transformers=transformers.__version__,
               python=platform.python_version(), cpu=platform.processor() or platform.machine())
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        pass
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        pass
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    else:
        env["device"] = "cpu"
    return env
