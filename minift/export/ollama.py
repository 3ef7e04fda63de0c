"""`ollama_modelfile`: the Ollama Modelfile of an exported GGUF (FROM, the chat TEMPLATE in Go
syntax, PARAMETER stop ... and sampling defaults), from a chat template of `minift.templates`.

The template is named, or found from a tokenizer: the registered template whose Jinja renders the
same text as the tokenizer's own chat template on a few probe chats (plain turns, a multi-turn
chat, a system prompt). Nothing here writes templates of its own; `minift.templates` holds them.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ExportError
from ..templates import ChatTemplate, chat_templates, template, tokenizer_of

# Chats the tokenizer's template and a candidate must render identically.
_PROBES: tuple[tuple[list[dict[str, str]], bool], ...] = (
    ([{"role": "user", "content": "Hello there."}], True),
    ([{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
      {"role": "user", "content": "And 3 + 3?"}], True),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
      {"role": "assistant", "content": "Hello."}], False),
)


def _render(tok: Any, messages: list[dict[str, str]], gen: bool, jinja: str | None) -> str | None:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, chat_template=jinja)
    except Exception:  # noqa: BLE001 - a template that cannot render a probe (e.g. no system role)
        return None


def match_template(tokenizer: Any, *, prefer: tuple[str, ...] = ()) -> ChatTemplate:
    """The registered chat template rendering what `tokenizer`'s own chat template renders;
    ExportError when none does (name one then). Where several render alike (gemma and gemma-3
    do on plain chats), the one whose Jinja the tokenizer carries wins (a name in `prefer`, the
    model's family, first among equal Jinja), then one in `prefer`, then registry order."""
    tok = tokenizer_of(tokenizer)
    own = getattr(tok, "chat_template", None)
    if not own:
        raise ExportError("ollama_modelfile: the tokenizer has no chat template to match; pass a template name "
                          f"({', '.join(chat_templates())})")
    if isinstance(own, dict):
        own = own.get("default") or next(iter(own.values()))
    wanted = [_render(tok, msgs, gen, own) for msgs, gen in _PROBES]
    if all(w is None for w in wanted):
        raise ExportError("ollama_modelfile: the tokenizer's chat template renders none of the probe chats; "
                          f"pass a template name ({', '.join(chat_templates())})")
    found = [template(n) for n in chat_templates()
             if all(_render(tok, msgs, gen, template(n).jinja) == w for (msgs, gen), w in zip(_PROBES, wanted))]
    if not found:
        raise ExportError("ollama_modelfile: no registered chat template renders like the tokenizer's; pass a "
                          f"template name ({', '.join(chat_templates())})")
    exact = [t for t in found if own.endswith(t.jinja)]  # get_chat_template may prepend an eos line
    preferred = [t for t in found if t.name in prefer]
    return ([t for t in exact if t in preferred] or exact or preferred or found)[0]


def ollama_modelfile(template_name_or_tokenizer: str | ChatTemplate | Any, gguf_path: str | os.PathLike, *,
                     tokenizer: Any = None, mmproj: str | os.PathLike | None = None,
                     prefer: tuple[str, ...] = ()) -> str:
    """The text of an Ollama Modelfile for the GGUF at `gguf_path` (written after FROM as given:
    Ollama resolves a relative path from the Modelfile's directory).

    template_name_or_tokenizer: a `minift.templates` name (`chat_templates()` lists them), a
        ChatTemplate, or a tokenizer / processor whose chat template is matched to one.
    tokenizer: with a name, the tokenizer whose eos token fills templates that end turns with it
        (mistral, zephyr, vicuna, alpaca); a tokenizer given first serves for that itself.
    mmproj: a vision projector GGUF written beside it; Ollama does not load a separate Gemma 3
        projector, so it is only named in a comment (llama.cpp: `--mmproj`).
    prefer: template names to choose when several render like the tokenizer's (see
        `match_template`).
    """
    src = template_name_or_tokenizer
    if isinstance(src, ChatTemplate):
        tpl = src
    elif isinstance(src, str):
        tpl = template(src)
    else:
        tpl = match_template(src, prefer=prefer)
        tokenizer = tokenizer if tokenizer is not None else src
    eos = getattr(tokenizer_of(tokenizer), "eos_token", None) if tokenizer is not None else None
    text = tpl.ollama_modelfile(str(gguf_path), eos_token=str(eos) if eos else None)
    if mmproj is not None:
        text = (f"# vision projector: {mmproj} (llama.cpp: --mmproj; Ollama does not load a separate "
                "Gemma 3 projector, so this model is text-only there)\n") + text
    return text
