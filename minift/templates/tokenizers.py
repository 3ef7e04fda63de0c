"""Telling a processor from a tokenizer, and the end-of-turn tokens a tokenizer's chat format
uses: shared by generation (where to stop), export (what a merged checkpoint's
generation_config.json lists as eos) and training."""

from __future__ import annotations

from typing import Any

from .registry import chat_templates, template


def is_processor(obj: Any) -> bool:
    """A multimodal processor (an image processor and a tokenizer), not a bare tokenizer."""
    return hasattr(obj, "image_processor") and hasattr(obj, "tokenizer")


def tokenizer_of(obj: Any) -> Any:
    """The tokenizer of a processor, or the tokenizer itself."""
    return obj.tokenizer if is_processor(obj) else obj


def end_of_turn_tokens() -> list[str]:
    """Every registered template's end-of-turn token (`<|eot_id|>`, `<end_of_turn>`, ...)."""
    found = (template(n).end_of_turn for n in chat_templates())
    return list(dict.fromkeys(t for t in found if t))


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's eos and the end-of-turn tokens its chat template writes (or, without a
    template, those it has in its vocabulary)."""
    tok = tokenizer_of(tokenizer)
    ids = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
    jinja = tok.chat_template if isinstance(tok.chat_template, str) else " ".join((tok.chat_template or {}).values())
    vocab = tok.get_vocab()
    for t in end_of_turn_tokens():
        if t in vocab and (not jinja or t in jinja):
            ids.append(vocab[t])
    return list(dict.fromkeys(ids))
