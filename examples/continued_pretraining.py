"""Continued pretraining on raw text (unsloth's continued-pretraining notebook as a script), through
`minift train --raw_text_file`.

A plain text file is tokenised once and cut into overlapping windows of --chunk_size tokens
(each window shares --stride tokens with the one before, as context only, so every token is a
target once). LoRA with rsLoRA on all linear layers plus the embeddings and LM head trained in full
(`--modules_to_save embed_tokens lm_head`) at a 10x smaller learning rate
(`--embedding_learning_rate`), as the notebook does to teach a model a new domain or language.
Then the adapter is loaded back and the model continues a prompt.

    python examples/continued_pretraining.py --text_file corpus.txt
    python examples/continued_pretraining.py --smoke          # tiny model and text, offline

The same run from a shell:

    minift train --model_name unsloth/mistral-7b-v0.3 --load_in_4bit --raw_text_file corpus.txt \\
        --chunk_size 2048 --stride 256 --r 128 --lora_alpha 32 --use_rslora \\
        --modules_to_save embed_tokens lm_head --learning_rate 5e-5 --embedding_learning_rate 5e-6 \\
        --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --warmup_ratio 0.1 \\
        --lr_scheduler_type cosine --max_steps 120 --output_dir outputs/cpt
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

STORY_WORDS = ("the fox ran over the hill and the dog sat by the river while the sun rose in the east "
               "and water ran down to the sea").split()


def synthetic_text(n_sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(STORY_WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(n_sentences))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unsloth/mistral-7b-v0.3")
    ap.add_argument("--text_file", default=None, help="the UTF-8 corpus (default: a small synthetic one)")
    ap.add_argument("--chunk_size", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--max_steps", type=int, default=120)
    ap.add_argument("--output_dir", default="outputs/continued_pretraining")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, a tiny text and a few steps, offline")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import torch

    import minift
    from minift.cli import main as minift_cli

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_name, chunk, stride, steps, four_bit = args.model, args.chunk_size, args.stride, args.max_steps, True
    extra = ["--r", "128", "--lora_alpha", "32", "--per_device_train_batch_size", "2",
             "--gradient_accumulation_steps", "8", "--max_seq_length", str(chunk)]
    if args.smoke:
        torch.set_num_threads(1)
        from minift.testing import write_tiny_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="minift-smoke-")  # removed when the script ends
        model_name = str(write_tiny_checkpoint(Path(tmp.name) / "llama", "llama"))
        chunk, stride, steps, four_bit = 32, 8, 3, False
        extra = ["--r", "8", "--lora_alpha", "8", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "1", "--max_seq_length", str(chunk),
                 "--use_gradient_checkpointing", "false"]
    text_file = Path(args.text_file) if args.text_file else out / "corpus.txt"
    if not args.text_file:
        text_file.write_text(synthetic_text(40 if args.smoke else 2000))

    argv_train = [
        "train", "--model_name", model_name, "--raw_text_file", str(text_file),
        "--chunk_size", str(chunk), "--stride", str(stride), "--use_rslora",
        "--modules_to_save", "embed_tokens", "lm_head", "--learning_rate", "5e-5",
        "--embedding_learning_rate", "5e-6", "--warmup_ratio", "0.1", "--warmup_steps", "0",
        "--lr_scheduler_type", "cosine", "--max_steps", str(steps), "--optim", "adamw_8bit",
        "--weight_decay", "0.0", "--output_dir", str(out / "run"), *extra,
    ] + (["--load_in_4bit"] if four_bit else [])
    print("minift " + " ".join(argv_train))
    rc = minift_cli(argv_train)
    if rc:
        return rc

    model, tok = minift.load(model_name, load_in_4bit=four_bit)
    minift.load_adapter(model, out / "run" / "final")
    prompt = "The fox ran over"
    print(f"{prompt!r} ->", repr(minift.generate(model, tok, prompt, max_new_tokens=8 if args.smoke else 64)))
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
