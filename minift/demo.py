"""`python -m minift.demo`: a real LoRA fine-tuning run on the embedded default, offline.

It builds a tiny Llama-style model locally (random weights; a BPE tokenizer trained on the bundled
data, with a ChatML template), asks it a few questions, fine-tunes LoRA adapters on
`minift/data/sample.jsonl` (questions and answers about the made-up creatures of Zorbia) with
minift's Trainer, and asks again. Nothing is downloaded; a few CPU minutes at most.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

QUESTIONS = ["What color is the glimmerfox?", "Where does the frostnewt live?", "What does the honeybear eat?"]


def build_base(path: Path, rows: list[dict], seed: int = 0) -> Path:
    """A tiny random-weight Llama checkpoint (hidden 128, 4 layers, untied head) with a 512-token BPE
    tokenizer trained on the sample texts, written with transformers' save_pretrained."""
    from .testing import tiny_hf_model, tiny_tokenizer

    if (path / "config.json").is_file():
        return path
    corpus = [m["content"] for r in rows for m in r["messages"]] * 2
    tok = tiny_tokenizer(vocab_size=512, template="chatml", corpus=corpus)
    model = tiny_hf_model("llama", vocab_size=len(tok), num_hidden_layers=4, seed=seed, hidden_size=128,
                          intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    with torch.no_grad():  # a random head at the usual std 0.02 caps every logit near +-2.5 (the
        model.lm_head.weight.normal_(0.0, 0.15)  # final norm fixes |h|); a trained head is larger
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def ask(model, tok, title: str) -> None:
    from .infer import chat

    print(f"\n{title}")
    for q in QUESTIONS:
        print(f"  Q: {q}\n  A: {chat(model, tok, [{'role': 'user', 'content': q}], max_new_tokens=24)!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minift.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="minift-demo", help="where the base model, adapter and logs go")
    ap.add_argument("--epochs", type=float, default=20.0, help="passes over the 150 sample conversations")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: a model this small gains nothing from more, and loses a "
                         "lot when other processes compete for the cores)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import minift
    from minift.data import load_sample
    from minift.train import TrainConfig, Trainer

    t0 = time.perf_counter()
    out = Path(args.output_dir)
    rows = load_sample()
    base = build_base(out / "base", rows)
    model, tok = minift.load(base)
    print(f"base model: {base} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, random weights)")
    ask(model, tok, "Before fine-tuning:")

    minift.add_lora(model, r=16, alpha=32, seed=0)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"\nLoRA adapters: {n_train / 1e6:.2f}M trainable parameters; training on {len(rows)} conversations")
    cfg = TrainConfig(
        output_dir=str(out), epochs=args.epochs, batch_size=8, grad_accum=1, lr=3e-3, warmup_steps=10,
        scheduler="cosine", weight_decay=0.0, train_on_responses_only=True, gradient_checkpointing=False,
        logging_steps=10, max_seq_length=64, seed=3407,
    )
    summary = Trainer(model, tok, rows, config=cfg).train()
    ask(model, tok, "After fine-tuning:")
    print(f"\nloss {summary.losses[0]:.3f} -> {summary.losses[-1]:.3f} over {summary.steps} steps, "
          f"{summary.tokens_per_s:.0f} tokens/s; adapter saved to {summary.final_path}; "
          f"metrics in {out / 'metrics.jsonl'}; total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
