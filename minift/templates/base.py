"""The ChatTemplate record and the small text helpers the family definitions share.

Kept apart from the family definitions (families.py) so that the record's rules (how a default
system prompt is written into the Jinja, how the tokenizer's eos fills a placeholder) live in one
place and every family is only data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minift.errors import ConfigError

# Stands for "the tokenizer's own eos token" in the texts of templates whose Jinja ends an
# assistant turn with `eos_token` (Mistral, Zephyr, Vicuna, Alpaca): which token that is depends on
# the tokenizer the template is put on, so it can only be filled in then (`ChatTemplate.resolved`).
# The spelling is unsloth's, so Modelfiles written by either look alike.
EOS_PLACEHOLDER = "{__EOS_TOKEN__}"

# Every Jinja template starts with exactly this line, its default system prompt as a Jinja literal,
# so `with_system` can swap the default without re-parsing the template.
_SYSTEM_LINE = "{%- set default_system = VALUE -%}\n"

OllamaValue = str | int | float


def jinja_literal(text: str | None) -> str:
    """`text` as a Jinja expression: `none`, or a double-quoted string on one line.

    Backslashes, quotes and line breaks are escaped (Jinja decodes them back); anything else,
    non-ASCII included, stays as it is. One line, so the default-system line stays the first."""
    if text is None:
        return "none"
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


def system_line(default_system: str | None) -> str:
    """The first line of every template: `default_system`, the prompt used when a chat has none."""
    return _SYSTEM_LINE.replace("VALUE", jinja_literal(default_system))


def _modelfile_value(value: OllamaValue) -> str:
    """A PARAMETER value as a Modelfile writes it: strings quoted (stop tokens), numbers bare."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format: its Jinja for transformers, the tokens that end a turn, the markers that
    responses-only training masks on, and its Ollama Modelfile template and parameters.

    `jinja` renders with `tokenizer.apply_chat_template` (variables: messages,
    add_generation_prompt, bos_token, eos_token, plus family extras such as `date_string` for
    Llama 3.1+ and `enable_thinking` for Qwen 3). `end_of_turn` is the single token that closes an
    assistant turn, or None where the Jinja closes it with the tokenizer's own `eos_token`.
    `stop`, `ollama_template` and `ollama_parameters` may hold `EOS_PLACEHOLDER` for such
    templates; `resolved(eos_token)` fills it in. `not_covered` says where the template departs
    from, or does less than, the official one named in `source`.
    """

    name: str
    jinja: str
    end_of_turn: str | None
    stop: tuple[str, ...]
    instruction_part: str
    response_part: str
    ollama_template: str
    ollama_parameters: tuple[tuple[str, OllamaValue], ...]
    default_system: str | None = None
    aliases: tuple[str, ...] = ()
    source: str = ""
    not_covered: str = ""

    def with_system(self, system_message: str | None) -> ChatTemplate:
        """A copy whose default system prompt (used when a chat has no system message) is
        `system_message`; None removes the default."""
        body = self.jinja.split("\n", 1)[1]
        return dataclasses.replace(
            self, default_system=system_message, jinja=system_line(system_message) + body
        )

    def resolved(self, eos_token: str) -> ChatTemplate:
        """A copy with `EOS_PLACEHOLDER` replaced by `eos_token` (and `end_of_turn` set to it
        where the template ends turns with the eos), for a concrete tokenizer."""
        if not eos_token:
            raise ConfigError(f"chat template {self.name!r}: resolving it needs a non-empty eos token")

        def fill(value: OllamaValue) -> OllamaValue:
            return value.replace(EOS_PLACEHOLDER, eos_token) if isinstance(value, str) else value

        return dataclasses.replace(
            self,
            end_of_turn=self.end_of_turn if self.end_of_turn is not None else eos_token,
            stop=tuple(fill(s) for s in self.stop),
            ollama_template=fill(self.ollama_template),
            ollama_parameters=tuple((k, fill(v)) for k, v in self.ollama_parameters),
        )

    def ollama_modelfile(self, model: str, *, eos_token: str | None = None) -> str:
        """An Ollama Modelfile for the GGUF (or model) at `model`: FROM, TEMPLATE, PARAMETER
        lines and, when the template has one, SYSTEM. `eos_token` is required for templates that
        end turns with the tokenizer's eos (those whose text holds `EOS_PLACEHOLDER`)."""
        tpl = self.resolved(eos_token) if eos_token is not None else self
        texts = [tpl.ollama_template] + [v for _, v in tpl.ollama_parameters if isinstance(v, str)]
        if any(EOS_PLACEHOLDER in t for t in texts):
            raise ConfigError(
                f"chat template {self.name!r} ends turns with the tokenizer's eos token: "
                "pass eos_token= (e.g. tokenizer.eos_token) to write its Modelfile"
            )
        if '"""' in tpl.ollama_template or (tpl.default_system and '"""' in tpl.default_system):
            raise ConfigError(f'chat template {self.name!r}: a Modelfile block cannot contain """')
        lines = [f"FROM {model}", f'TEMPLATE """{tpl.ollama_template}"""']
        for key, value in tpl.ollama_parameters:
            lines.append(f"PARAMETER {key} {_modelfile_value(value)}")
        if tpl.default_system:
            lines.append(f'SYSTEM """{tpl.default_system}"""')
        return "\n".join(lines) + "\n"
