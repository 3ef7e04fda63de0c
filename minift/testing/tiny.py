"""Tiny random-weight Hugging Face checkpoints and tokenizers, built offline.

Used by the tests (transformers on the same checkpoint is the numerical reference) and by the
README's demo, since nothing may be downloaded. transformers builds the checkpoint here; it is
never used for minift's own modeling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning a language model teaches it new answers.",
    "What is the capital of France? The capital of France is Paris.",
    "Two plus two is four. Three plus five is eight.",
    "user assistant system model human gpt",
    "The sun rises in the east and sets in the west.",
    "Water boils at one hundred degrees Celsius.",
    "A cat sat on the mat, and a dog sat on the log.",
    "0 1 2 3 4 5 6 7 8 9 + - = ? ! , . : ; ( ) { } [ ] \\ ^ _ x y z",
]

# Chat templates of the three families the tests cover, in the shape the real ones have.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = namespace(v='') %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{% set text.v = text.v + '<start_of_image>' %}"
    "{% elif item['type'] == 'text' %}{% set text.v = text.v + item['text'] %}{% endif %}{% endfor %}"
    "{% set text = text.v %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + text | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "gemma": GEMMA_TEMPLATE, "chatml": CHATML_TEMPLATE}

SPECIAL_TOKENS = [
    "<pad>", "<bos>", "<eos>", "<unk>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]


def tiny_tokenizer(vocab_size: int = 256, template: str = "llama3", corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained on a small corpus, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
    )
    fast.chat_template = TEMPLATES[template]
    return fast


FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    "gemma2": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=5, query_pre_attn_scalar=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
    ),
    "gemma3_text": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=5, query_pre_attn_scalar=16, layer_types=None,
    ),
}

_CONFIG_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


def tiny_hf_model(family: str, vocab_size: int = 256, num_hidden_layers: int = 2, seed: int = 0, **overrides: Any):
    """A random-weight transformers model of `family` (float32, eval mode)."""
    import transformers

    cfg_name, model_name = _CONFIG_CLASSES[family]
    kwargs: dict[str, Any] = dict(FAMILY_DEFAULTS[family])
    kwargs.update(vocab_size=vocab_size, num_hidden_layers=num_hidden_layers, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    if kwargs.get("layer_types", 0) is None:
        kwargs.pop("layer_types")
    cfg = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)._from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms start at 0 (Gemma) or 1: randomise so they matter in parity tests
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if family.startswith("gemma") else 1.0, 0.1)
    return model.eval()


def write_tiny_checkpoint(
    path: str | Path,
    family: str = "llama",
    *,
    template: str | None = None,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Writes a tiny checkpoint (config, safetensors, tokenizer) of `family` into `path`."""
    path = Path(path)
    tok = tiny_tokenizer(template=template or ("gemma" if family.startswith("gemma") else "llama3"))
    model = tiny_hf_model(family, vocab_size=len(tok), **overrides)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    tok.save_pretrained(path)
    return path
