"""Same function (issue 14, target 6): the loss of each of the first steps of minift's Trainer, with
its defaults (compiled layers and its checkpointing / micro-batch plan on CUDA), against an
HF + PEFT loop on the same random-weight checkpoint, the same starting adapter (minift's, saved in
PEFT's format and loaded by PEFT), the same rows in the same order and the same optimiser and
schedule. Workload W's shape: LoRA r=16, alpha=16 on q,k,v,o,gate,up,down; batch 4 x 2048 tokens;
AdamW (fused on CUDA), linear decay, clipping at 1.0; bf16 or NF4 (bitsandbytes' nf4 + double
quantisation on the HF side) base. Each side runs in its own process; one JSON line a row:

  python bench/parity.py --shapes llama-3.2-1b,gemma-3-4b --quant none,4bit --steps 5

The rows are random words, so a step's loss sits near ln(vocab) and moves little in 5 steps:
`max_rel_diff` is compared with the bf16 noise of one loss (~1e-3 relative) and `ref_change` (how
far the reference loss moved) says how much the steps had to agree on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkpoint, environment, run_child  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED, LR = 3407, 2e-4


def _rows(vocab: int, n: int, words: int) -> list[dict]:
    """n rows of `words` random word-level tokens (bench/common's tokenizer: "t{id}")."""
    import torch

    g = torch.Generator().manual_seed(11)
    ids = torch.randint(4, vocab - 8, (n, words), generator=g)  # clear of specials and image tokens
    return [{"text": " ".join(f"t{i}" for i in row.tolist())} for row in ids]


def run_minift(path: str, quant: str, steps: int, bs: int, seq: int, r: int, adapter: str) -> dict:
    import torch

    import minift
    from minift.train import TrainConfig, Trainer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = minift.load(path, dtype=torch.bfloat16, device=dev, load_in_4bit=quant == "4bit")
    minift.add_lora(model, r=r, alpha=r, dropout=0.0, targets=TARGETS, seed=0)
    model.save_adapter(adapter, overwrite=True)  # the starting adapter the reference loads
    rows = _rows(model.config.vocab_size, steps * bs, seq - 1)  # + eos = seq tokens
    cfg = TrainConfig(output_dir=tempfile.mkdtemp(prefix="parity_"), max_steps=steps, batch_size=bs, grad_accum=1,
                      lr=LR, max_seq_length=seq, seed=SEED, progress_bar=False, plot=False, logging_steps=1,
                      save_steps=None)
    t0 = time.time()
    trainer = Trainer(model, tok, rows, config=cfg)
    losses = trainer.train().losses
    plan = trainer.memory_plan
    return dict(losses=losses, seconds=round(time.time() - t0, 1), plan=None if plan is None else plan.describe())


def run_reference(path: str, quant: str, steps: int, bs: int, seq: int, adapter: str) -> dict:
    """transformers + PEFT, as tests/test_train_parity.py's loop (which equals the Trainer to 1e-4 in
    fp32 on CPU): rows in the Trainer's order (a permutation seeded SEED + epoch), each row's tokens
    + eos, labels = inputs, the step's loss normalised by its target-token count."""
    import torch
    import transformers
    from peft import PeftModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(dtype=torch.bfloat16, device_map=dev)
    if quant == "4bit":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # memory only
    hf.enable_input_require_grads()
    model = PeftModel.from_pretrained(hf, adapter, is_trainable=True)
    model.train()
    rows = _rows(hf.config.vocab_size, steps * bs, seq - 1)
    examples = [tok(r["text"])["input_ids"] + [tok.eos_token_id] for r in rows]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=dev == "cuda")
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, steps)
    per_epoch = math.ceil(len(examples) / bs)
    losses, t0 = [], time.time()
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        ids = torch.tensor([examples[i] for i in order[k * bs:(k + 1) * bs]], device=dev)
        n_items = ids.numel() - ids.shape[0]
        loss = model(input_ids=ids, labels=ids, num_items_in_batch=n_items).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return dict(losses=losses, seconds=round(time.time() - t0, 1))


def _child(a, side: str, path: str, quant: str, adapter: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, path, quant, adapter, "--steps", str(a.steps), "--bs", str(a.bs),
           "--seq", str(a.seq), "--r", str(a.r)]
    res, out = run_child(cmd, a.timeout)
    return res if res is not None else dict(error=out[-1500:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama-3.2-1b")
    ap.add_argument("--quant", default="none,4bit")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "minift_bench_models"))
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--child", nargs=4, metavar=("SIDE", "PATH", "QUANT", "ADAPTER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        side, path, quant, adapter = a.child
        res = (run_minift(path, quant, a.steps, a.bs, a.seq, a.r, adapter) if side == "minift"
               else run_reference(path, quant, a.steps, a.bs, a.seq, adapter))
        print("RESULT " + json.dumps(res), flush=True)
        return
    env = environment()
    for shape in a.shapes.split(","):
        path = checkpoint(shape, a.root)
        for quant in a.quant.split(","):
            adapter = tempfile.mkdtemp(prefix="parity_adapter_")
            ours = _child(a, "minift", path, quant, adapter)
            ref = _child(a, "hf+peft", path, quant, adapter) if "error" not in ours else dict(error="minift failed")
            res = dict(kind="parity", shape=shape, quant=quant, steps=a.steps, bs=a.bs, seq=a.seq, minift=ours, ref=ref)
            if "losses" in ours and "losses" in ref:
                pairs = list(zip(ours["losses"], ref["losses"]))
                res.update(max_abs_diff=max(abs(x - y) for x, y in pairs),
                           max_rel_diff=max(abs(x - y) / abs(y) for x, y in pairs),
                           ref_change=ref["losses"][0] - ref["losses"][-1])
            res.update(**env)
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
