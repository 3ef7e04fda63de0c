"""`model.generate`: token ids in, token ids out, with a static KV cache (`minift.arch.cache`).

One prefill forward over the (left-padded) prompts, then one single-token forward per new token
that attends to the cache. Positions follow transformers' generate (each row counts its real
tokens; padding takes position 1), so greedy decoding gives transformers' tokens. On CUDA the
decode step is compiled once (`mode="reduce-overhead"`: CUDA graphs) with the cache buffers at
static addresses and the step's position passed as a tensor, so it never recompiles per token.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import ops
from ..arch.cache import KVCache
from ..errors import InputError
from .sampling import Sampling, next_token, process


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return getattr(cfg, "text", cfg)  # a vision model's language half


def _ids(value: Any, name: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise InputError(f"generate: {name}={value!r}; expected a token id or a list of token ids")


def default_eos(model: nn.Module) -> list[int]:
    """End-of-sequence ids: generation_config.json's beside the checkpoint, else config.json's."""
    src = model.load_info.source_path
    gen = src / "generation_config.json" if src is not None else None
    if gen is not None and gen.is_file():
        try:
            ids = _ids(json.loads(gen.read_text()).get("eos_token_id"), "generation_config.json eos_token_id")
            if ids:
                return ids
        except (ValueError, InputError):
            pass
    return _ids(_text_config(model).eos_token_id, "config.json eos_token_id")


def check_prompt(model: nn.Module, input_ids: Any, attention_mask: Any, max_new_tokens: Any) -> torch.Tensor:
    """Validates the prompt batch and returns the attention mask (ones when none was given)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise InputError(f"generate: input_ids must be a (batch, length) integer tensor, got "
                         f"{type(input_ids).__name__} {getattr(input_ids, 'shape', '')}")
    b, n = input_ids.shape
    if b == 0 or n == 0:
        raise InputError(f"generate: input_ids has shape {tuple(input_ids.shape)}; need at least one prompt token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"generate: max_new_tokens={max_new_tokens!r}; expected an integer >= 1")
    limit = _text_config(model).max_position_embeddings
    if n + max_new_tokens > limit:
        raise InputError(f"generate: prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) = {n + max_new_tokens} "
                         f"exceeds the model's context of {limit} tokens (max_position_embeddings)")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise InputError(f"generate: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}")
    m = attention_mask.bool()
    if bool((m[:, 1:] < m[:, :-1]).any()):
        raise InputError("generate: attention_mask has padding after real tokens (right padding); pad prompts on "
                         "the left (tokenizer.padding_side = 'left')")
    if not bool(m[:, -1].all()):
        raise InputError("generate: a prompt row is all padding")
    return attention_mask.to(input_ids.dtype)


class _Stops:
    """Rows that ended: an eos token (checked on the device, no host sync), or a stop string in
    the row's new text (decoded on the host, so only when stop strings are asked for)."""

    def __init__(self, eos: list[int], stop_strings: Sequence[str] | None, tokenizer: Any, batch: int, device):
        self.eos = torch.tensor(eos, device=device, dtype=torch.long) if eos else None
        self.strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if self.strings and tokenizer is None:
            raise InputError("generate: stop_strings need tokenizer= to read the generated text")
        if not all(isinstance(s, str) and s for s in self.strings):
            raise InputError(f"generate: stop_strings={stop_strings!r}; expected non-empty strings")
        self.tokenizer = tokenizer
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.ended_at = torch.full((batch,), -1, dtype=torch.long, device=device)  # step of the ending token
        self._tail = max((len(s) for s in self.strings), default=0) + 16  # characters to re-decode
        self._new: list[list[int]] = [[] for _ in range(batch)]

    def update(self, step: int, tok: torch.Tensor) -> None:
        ended = torch.zeros_like(self.done)
        if self.eos is not None:
            ended = torch.isin(tok, self.eos)
        if self.strings:
            for r, t in enumerate(tok.tolist()):
                row = self._new[r]
                row.append(t)
                text = self.tokenizer.decode(row[-self._tail:], skip_special_tokens=False)
                if any(s in text for s in self.strings):
                    ended[r] = True
        ended &= ~self.done
        self.ended_at = torch.where(ended, torch.full_like(self.ended_at, step), self.ended_at)
        self.done |= ended


# Decode steps between checks whether every row has ended: a check reads a flag back from the
# device, which stalls the CUDA-graph pipeline, so it is not done every token.
CHECK_EVERY = 8


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    pixel_values: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    streamer: Any = None,
    compile: bool | None = None,
) -> torch.Tensor:
    """(batch, prompt + new) token ids: the prompts followed by what the model generates.

    Arguments as transformers' `generate`: left-padded `input_ids` / `attention_mask`;
    Gemma 3 vision's `pixel_values` / `token_type_ids` for the prompt's images; greedy unless
    `do_sample` (then `temperature`, `top_k`, `top_p`, `min_p`; `seed` makes it reproducible);
    `repetition_penalty`; a row ends at any of `eos_token_id` (default: the checkpoint's) or
    once its text holds one of `stop_strings` (needs `tokenizer`), and is then filled with
    `pad_token_id`. `streamer` gets `put(ids)` with each step's (batch,) tokens and `end()`.
    `compile`: CUDA-graph the decode step (None: on CUDA). Adapters apply as the model is set
    up (active, merged or disabled); train/eval mode is restored afterwards."""
    sampling = Sampling(do_sample, temperature, top_p, top_k, min_p, repetition_penalty)
    sampling.check()
    attention_mask = check_prompt(model, input_ids, attention_mask, max_new_tokens)
    vision = hasattr(model, "image_features")
    if (pixel_values is not None or token_type_ids is not None) and not vision:
        raise InputError(f"generate: pixel_values / token_type_ids given to a text-only {model.config.model_type} "
                         "model; images need a Gemma 3 vision checkpoint loaded without text_only=True")
    eos = _ids(eos_token_id, "eos_token_id") if eos_token_id is not None else default_eos(model)
    pad = pad_token_id if pad_token_id is not None else _text_config(model).pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    device = input_ids.device
    b, n = input_ids.shape
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else model.language_model.embed_tokens.weight.dtype
    cache = KVCache(_text_config(model), b, n + max_new_tokens, device=device, dtype=dtype)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    generator = torch.Generator(device=device).manual_seed(int(seed)) if seed is not None else None
    stops = _Stops(eos, stop_strings, tokenizer, b, device)
    use_graphs = device.type == "cuda" if compile is None else bool(compile)
    step = _compiled_step(model, cache) if use_graphs else _step

    was_training = model.training
    model.eval()
    try:
        extra = {"pixel_values": pixel_values, "token_type_ids": token_type_ids} if vision else {}
        cache.prefill(attention_mask)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                       return_logits=True, logits_to_keep=1, **extra).logits[:, -1]
        cache.advance(n)
        seen = torch.full((b, n + max_new_tokens), pad, dtype=torch.long, device=device)
        seen[:, :n] = input_ids
        pos = positions[:, -1:]
        length = n + max_new_tokens
        cache_positions = torch.arange(n, n + max_new_tokens, device=device)  # no host-to-device copy per step
        for i in range(max_new_tokens):
            tok = next_token(process(logits, seen[:, : n + i], sampling), sampling, generator)
            tok = torch.where(stops.done, torch.full_like(tok, pad), tok)
            seen[:, n + i] = tok
            if streamer is not None:
                streamer.put(tok.cpu())
            stops.update(i, tok)
            last = i == max_new_tokens - 1
            if last or ((i + 1) % CHECK_EVERY == 0 or stops.strings or streamer is not None) and bool(stops.done.all()):
                if bool(stops.done.all()):  # as transformers: stop at the step the last row ended
                    length = n + int(stops.ended_at.max()) + 1
                break
            pos = pos + 1
            logits = step(model, cache, tok[:, None], pos, cache_positions[i])
            cache.advance(1)
    finally:
        model.train(was_training)
        if streamer is not None:
            streamer.end()
    return seen[:, :length].to(input_ids.dtype)


def _step(model: nn.Module, cache: KVCache, tok: torch.Tensor, pos: torch.Tensor,
          position: torch.Tensor) -> torch.Tensor:
    """One decode forward: the (batch, vocab) logits after `tok`, at cache position `position`."""
    cache.step(position)
    return model(input_ids=tok, position_ids=pos, cache=cache, return_logits=True).logits[:, -1]


def _compiled_step(model: nn.Module, cache: KVCache) -> Callable[..., torch.Tensor]:
    """`_step` compiled for this cache: its tensors marked as static addresses (they are written in
    place every step), so CUDA graphs replay without copies; `.clone()` keeps a graph's output
    from being overwritten by the next replay."""
    for t in [*cache.keys, *cache.values, *cache.slot_pos.values(), *cache.slot_real.values()]:
        torch._dynamo.mark_static_address(t)
    ops.prepare_nf4_matmul(cache.keys[0].device)  # its counters outside the graph's memory pool
    compiled = torch.compile(_step, mode="reduce-overhead", dynamic=False, fullgraph=False)

    def run(model, cache, tok, pos, position):
        return compiled(model, cache, tok, pos, position).clone()

    return run
