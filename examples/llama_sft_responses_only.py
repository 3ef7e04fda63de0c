"""Llama chat SFT with the loss on the assistant's answers only (unsloth's Llama 3.x conversational
notebook as a script).

Llama 3.2 Instruct (4-bit by default), LoRA r=16 / alpha=16 on all linear layers, the llama-3.1
chat template (its <|eot_id|> becomes the eos, so answers stop there), ShareGPT or role/content
chats, `train_on_responses_only` (system and user turns are context, not targets), batch 2 x
gradient accumulation 4, lr 2e-4, 5 warmup steps, linear schedule, 8-bit AdamW, weight decay 0.01;
then a chat with the result, the adapter saved, and optionally a GGUF for llama.cpp / Ollama.

    python examples/llama_sft_responses_only.py                                   # bundled sample chats
    python examples/llama_sft_responses_only.py --dataset mlabonne/FineTome-100k  # the notebook's data
    python examples/llama_sft_responses_only.py --smoke                           # tiny model, offline

The default data is minift's bundled sample (`minift/data/sample.jsonl`: questions about made-up
creatures); `--smoke` swaps the model for a tiny random Llama written to a temporary directory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unsloth/Llama-3.2-3B-Instruct")
    ap.add_argument("--no_4bit", action="store_true", help="a 16-bit base instead of NF4")
    ap.add_argument("--dataset", default=None, help="a hub id or local file of chats (messages / conversations); "
                                                    "default: minift's bundled sample")
    ap.add_argument("--max_examples", type=int, default=5000)
    ap.add_argument("--max_steps", type=int, default=60)
    ap.add_argument("--output_dir", default="outputs/llama_sft_responses_only")
    ap.add_argument("--gguf", nargs="*", default=None, metavar="QUANT",
                    help="also write GGUF file(s) (default quant when given bare: q4_k_m) and an Ollama Modelfile")
    ap.add_argument("--smoke", action="store_true", help="a tiny random Llama and a few steps, offline")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import torch

    import minift
    from minift.data import load_sample
    from minift.train import TrainConfig, Trainer

    out = Path(args.output_dir)
    model_name, steps, four_bit, new_tokens = args.model, args.max_steps, not args.no_4bit, 64
    if args.smoke:
        torch.set_num_threads(1)
        from minift.testing import write_tiny_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="minift-smoke-")  # removed when the script ends
        model_name = str(write_tiny_checkpoint(Path(tmp.name) / "llama", "llama"))
        steps, new_tokens = 3, 8

    if args.dataset:
        from datasets import load_dataset

        p = Path(args.dataset)
        ds = (load_dataset("json", data_files=str(p), split="train") if p.is_file()
              else load_dataset(args.dataset, split="train"))
        data = ds.select(range(min(args.max_examples, len(ds))))
    else:
        data = load_sample()
        if args.smoke:
            data = data[:16]

    model, tok = minift.load(model_name, load_in_4bit=four_bit, max_seq_length=2048)
    minift.get_chat_template(tok, "llama-3.1")
    minift.add_lora(model, r=16, alpha=16, dropout=0.0, targets="all-linear", seed=3407)

    cfg = TrainConfig(
        batch_size=2, grad_accum=4, max_steps=steps, warmup_steps=5, lr=2e-4, scheduler="linear",
        optimizer="adamw_8bit", weight_decay=0.01, seed=3407, train_on_responses_only=True,
        gradient_checkpointing="offload", logging_steps=1, output_dir=str(out), progress_bar=not args.smoke,
    )
    trainer = Trainer(model, tok, data, config=cfg)
    ex = trainer.train_units[0]  # what the loss sees of the first conversation: the answers only
    print("trained on:", repr(tok.decode(ex.input_ids[ex.labels != -100])))
    summary = trainer.train()
    print(f"loss {summary.losses[0]:.3f} -> {summary.losses[-1]:.3f} over {summary.steps} steps, "
          f"{summary.tokens_per_s:,.0f} tokens/s")

    question = "What color is the glimmerfox?" if not args.dataset else "Continue the Fibonacci sequence: 1, 1, 2, 3, 5, 8,"
    print(f"Q: {question}\nA: ", end="", flush=True)
    minift.chat(model, tok, [{"role": "user", "content": question}], stream=True, max_new_tokens=new_tokens)

    print("adapter:", model.save_adapter(out / "lora_model", tokenizer=tok, overwrite=True))
    if args.gguf is not None:
        quants = args.gguf or ["q4_k_m"]
        (out / "gguf").mkdir(parents=True, exist_ok=True)
        paths = model.save_gguf(str(out / "gguf") + "/", quants, tokenizer=tok, overwrite=True, modelfile=True)
        for p in paths if isinstance(paths, list) else [paths]:
            print("gguf:", p)
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
