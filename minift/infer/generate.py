"""Greedy decoding for quick checks and the demo: a plain loop without a KV cache (each step
re-runs the whole sequence), which is all a tiny model needs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

END_OF_TURN = ("<|eot_id|>", "<end_of_turn>", "<|im_end|>", "<|end|>")


def stop_ids(tokenizer: Any) -> set[int]:
    """EOS and the end-of-turn tokens the tokenizer knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_OF_TURN if t in vocab}
    return ids


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompt: str | list[dict[str, Any]], max_new_tokens: int = 48) -> str:
    """Greedy continuation of `prompt` (a string, or chat messages rendered with the tokenizer's
    chat template and the generation prompt); returns the new text without special tokens."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    stops = stop_ids(tokenizer)
    was_training = model.training
    model.eval()
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            nxt = int(model(x, return_logits=True).logits[0, -1].argmax())
            if nxt in stops:
                break
            new.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)
    finally:
        model.train(was_training)
    return tokenizer.decode(new, skip_special_tokens=True)
