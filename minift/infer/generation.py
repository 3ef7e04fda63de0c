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
from .sampling import Sampling, next_token, penalize_present, process


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
    the row's new text (decoded on the host, so only when stop strings are asked for). `done` and
    `ended_at` (the output column of each row's ending token, -1 while it runs) are updated in
    place: the greedy device step (`_greedy_step`) updates the same tensors inside its graph."""

    def __init__(self, eos: list[int], stop_strings: Sequence[str] | None, tokenizer: Any, batch: int, device):
        self.eos = torch.tensor(eos, device=device, dtype=torch.long)
        self.strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if self.strings and tokenizer is None:
            raise InputError("generate: stop_strings need tokenizer= to read the generated text")
        if not all(isinstance(s, str) and s for s in self.strings):
            raise InputError(f"generate: stop_strings={stop_strings!r}; expected non-empty strings")
        self.tokenizer = tokenizer
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.ended_at = torch.full((batch,), -1, dtype=torch.long, device=device)
        self._tail = max((len(s) for s in self.strings), default=0) + 16  # characters to re-decode
        self._new: list[list[int]] = [[] for _ in range(batch)]

    def update(self, col: int | torch.Tensor, tok: torch.Tensor, *, eos: bool = True) -> None:
        """Records the rows that `tok` (batch,), written at output column `col`, ends: eos (unless
        the device step checked it already) or a stop string."""
        ended = torch.isin(tok, self.eos) if eos else torch.zeros_like(self.done)
        if self.strings:
            for r, t in enumerate(tok.tolist()):
                row = self._new[r]
                row.append(t)
                text = self.tokenizer.decode(row[-self._tail:], skip_special_tokens=False)
                if any(s in text for s in self.strings):
                    ended[r] = True
        _record(self.done, self.ended_at, ended, col)


def _record(done: torch.Tensor, ended_at: torch.Tensor, ended: torch.Tensor, col: int | torch.Tensor) -> None:
    """Marks rows `ended` (not already done) as done at output column `col`, in place."""
    ended = ended & ~done
    ended_at.copy_(torch.where(ended, col, ended_at))
    done |= ended


def _greedy_step(model: nn.Module, cache: KVCache, s: dict[str, torch.Tensor]) -> None:
    """One greedy decode step with all its bookkeeping on the device: forward the last token
    `s["tok"]`, pick the next (the argmax, after the repetition penalty when `s` holds the seen
    tokens' mask `present`; `pad` for rows that ended), write it to the output `s["seen"]` and
    record rows that end on eos. Every tensor of `s` is updated in place, so under CUDA graphs a
    whole step is one graph replay: no launches, copies or syncs around it."""
    s["pos"] += 1
    logits = _step(model, cache, s["tok"], s["pos"], s["position"]).float()
    s["position"] += 1  # the new token's output column (= its cache position)
    if "present" in s:
        logits = penalize_present(logits, s["present"], s["penalty"])
    tok = torch.where(s["done"], s["pad"], logits.argmax(-1))
    s["tok"].copy_(tok[:, None])
    s["seen"].index_copy_(1, s["position"].reshape(1), tok[:, None])
    if "present" in s:
        s["present"].scatter_(1, tok[:, None], True)
    _record(s["done"], s["ended_at"], torch.isin(tok, s["eos"]), s["position"])


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
    # greedy decoding picks and records each token inside the decode step; sampling picks outside
    # it, on the host's stream
    on_device = not sampling.do_sample

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
        tok = next_token(process(logits, input_ids, sampling), sampling, generator)
        seen[:, n] = tok
        stops.update(n, tok)
        state = {"tok": tok[:, None].clone(), "pos": positions[:, -1:].clone(),
                 "position": torch.tensor(n, device=device), "seen": seen, "done": stops.done,
                 "ended_at": stops.ended_at, "eos": stops.eos, "pad": torch.tensor(pad, device=device)}
        if on_device and sampling.repetition_penalty != 1.0:  # every token seen so far, as a mask
            state["present"] = torch.zeros(logits.shape, dtype=torch.bool, device=device).scatter_(1, seen[:, :n + 1], True)
            state["penalty"] = torch.tensor(float(sampling.repetition_penalty), device=device)
        if on_device:
            step = _compiled(_greedy_step, model, cache, state) if use_graphs else _greedy_step
        else:
            step = _compiled(_step, model, cache, state) if use_graphs else _step
        for i in range(max_new_tokens):
            if i:
                if on_device:
                    step(model, cache, state)
                    tok = state["tok"][:, 0]
                    if stops.strings:
                        stops.update(n + i, tok, eos=False)
                else:
                    state["pos"] += 1
                    logits = step(model, cache, state["tok"], state["pos"], state["position"])
                    state["position"] += 1
                    tok = next_token(process(logits, seen[:, : n + i], sampling), sampling, generator)
                    tok = torch.where(stops.done, state["pad"], tok)
                    state["tok"].copy_(tok[:, None])
                    seen[:, n + i] = tok
                    stops.update(n + i, tok)
                cache.advance(1)
            if streamer is not None:
                streamer.put(tok.cpu())
            last = i == max_new_tokens - 1
            if last or ((i + 1) % CHECK_EVERY == 0 or stops.strings or streamer is not None) and bool(stops.done.all()):
                length = n + i + 1
                if bool(stops.done.all()):  # as transformers: stop at the step the last row ended
                    length = int(stops.ended_at.max()) + 1
                break
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


def _compiled(fn: Callable[..., Any], model: nn.Module, cache: KVCache,
              state: dict[str, torch.Tensor]) -> Callable[..., Any]:
    """`fn` compiled for this cache and decode state: their tensors marked as static addresses
    (they are written in place every step), so CUDA graphs replay without copies; `.clone()` keeps
    a graph's output (the logits, when `fn` returns them) from being overwritten by the next replay."""
    for t in [*cache.keys, *cache.values, *cache.slot_pos.values(), *cache.slot_real.values(), *state.values()]:
        torch._dynamo.mark_static_address(t)
    ops.prepare_tickets(cache.keys[0].device)  # split kernels' counters, outside the graph's memory pool
    compiled = torch.compile(fn, mode="reduce-overhead", dynamic=False, fullgraph=False)

    def run(*args):
        out = compiled(*args)
        return out.clone() if isinstance(out, torch.Tensor) else out

    return run
