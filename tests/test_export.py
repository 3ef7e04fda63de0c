"""Merged checkpoints stop where the chat format ends a turn: generation_config.json lists the
chat template's end-of-turn token as eos, so transformers' generate ends the answer there."""

from __future__ import annotations

import json

import torch
import transformers

import minift
from minift.testing import write_tiny_checkpoint


def test_merged_generation_config_stops_at_end_of_turn(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "base", "llama", template="chatml")
    model, tok = minift.load(path)
    minift.add_lora(model, r=4, alpha=8)
    out = model.save_merged(tmp_path / "merged", dtype=torch.float32)
    gen = json.loads((out / "generation_config.json").read_text())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in gen["eos_token_id"] and tok.eos_token_id in gen["eos_token_id"]
    # transformers reads it: a generation that reaches <|im_end|> ends there
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert im_end in ref.generation_config.eos_token_id
    ids = tok("hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # <|im_end|> pushed to the top: the first new token must end the generation
        got = ref.generate(ids, max_new_tokens=5, do_sample=False, sequence_bias={(im_end,): 100.0})
    assert got[0, ids.shape[1]:].tolist() == [im_end]
