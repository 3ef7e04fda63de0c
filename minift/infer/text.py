"""Text in, text out: `minift.generate` for prompts and `minift.chat` for a conversation, through
the tokenizer (or, for Gemma 3 vision, the processor) and `model.generate`."""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import InputError
from ..templates import is_processor, stop_token_ids, tokenizer_of
from .generation import default_eos, generate as generate_ids


def stop_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Where a reply ends: the model's eos ids, the tokenizer's eos and the end-of-turn tokens of
    its chat format."""
    return list(dict.fromkeys([*default_eos(model), *stop_token_ids(tokenizer)]))


class TextStreamer:
    """Decodes tokens as they come and hands each new piece of text to `write` (stdout by
    default): batch 1 only; the prompt is not repeated."""

    def __init__(self, tokenizer: Any, write: Callable[[str], Any] | None = None, *, stop: Sequence[int] = ()):
        self.tokenizer, self.stop = tokenizer, set(stop)
        self.write = write if write is not None else self._stdout
        self.ids: list[int] = []
        self.printed = 0
        self.ended = False

    @staticmethod
    def _stdout(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def put(self, tokens: torch.Tensor) -> None:
        tok = int(tokens.reshape(-1)[0])
        if self.ended or tok in self.stop:
            self.ended = True
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character not complete yet
            return
        if len(text) > self.printed:
            self.write(text[self.printed:])
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.printed:
            self.write(text[self.printed:])
        self.printed = len(text)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _decode_new(tokenizer: Any, ids: torch.Tensor, prompt_len: int, stops: list[int]) -> list[str]:
    out = []
    for row in ids[:, prompt_len:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return out


def generate(model: nn.Module, tokenizer_or_processor: Any, prompts: str | Sequence[str], *,
             images: Any = None, **gen: Any) -> str | list[str]:
    """The model's continuation of each prompt (a str for one prompt, else a list), without the
    prompt and without special tokens. Prompts are tokenised as given (add the chat template
    yourself, or use `chat`), batched with left padding. `images`: for Gemma 3 vision, one image
    or a list of images per prompt (pass the processor; each prompt holds one `<start_of_image>`
    per image). `gen`: `model.generate`'s options (max_new_tokens, do_sample, temperature, ...)."""
    one = isinstance(prompts, str)
    texts = [prompts] if one else list(prompts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InputError(f"generate: prompts must be a string or a list of strings, got {prompts!r}")
    tok = tokenizer_of(tokenizer_or_processor)
    enc = _encode(model, tokenizer_or_processor, texts, images)
    stops = stop_ids(model, tok)
    gen.setdefault("eos_token_id", stops)
    gen.setdefault("tokenizer", tok)
    ids = generate_ids(model, **enc, **gen)
    out = _decode_new(tok, ids, enc["input_ids"].shape[1], stops)
    return out[0] if one else out


def _encode(model: nn.Module, tokenizer_or_processor: Any, texts: list[str], images: Any,
            add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
    vision = hasattr(model, "image_features")
    if images is not None and not vision:
        raise InputError(f"generate: images given to a text-only {model.config.model_type} model")
    if images is not None and not is_processor(tokenizer_or_processor):
        raise InputError("generate: images need the model's processor (minift.load returns it for Gemma 3 vision), "
                         f"not a {type(tokenizer_or_processor).__name__}")
    tok = tokenizer_of(tokenizer_or_processor)
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        if images is not None:
            per = [images] if len(texts) == 1 and not isinstance(images, (list, tuple)) else list(images)
            per = [p if isinstance(p, (list, tuple)) else [p] for p in per]
            if len(per) != len(texts):
                raise InputError(f"generate: {len(texts)} prompts but {len(per)} image lists; give one per prompt")
            try:
                enc = tokenizer_or_processor(text=texts, images=per, return_tensors="pt", padding=True,
                                             add_special_tokens=add_special_tokens)
            except (ValueError, TypeError) as e:
                raise InputError(f"generate: the processor could not combine these prompts and images: {e}") from e
        else:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    finally:
        tok.padding_side = old_side
    dev = _device(model)
    keys = ("input_ids", "attention_mask", "pixel_values", "token_type_ids") if vision else ("input_ids", "attention_mask")
    out = {k: enc[k].to(dev) for k in keys if k in enc and enc[k] is not None}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(model.language_model.embed_tokens.weight.dtype)
    if images is None:
        out.pop("token_type_ids", None)
    return out


def _images_in(messages: list[dict[str, Any]]) -> list[Any]:
    found = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            found += [p.get("image") for p in content if isinstance(p, dict) and p.get("type") == "image"]
    return found


def chat(model: nn.Module, tokenizer_or_processor: Any, messages: list[dict[str, Any]], *,
         stream: bool | Callable[[str], Any] = False, **gen: Any) -> str:
    """The assistant's reply to `messages` (a conversation in the chat-template format; Gemma 3
    vision user turns may hold `{"type": "image", "image": PIL.Image}` parts), rendered with the
    tokenizer's chat template and its generation prompt, ending at eos or the template's
    end-of-turn token. `stream=True` prints the reply as it comes; a callable gets each piece."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise InputError("chat: messages must be a list of {'role': ..., 'content': ...} dicts")
    tok = tokenizer_of(tokenizer_or_processor)
    if getattr(tok, "chat_template", None) is None and not (is_processor(tokenizer_or_processor)
                                                             and tokenizer_or_processor.chat_template):
        raise InputError("chat: the tokenizer has no chat template; set one with minift.get_chat_template("
                         "tokenizer, name) or call minift.generate with a formatted prompt")
    images = _images_in(messages)
    renderer = tokenizer_or_processor if images else tok
    text = renderer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the rendered text already holds the template's bos: do not add another
    enc = _encode(model, tokenizer_or_processor, [text], images or None, add_special_tokens=False)
    stops = stop_ids(model, tok)
    gen.setdefault("eos_token_id", stops)
    gen.setdefault("tokenizer", tok)
    if stream:
        gen["streamer"] = TextStreamer(tok, stream if callable(stream) else None, stop=stops)
    ids = generate_ids(model, **enc, **gen)
    if stream is True:
        sys.stdout.write("\n")
    return _decode_new(tok, ids, enc["input_ids"].shape[1], stops)[0]
