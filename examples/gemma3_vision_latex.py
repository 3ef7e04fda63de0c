"""Gemma 3 vision: image -> LaTeX, unsloth's Gemma 3 (4B) vision notebook as a script.

4-bit Gemma 3, LoRA on the vision tower and the language model (r=16, alpha=16, dropout 0), an
image -> LaTeX dataset in the shape of `unsloth/LaTeX_OCR` (rows {"image": PIL image, "text":
LaTeX}), the gemma-3 chat template, batch 1 x gradient accumulation 4, max_grad_norm 0.3, warmup
ratio 0.03, cosine schedule, lr 2e-4, weight decay 0.01, AdamW (fused on CUDA), loss on the answers
only; then the adapter and processor are saved and the model is asked about an image.

    python examples/gemma3_vision_latex.py                               # local stand-in data
    python examples/gemma3_vision_latex.py --dataset unsloth/LaTeX_OCR   # the hub dataset
    python examples/gemma3_vision_latex.py --smoke                       # tiny model, seconds, offline

The default data is a small local stand-in built here: formulas drawn with PIL (powers,
subscripts, fractions, roots) beside their LaTeX. `--smoke` also swaps the model for a tiny
random Gemma 3 vision checkpoint written to a temporary directory.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

INSTRUCTION = "Write the LaTeX representation for this image."
VARS = "abcnxyz"


# ---- the stand-in dataset: formulas drawn with PIL ---------------------------------------------


def random_formula(rng: random.Random) -> list[tuple]:
    items: list[tuple] = []
    for k in range(rng.randint(1, 3)):
        if k:
            items.append(("op", rng.choice(["+", "-", "="])))
        kind = rng.choice(["pow", "sub", "frac", "sqrt", "plain"])
        v = rng.choice(VARS)
        if kind in ("pow", "sub"):
            items.append((kind, v, str(rng.randint(2, 9))))
        elif kind == "frac":
            items.append(("frac", v, rng.choice(VARS) + (f"+{rng.randint(1, 9)}" if rng.random() < 0.5 else "")))
        elif kind == "sqrt":
            items.append(("sqrt", v, str(rng.randint(2, 3)) if rng.random() < 0.3 else ""))
        else:
            items.append(("plain", f"{rng.randint(2, 9)}{v}"))
    return items


def to_latex(items: list[tuple]) -> str:
    out = []
    for it in items:
        kind = it[0]
        if kind == "pow":
            out.append(f"{it[1]}^{{{it[2]}}}")
        elif kind == "sub":
            out.append(f"{it[1]}_{{{it[2]}}}")
        elif kind == "frac":
            out.append(f"\\frac{{{it[1]}}}{{{it[2]}}}")
        elif kind == "sqrt":
            inner = it[1] + (f"^{{{it[2]}}}" if it[2] else "")
            out.append(f"\\sqrt{{{inner}}}")
        else:
            out.append(it[1])
    return " ".join(out)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def render(items: list[tuple], height: int = 96):
    """The formula drawn left to right: exponents raised, subscripts lowered, fractions stacked,
    roots with their bar."""
    from PIL import Image, ImageDraw

    big, small = _font(32), _font(20)
    img = Image.new("RGB", (40 + 90 * len(items), height), "white")
    d = ImageDraw.Draw(img)
    x, base = 16, height // 2 - 16

    def width(text, font):
        return int(d.textlength(text, font=font))

    for it in items:
        kind = it[0]
        if kind in ("op", "plain"):
            d.text((x, base), it[1], fill="black", font=big)
            x += width(it[1], big) + 10
        elif kind == "pow":
            d.text((x, base), it[1], fill="black", font=big)
            x += width(it[1], big)
            d.text((x, base - 8), it[2], fill="black", font=small)
            x += width(it[2], small) + 10
        elif kind == "sub":
            d.text((x, base), it[1], fill="black", font=big)
            x += width(it[1], big)
            d.text((x, base + 20), it[2], fill="black", font=small)
            x += width(it[2], small) + 10
        elif kind == "frac":
            w = max(width(it[1], small), width(it[2], small)) + 8
            d.text((x + (w - width(it[1], small)) // 2, base - 10), it[1], fill="black", font=small)
            d.line((x, base + 16, x + w, base + 16), fill="black", width=2)
            d.text((x + (w - width(it[2], small)) // 2, base + 20), it[2], fill="black", font=small)
            x += w + 10
        elif kind == "sqrt":
            w = width(it[1], big) + (width(it[2], small) if it[2] else 0) + 6
            d.line((x, base + 20, x + 5, base + 34, x + 12, base - 4, x + 12 + w, base - 4), fill="black", width=2)
            d.text((x + 14, base), it[1], fill="black", font=big)
            if it[2]:
                d.text((x + 14 + width(it[1], big), base - 6), it[2], fill="black", font=small)
            x += 14 + w + 10
    return img.crop((0, 0, min(img.width, x + 16), height))


def standin_dataset(n: int, seed: int = 3407) -> list[dict]:
    """Rows in unsloth/LaTeX_OCR's shape: {"image": PIL.Image, "text": LaTeX}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        items = random_formula(rng)
        rows.append({"image": render(items), "text": to_latex(items)})
    return rows


