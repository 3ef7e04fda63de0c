"""Looking chat templates up by name, and putting one on a tokenizer or processor."""

from __future__ import annotations

import warnings
from typing import Any, TypeVar

from minift.errors import ConfigError

from .base import ChatTemplate, jinja_literal
from .families import TEMPLATES

T = TypeVar("T")


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


_BY_NAME: dict[str, ChatTemplate] = {t.name: t for t in TEMPLATES}
_ALIASES: dict[str, str] = {alias: t.name for t in TEMPLATES for alias in t.aliases}
assert not set(_BY_NAME) & set(_ALIASES), "an alias shadows a template name"
assert all(_key(n) == n for n in [*_BY_NAME, *_ALIASES]), "names are stored as lookups spell them"

# Put before a template on a tokenizer whose eos map_eos_token changed, in templates that write
# `eos_token` as an end-of-sequence marker distinct from the end of a turn (Phi-3's): the rendered
# text keeps the token the official template writes, not the new end-of-turn eos.
_PIN_EOS = "{%- set eos_token = VALUE -%}\n"


def chat_templates() -> list[str]:
    """The names of every chat template, in registry order (aliases not included)."""
    return list(_BY_NAME)


def template(name: str) -> ChatTemplate:
    """The chat template called `name` or one of its aliases (case, `_` vs `-` ignored)."""
    if not isinstance(name, str):
        raise ConfigError(f"a chat template name must be a string, got {name!r}")
    key = _key(name)
    found = _BY_NAME.get(_ALIASES.get(key, key))
    if found is None:
        aliases = ", ".join(sorted(_ALIASES))
        raise ConfigError(
            f"unknown chat template {name!r}; known: {', '.join(_BY_NAME)} (aliases: {aliases})"
        )
    return found


def _tokenizer_of(obj: Any) -> Any:
    """The tokenizer inside a processor (its `.tokenizer`), or `obj` itself."""
    try:
        inner = getattr(obj, "tokenizer", None)
    except Exception:  # tokenizers answer unknown attributes in their own ways
        inner = None
    return obj if inner is None else inner


def _pinned_eos(chat_template: Any) -> str | None:
    """The eos-pinning line an earlier get_chat_template put on this tokenizer, if any."""
    if isinstance(chat_template, str) and chat_template.startswith(_PIN_EOS.split("VALUE")[0]):
        return chat_template.split("\n", 1)[0] + "\n"
    return None


def _in_vocab(tokenizer: Any, token: str) -> bool:
    return token in tokenizer.get_vocab()


def get_chat_template(
    tokenizer_or_processor: T,
    name: str | ChatTemplate,
    *,
    system_message: str | None = None,
    map_eos_token: bool = True,
) -> T:
    """Put the chat template `name` on a tokenizer or processor and return that same object.

    The Jinja goes to `chat_template` (for a processor: the processor's and its `.tokenizer`'s),
    so `apply_chat_template` renders the family's official format. `system_message` becomes the
    default system prompt used when a chat has none (templates with their own default, e.g.
    qwen-2.5's, keep it unless this is given).

    With `map_eos_token` the tokenizer's eos becomes the template's end-of-turn token (e.g.
    `<|eot_id|>`, `<end_of_turn>`, `<|im_end|>`), so generation and training stop at the end of an
    assistant turn, as unsloth's `map_eos_token` intends. If that token is not in the vocabulary
    (a template from another family), the eos stays as it is and a warning names the token: the
    text still renders, the end of a turn is just several tokens and not the eos (add the token
    with `tokenizer.add_special_tokens` and resize the embeddings to map it). Templates that end
    turns with the tokenizer's eos itself (mistral, zephyr, vicuna, alpaca) leave the eos as it
    is. Where the Jinja also writes `eos_token` as a separate end-of-sequence mark (phi-3's, after
    the last turn), the installed Jinja keeps writing the eos the tokenizer had before, so the
    text stays the official one.

    Nothing is changed when this raises.
    """
    tpl = name if isinstance(name, ChatTemplate) else template(name)
    if system_message is not None:
        tpl = tpl.with_system(system_message)
    tokenizer = _tokenizer_of(tokenizer_or_processor)

    jinja = tpl.jinja
    new_eos = None
    old_eos = getattr(tokenizer, "eos_token", None)
    pinned = _pinned_eos(getattr(tokenizer, "chat_template", None))
    if map_eos_token and tpl.end_of_turn is not None and old_eos != tpl.end_of_turn:
        if _in_vocab(tokenizer, tpl.end_of_turn):
            new_eos = tpl.end_of_turn
            if old_eos and "eos_token" in jinja:
                jinja = _PIN_EOS.replace("VALUE", jinja_literal(str(old_eos))) + jinja
        else:
            warnings.warn(
                f"chat template {tpl.name!r}: its end-of-turn token {tpl.end_of_turn!r} is not in the "
                f"tokenizer's vocabulary, so the eos token stays {old_eos!r} and generation will not "
                "stop at the end of a turn by itself; add the token (tokenizer.add_special_tokens, "
                "then resize the model's embeddings) to map it, or pass map_eos_token=False",
                stacklevel=2,
            )
    elif map_eos_token and pinned is not None and old_eos == tpl.end_of_turn and "eos_token" in jinja:
        jinja = pinned + jinja  # mapped by an earlier call: keep writing the eos from before it

    targets = [tokenizer_or_processor] + ([tokenizer] if tokenizer is not tokenizer_or_processor else [])
    saved = [(t, getattr(t, "chat_template", None)) for t in targets]
    try:
        for t in targets:
            t.chat_template = jinja
        if new_eos is not None:
            tokenizer.eos_token = new_eos
    except Exception:
        for t, value in saved:
            t.chat_template = value
        if new_eos is not None:
            tokenizer.eos_token = old_eos
        raise
    return tokenizer_or_processor
