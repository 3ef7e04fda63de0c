"""`python -m minift.demo`: a real LoRA fine-tuning run on the embedded default, offline.

It builds a tiny Llama-style model locally (random weights; a BPE tokenizer trained on the bundled
data, with a ChatML template), asks it a few questions, fine-tunes LoRA adapters on
`minift/data/sample.jsonl` (questions and answers about the made-up creatures of Zorbia) with
minift's Trainer, and asks again. Beside the trained questions it asks held-out paraphrases (the
same facts, worded as no training row words them) and reports the loss on all 150 paraphrases
(held-out eval loss) before and during training. The loss curve is drawn in the terminal, and as
loss.png when matplotlib is installed. Nothing is downloaded; a few CPU minutes at most.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import time
from pathlib import Path

import torch

QUESTIONS = ["What color is the glimmerfox?", "Where does the frostnewt live?", "What does the honeybear eat?"]
# The training questions' five forms, and the held-out wording of each (no training row uses it).
PARAPHRASES = [
    (r"What color is the (.+)\?", "Which colour is the {}?"),
    (r"Where does the (.+) live\?", "Where can the {} be found?"),
    (r"What does the (.+) eat\?", "What food does the {} eat?"),
    (r"What sound does the (.+) make\?", "What noise does the {} make?"),
    (r"Tell me about the (.+)\.", "Describe the {}."),
]


def paraphrase(question: str) -> str:
    for pattern, form in PARAPHRASES:
        m = re.fullmatch(pattern, question)
        if m:
            return form.format(m.group(1))
    raise ValueError(f"no paraphrase rule for {question!r}")


def held_out(rows: list[dict]) -> list[dict]:
    """Every sample conversation with its question paraphrased and its answer kept."""
    seen = {r["messages"][0]["content"] for r in rows}
    out = []
    for r in rows:
        q = paraphrase(r["messages"][0]["content"])
        assert q not in seen, q
        out.append({"messages": [{"role": "user", "content": q}, r["messages"][1]]})
    return out


HELD_OUT_QUESTIONS = [paraphrase(q) for q in QUESTIONS]


def text_plot(train: list[tuple[int, float]], evals: list[tuple[int, float]], width: int = 60, height: int = 12) -> str:
    """The loss curve as text: '*' train (mean per column), 'o' held-out eval."""
    pts = train + evals
    if not pts:
        return ""
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    hi = hi if hi > lo else lo + 1.0
    last = max(s for s, _ in pts)
    grid = [[" "] * width for _ in range(height)]

    def cell(step: int, v: float) -> tuple[int, int]:
        col = min(width - 1, int((step - 1) / max(last, 1) * width))
        row = min(height - 1, int((hi - v) / (hi - lo) * (height - 1) + 0.5))
        return row, col

    cols: dict[int, list[float]] = {}
    for s, v in train:
        cols.setdefault(cell(s, v)[1], []).append(v)
    for c, vs in cols.items():
        grid[cell(1 + int(c / width * last), sum(vs) / len(vs))[0]][c] = "*"
    for s, v in evals:
        r, c = cell(s, v)
        grid[r][c] = "o"
    lines = [f"{hi - (hi - lo) * i / (height - 1):7.3f} |" + "".join(row) for i, row in enumerate(grid)]
    lines.append(" " * 8 + "+" + "-" * width)
    lines.append(" " * 9 + f"step 1{' ' * (width - 12 - len(str(last)))}step {last}")
    return "\n".join(lines)


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
    for label, questions in (("trained", QUESTIONS), ("held-out paraphrase", HELD_OUT_QUESTIONS)):
        for q in questions:
            print(f"  Q ({label}): {q}\n  A: {chat(model, tok, [{'role': 'user', 'content': q}], max_new_tokens=24)!r}")


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
    heldout = held_out(rows)
    steps = math.ceil(len(rows) / 8) * args.epochs
    cfg = TrainConfig(
        output_dir=str(out), epochs=args.epochs, batch_size=8, grad_accum=1, lr=3e-3, warmup_steps=10,
        scheduler="cosine", weight_decay=0.0, train_on_responses_only=True, gradient_checkpointing=False,
        logging_steps=10, logging_first_step=True, eval_steps=max(1, math.ceil(steps / 5)), max_seq_length=64,
        seed=3407,
    )
    trainer = Trainer(model, tok, rows, eval_dataset=heldout, config=cfg)
    before = trainer.evaluate()
    print(f"held-out eval loss before fine-tuning: {before:.3f} ({len(heldout)} paraphrased questions)")
    summary = trainer.train()
    ask(model, tok, "After fine-tuning:")
    recs = trainer.metrics.records
    train_pts = [(r["step"], r["loss"]) for r in recs if not r.get("eval") and r.get("loss") is not None]
    eval_pts = [(r["step"], r["eval_loss"]) for r in recs if r.get("eval")]
    print("\nloss ('*' train, 'o' held-out eval):\n" + text_plot(train_pts, eval_pts))
    png = out / "loss.png"
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed, so there is no loss.png: pip install matplotlib (or minift[plot])")
    elif png.is_file():
        print(f"loss plot: {png}")
    print(f"\nloss {summary.losses[0]:.3f} -> {summary.losses[-1]:.3f} over {summary.steps} steps; held-out eval "
          f"loss {before:.3f} -> {summary.eval_loss:.3f}; {summary.tokens_per_s:.0f} tokens/s; adapter saved to "
          f"{summary.final_path}; metrics in {out / 'metrics.jsonl'}; total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