def hub_dataset(name: str, n: int) -> list[dict] | None:
    try:
        from datasets import load_dataset

        ds = load_dataset(name, split="train")
    except Exception as e:  # offline, missing: fall back to the stand-in
        print(f"could not load {name} ({type(e).__name__}: {e}); using the local stand-in instead", file=sys.stderr)
        return None
    ds = ds.select(range(min(n, len(ds))))
    return [{"image": r["image"], "text": r["text"]} for r in ds]


def to_conversation(sample: dict) -> dict:
    """The notebook's convert_to_conversation."""
    return {"messages": [
        {"role": "user", "content": [{"type": "text", "text": INSTRUCTION}, {"type": "image", "image": sample["image"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": sample["text"]}]},
    ]}


# ---- the run ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unsloth/gemma-3-4b-it")
    ap.add_argument("--dataset", default=None, help="unsloth/LaTeX_OCR (or another hub dataset of image / text rows); "
                                                    "default: the local stand-in")
    ap.add_argument("--max_examples", type=int, default=1000, help="rows taken from the dataset (default: 1000)")
    ap.add_argument("--max_steps", type=int, default=30)
    ap.add_argument("--output_dir", default="outputs/gemma3_vision_latex")
    ap.add_argument("--smoke", action="store_true", help="a tiny random Gemma 3 vision model and a few steps, offline")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import torch

    import minift
    from minift.train import TrainConfig, Trainer

    out = Path(args.output_dir)
    model_name, n, steps, new_tokens = args.model, args.max_examples, args.max_steps, 128
    if args.smoke:
        torch.set_num_threads(1)
        from minift.testing import write_tiny_gemma3_vision

        tmp = tempfile.TemporaryDirectory(prefix="minift-smoke-")  # removed when the script ends
        model_name = str(write_tiny_gemma3_vision(Path(tmp.name) / "gemma3-vision"))
        n, steps, new_tokens = 8, 2, 8

    rows = hub_dataset(args.dataset, n) if args.dataset else None
    if rows is None:
        rows = standin_dataset(n)
    print(f"{len(rows)} image -> LaTeX rows; the first: {rows[0]['text']!r}")
    data = [to_conversation(r) for r in rows]

    model, processor = minift.load(model_name, load_in_4bit=True, max_seq_length=2048)
    minift.add_lora(model, r=16, alpha=16, dropout=0.0, vision=True, language=True, attention=True, mlp=True,
                    seed=3407)
    minift.get_chat_template(processor, "gemma-3")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA on the vision tower and the language model: {n_train:,} trainable parameters")

    cfg = TrainConfig(
        batch_size=1, grad_accum=4, max_steps=steps, warmup_ratio=0.03, scheduler="cosine", lr=2e-4,
        weight_decay=0.01, max_grad_norm=0.3, optimizer="adamw",  # torch AdamW, fused on CUDA
        train_on_responses_only=True, gradient_checkpointing="offload", max_seq_length=2048, seed=3407,
        logging_steps=1, output_dir=str(out), progress_bar=not args.smoke,
    )
    summary = Trainer(model, processor, data, config=cfg).train()
    print(f"loss {summary.losses[0]:.3f} -> {summary.losses[-1]:.3f} over {summary.steps} steps")

    saved = model.save_adapter(out / "lora_model", tokenizer=processor, overwrite=True)  # adapter + processor
    print(f"adapter and processor saved to {saved}")

    image = rows[0]["image"]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": INSTRUCTION}]}]
    print("model: ", end="", flush=True)
    minift.chat(model, processor, messages, stream=True, max_new_tokens=new_tokens)
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
