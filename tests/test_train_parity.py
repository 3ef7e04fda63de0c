"""Convergence parity: minift's Trainer (LoRA) vs a reference loop written here with transformers +
PEFT + torch AdamW + transformers' schedule, from the same initial LoRA weights, step by step."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from train_utils import one_thread, single_thread, text_rows, tiny_llama  # noqa: F401 (fixtures)

import minift
from minift.train import TrainConfig, Trainer

STEPS, BATCH, ACCUM, SEED, LR = 30, 2, 2, 7, 3e-3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]



def peft_name(name: str) -> str:
    return name.replace("base_model.model.", "", 1).replace(".default", "")


def reference_losses(path, rows, lora_state, scheduler: str) -> list[float]:
    """HF-Trainer-style loop: per-step shuffled order, micro-batches with dynamic padding, the
    loss summed over micro-batches with num_items_in_batch = the step's target-token count."""
    from peft import LoraConfig, get_peft_model

    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(lora_state[peft_name(n)])
    model.train()
    examples = [tok(r["text"])["input_ids"] + [tok.eos_token_id] for r in rows]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, foreach=True)
    make = {"linear": transformers.get_linear_schedule_with_warmup,
            "cosine": transformers.get_cosine_schedule_with_warmup}[scheduler]
    sched = make(opt, 3, STEPS)
    per_step = BATCH * ACCUM
    steps_per_epoch = math.ceil(len(examples) / per_step)
    losses = []
    for step in range(STEPS):
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        units = order[k * per_step:(k + 1) * per_step]
        micro = [units[i:i + BATCH] for i in range(0, len(units), BATCH)]
        n_items = sum(len(examples[i]) - 1 for i in units)
        total = 0.0
        for mb in micro:
            longest = max(len(examples[i]) for i in mb)
            ids = torch.full((len(mb), longest), tok.pad_token_id)
            am = torch.zeros((len(mb), longest), dtype=torch.long)
            for r, i in enumerate(mb):
                ids[r, :len(examples[i])] = torch.tensor(examples[i])
                am[r, :len(examples[i])] = 1
            labels = ids.masked_fill(am == 0, -100)
            loss = model(input_ids=ids, attention_mask=am, labels=labels, num_items_in_batch=n_items).loss
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    return losses


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_lora_training_matches_transformers_peft(tmp_path, scheduler):
    path = tiny_llama(tmp_path / "m")
    rows = text_rows(14, seed=1)
    model, tok = minift.load(path)
    minift.add_lora(model, r=8, alpha=16, dropout=0.0, targets=TARGETS, seed=1)
    with torch.no_grad():  # B starts at zero; randomise it so every LoRA path matters from step 1
        g = torch.Generator().manual_seed(2)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=STEPS, batch_size=BATCH, grad_accum=ACCUM, lr=LR,
                      weight_decay=0.01, warmup_steps=3, scheduler=scheduler, max_grad_norm=1.0, seed=SEED,
                      progress_bar=False, plot=False, logging_steps=5)
    ours = Trainer(model, tok, rows, config=cfg).train().losses
    ref = reference_losses(path, rows, init, scheduler)
    diffs = [abs(a - b) for a, b in zip(ours, ref)]
    print(f"\n{scheduler}: max |loss diff| over {STEPS} steps = {max(diffs):.2e}; "
          f"loss {ref[0]:.4f} -> {ref[-1]:.4f}")
    assert len(ours) == STEPS and max(diffs) <= 1e-4
    assert sum(ref[-5:]) < sum(ref[:5])  # it actually learns
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
