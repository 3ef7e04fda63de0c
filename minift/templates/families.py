"""The chat formats, one ChatTemplate per family, written as data.

Each Jinja template is minift's own: for plain chats (system / user / assistant messages with
string content, and Gemma's image+text parts) it renders exactly what the family's official
template renders, which tests/test_chat_templates.py checks against the official Jinja. Every tag
is whitespace-trimmed ({%- -%}, {{- -}}) and all output comes from string expressions, so the
templates render the same under transformers' environment (trim_blocks, lstrip_blocks) and a plain
jinja2 one. Tool calling is not covered: a chat with `tools`, tool messages or tool calls raises a
template error instead of being rendered in a format the model was not trained on.

The Ollama templates are Go templates over `.Messages`, also minift's own, shaped like the
official Ollama library templates of the same families.
"""

from __future__ import annotations

from .base import EOS_PLACEHOLDER, ChatTemplate, OllamaValue, system_line

# ---------------------------------------------------------------------------------------------
# Shared Jinja fragments

# `system` (the chat's first system message, else the template's default, else none) and
# `loop_messages` (the rest): for formats that place the system prompt somewhere special.
_SPLIT_SYSTEM = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system = default_system -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
"""

# For formats that render a system message as an ordinary turn: the default joins the messages.
_ADD_DEFAULT_SYSTEM = r"""
{%- if default_system is not none and not (messages and messages[0]['role'] == 'system') -%}
    {%- set messages = [{'role': 'system', 'content': default_system}] + messages -%}
{%- endif -%}
"""


def _no_tools(name: str) -> str:
    """Refuses tool definitions: their formats are not covered, so render nothing wrong."""
    return (
        "{%- if tools or custom_tools is defined or builtin_tools is defined -%}"
        f"{{{{- raise_exception(\"minift's {name} chat template does not render tools; "
        "use the model's own chat template for tool calling\") -}}"
        "{%- endif -%}\n"
    )


def _no_tool_messages(name: str) -> str:
    """Inside a message loop: refuses tool results and tool calls, for the same reason."""
    return (
        "{%- if message['role'] in ['tool', 'ipython', 'tool_results', 'function'] "
        "or 'tool_calls' in message -%}"
        f"{{{{- raise_exception(\"minift's {name} chat template does not render tool messages or "
        "tool calls; use the model's own chat template for tool calling\") -}}"
        "{%- endif -%}\n"
    )


def _alternate(counter: str) -> str:
    """Raises unless user and assistant turns alternate, starting with the user (as Gemma's and
    Mistral's official templates do). `counter` is the 0-based index expression."""
    return (
        f"{{%- if (message['role'] == 'user') != ({counter} % 2 == 0) -%}}"
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
        "{%- endif -%}\n"
    )


def _roles_only(name: str, roles: str) -> str:
    return (
        f"{{{{- raise_exception(\"minift's {name} chat template supports only {roles} messages\") -}}}}\n"
    )


# ---------------------------------------------------------------------------------------------
# Llama 3

_LLAMA3 = (
    _ADD_DEFAULT_SYSTEM
    + _no_tools("llama-3")
    + r"""
{%- for message in messages -%}
"""
    + _no_tool_messages("llama-3")
    + r"""
    {%- if loop.first -%}{{- bos_token or '' -}}{%- endif -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'
        + (message['content'] | trim) + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""
)

_LLAMA31_DATE = r"""
{%- if date_string is not defined -%}
    {%- set date_string = '26 Jul 2024' -%}
{%- endif -%}
"""

_LLAMA32_DATE = r"""
{%- if date_string is not defined -%}
    {%- if strftime_now is defined -%}
        {%- set date_string = strftime_now('%d %b %Y') -%}
    {%- else -%}
        {%- set date_string = '26 Jul 2024' -%}
    {%- endif -%}
{%- endif -%}
"""


def _llama31(name: str, date_block: str) -> str:
    """Llama 3.1+: a system header always, with the knowledge cutoff and a date line."""
    return (
        _SPLIT_SYSTEM
        + _no_tools(name)
        + date_block
        + r"""
{{- bos_token or '' -}}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' -}}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date_string + '\n\n' -}}
{%- if system is not none -%}{{- system | trim -}}{%- endif -%}
{{- '<|eot_id|>' -}}
{%- for message in loop_messages -%}
"""
        + _no_tool_messages(name)
        + r"""
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'
        + (message['content'] | trim) + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""
    )


_OLLAMA_LLAMA3 = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if or (not $last) (ne .Role "assistant") }}<|eot_id|>{{ end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

_OLLAMA_LLAMA31 = """\
<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024

{{ if .System }}{{ .System }}{{ end }}<|eot_id|>
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if or (not $last) (ne .Role "assistant") }}<|eot_id|>{{ end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}
{{- end }}"""

# Meta's generation_config.json for the Llama 3.x Instruct models samples at 0.6 / top-p 0.9.
_LLAMA_SAMPLING: tuple[tuple[str, OllamaValue], ...] = (("temperature", 0.6), ("top_p", 0.9))
# Families that publish no sampling defaults get these.
_PLAIN_SAMPLING: tuple[tuple[str, OllamaValue], ...] = (("temperature", 0.7), ("top_p", 0.9))


def _stops(*tokens: str) -> tuple[tuple[str, OllamaValue], ...]:
    return tuple(("stop", t) for t in tokens)


# ---------------------------------------------------------------------------------------------
# Gemma (1, 2 and 3 share one format; 3 also takes image parts, which minift accepts for all)

_GEMMA = (
    "{{- bos_token or '' -}}\n"
    + _SPLIT_SYSTEM
    + _no_tools("gemma")
    + r"""
{%- if system is none -%}
    {%- set prefix = '' -%}
{%- elif system is string -%}
    {%- set prefix = system + '\n\n' -%}
{%- else -%}
    {%- set prefix = system[0]['text'] + '\n\n' -%}
{%- endif -%}
{%- for message in loop_messages -%}
"""
    + _no_tool_messages("gemma")
    + _alternate("loop.index0")
    + r"""
    {{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' -}}
    {%- if loop.first -%}{{- prefix -}}{%- endif -%}
    {%- if message['content'] is string -%}
        {{- message['content'] | trim -}}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'image' -%}
                {{- '<start_of_image>' -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] | trim -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""
)

# System messages are folded into the first user turn, as the Jinja does.
_OLLAMA_GEMMA = """\
{{- $first := true }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- $first = false }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""

# ---------------------------------------------------------------------------------------------
# Mistral Instruct v0.3

_MISTRAL = (
    _SPLIT_SYSTEM
    + _no_tools("mistral")
    + r"""
{%- set ns = namespace(index=0) -%}
{%- for message in loop_messages -%}
"""
    + _no_tool_messages("mistral")
    + _alternate("ns.index")
    + r"""
    {%- set ns.index = ns.index + 1 -%}
{%- endfor -%}
{{- bos_token or '' -}}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'user' -%}
        {%- if loop.last and system is not none -%}
            {{- '[INST] ' + system + '\n\n' + message['content'] + '[/INST]' -}}
        {%- else -%}
            {{- '[INST] ' + message['content'] + '[/INST]' -}}
        {%- endif -%}
    {%- elif message['role'] == 'assistant' -%}
        {{- ' ' + (message['content'] | trim) + (eos_token or '') -}}
    {%- else -%}
        """
    + _roles_only("mistral", "user and assistant (after an optional system)")
    + r"""
    {%- endif -%}
{%- endfor -%}
"""
)

_OLLAMA_MISTRAL = f"""\
{{{{- range $i, $_ := .Messages }}}}
{{{{- $last := eq (len (slice $.Messages $i)) 1 }}}}
{{{{- if eq .Role "user" }}}}[INST] {{{{ if and $last $.System }}}}{{{{ $.System }}}}

{{{{ end }}}}{{{{ .Content }}}}[/INST]
{{{{- else if eq .Role "assistant" }}}} {{{{ .Content }}}}{{{{ if not $last }}}}{EOS_PLACEHOLDER}{{{{ end }}}}
{{{{- end }}}}
{{{{- end }}}}"""

# ---------------------------------------------------------------------------------------------
# ChatML family: plain ChatML, Qwen 2.5, Qwen 3

_CHATML = (
    _ADD_DEFAULT_SYSTEM
    + _no_tools("chatml")
    + r"""
{%- for message in messages -%}
"""
    + _no_tool_messages("chatml")
    + r"""
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""
)

_QWEN25 = (
    _SPLIT_SYSTEM
    + _no_tools("qwen-2.5")
    + r"""
{%- if system is not none -%}
    {{- '<|im_start|>system\n' + system + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
"""
    + _no_tool_messages("qwen-2.5")
    + r"""
    {%- if message['role'] in ['system', 'user', 'assistant'] -%}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""
)

# Qwen 3: earlier assistant turns drop their reasoning; turns after the last user query keep it
# in <think> (the final one always gets a, possibly empty, think block); enable_thinking=False
# pre-fills an empty think block after the generation prompt.
_QWEN3 = (
    _ADD_DEFAULT_SYSTEM
    + _no_tools("qwen-3")
    + r"""
{%- if messages and messages[0]['role'] == 'system' -%}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' -}}
{%- endif -%}
{%- set ns = namespace(searching=true, last_query=(messages | length) - 1) -%}
{%- for message in messages[::-1] -%}
    {%- if ns.searching and message['role'] == 'user' and message['content'] is string
        and not (message['content'].startswith('<tool_response>')
                 and message['content'].endswith('</tool_response>')) -%}
        {%- set ns.searching = false -%}
        {%- set ns.last_query = (messages | length) - 1 - loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
"""
    + _no_tool_messages("qwen-3")
    + r"""
    {%- set content = message['content'] if message['content'] is string else '' -%}
    {%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) -%}
        {{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {%- set reasoning = '' -%}
        {%- if message['reasoning_content'] is string -%}
            {%- set reasoning = message['reasoning_content'] -%}
        {%- elif '</think>' in content -%}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
            {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
        {%- endif -%}
        {%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
        {%- else -%}
            {{- '<|im_start|>assistant\n' + content -}}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\n\n</think>\n\n' -}}
    {%- endif -%}
{%- endif -%}
"""
)

_OLLAMA_CHATML = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (not $last) (ne .Role "assistant") }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

_OLLAMA_QWEN3 = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (not $last) (ne .Role "assistant") }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ if and $.IsThinkSet (not $.Think) }}<think>

</think>

{{ end }}
{{- end }}
{{- end }}"""

# ---------------------------------------------------------------------------------------------
# Phi 3 / 3.5 / 4


def _phi3(name: str, system_test: str) -> str:
    return (
        _ADD_DEFAULT_SYSTEM
        + _no_tools(name)
        + r"""
{%- for message in messages -%}
"""
        + _no_tool_messages(name)
        + "    {%- if " + system_test + " -%}"
        + r"""
        {{- '<|system|>\n' + message['content'] + '<|end|>\n' -}}
    {%- elif message['role'] == 'user' -%}
        {{- '<|user|>\n' + message['content'] + '<|end|>\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<|assistant|>\n' + message['content'] + '<|end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\n' -}}
{%- else -%}
    {{- eos_token or '' -}}
{%- endif -%}
"""
    )


_OLLAMA_PHI3 = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "system") (eq .Role "user") (eq .Role "assistant") }}<|{{ .Role }}|>
{{ .Content }}{{ if or (not $last) (ne .Role "assistant") }}<|end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|assistant|>
{{ end }}
{{- end }}"""

_PHI4 = (
    _ADD_DEFAULT_SYSTEM
    + _no_tools("phi-4")
    + r"""
{%- for message in messages -%}
"""
    + _no_tool_messages("phi-4")
    + r"""
    {%- if message['role'] in ['system', 'user', 'assistant'] -%}
        {{- '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant<|im_sep|>' -}}
{%- endif -%}
"""
)

_OLLAMA_PHI4 = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "system") (eq .Role "user") (eq .Role "assistant") }}<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}
{{- if or (not $last) (ne .Role "assistant") }}<|im_end|>{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant<|im_sep|>{{ end }}
{{- end }}"""

# ---------------------------------------------------------------------------------------------
# Zephyr, Vicuna, Alpaca: turns end with the tokenizer's eos

_ZEPHYR = (
    _ADD_DEFAULT_SYSTEM
    + _no_tools("zephyr")
    + r"""
{%- for message in messages -%}
"""
    + _no_tool_messages("zephyr")
    + r"""
    {%- if message['role'] in ['system', 'user', 'assistant'] -%}
        {{- '<|' + message['role'] + '|>\n' + message['content'] + (eos_token or '') + '\n' -}}
    {%- endif -%}
    {%- if loop.last and add_generation_prompt -%}
        {{- '<|assistant|>\n' -}}
    {%- endif -%}
{%- endfor -%}
"""
)

_OLLAMA_ZEPHYR = f"""\
{{{{- range $i, $_ := .Messages }}}}
{{{{- $last := eq (len (slice $.Messages $i)) 1 }}}}<|{{{{ .Role }}}}|>
{{{{ .Content }}}}{{{{ if or (not $last) (ne .Role "assistant") }}}}{EOS_PLACEHOLDER}
{{{{ end }}}}
{{{{- if and $last (ne .Role "assistant") }}}}<|assistant|>
{{{{ end }}}}
{{{{- end }}}}"""

_VICUNA = (
    _SPLIT_SYSTEM
    + _no_tools("vicuna")
    + r"""
{{- (bos_token or '') + (system if system is not none else '') + ' ' -}}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'user' -%}
        {{- 'USER: ' + message['content'] + ' ' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- 'ASSISTANT: ' + message['content'] + (eos_token or '') -}}
    {%- else -%}
        """
    + _roles_only("vicuna", "user and assistant (after an optional system)")
    + r"""
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""
)

_OLLAMA_VICUNA = f"""\
{{{{- if $.System }}}}{{{{ $.System }}}} {{{{ end }}}}
{{{{- range $i, $_ := .Messages }}}}
{{{{- $last := eq (len (slice $.Messages $i)) 1 }}}}
{{{{- if eq .Role "user" }}}}USER: {{{{ .Content }}}} {{{{ if $last }}}}ASSISTANT:{{{{ end }}}}
{{{{- else if eq .Role "assistant" }}}}ASSISTANT: {{{{ .Content }}}}{{{{ if not $last }}}}{EOS_PLACEHOLDER}{{{{ end }}}}
{{{{- end }}}}
{{{{- end }}}}"""

_ALPACA = (
    _SPLIT_SYSTEM
    + _no_tools("alpaca")
    + r"""
{{- bos_token or '' -}}
{%- if system is not none -%}
    {{- system + '\n\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '### Instruction:\n' + message['content'] + '\n\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '### Response:\n' + message['content'] + (eos_token or '') + '\n\n' -}}
    {%- else -%}
        """
    + _roles_only("alpaca", "user and assistant (after an optional system)")
    + r"""
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '### Response:\n' -}}
{%- endif -%}
"""
)

_OLLAMA_ALPACA = f"""\
{{{{- if $.System }}}}{{{{ $.System }}}}

{{{{ end }}}}
{{{{- range $i, $_ := .Messages }}}}
{{{{- $last := eq (len (slice $.Messages $i)) 1 }}}}
{{{{- if eq .Role "user" }}}}### Instruction:
{{{{ .Content }}}}

{{{{ if $last }}}}### Response:
{{{{ end }}}}
{{{{- else if eq .Role "assistant" }}}}### Response:
{{{{ .Content }}}}{{{{ if not $last }}}}{EOS_PLACEHOLDER}

{{{{ end }}}}
{{{{- end }}}}
{{{{- end }}}}"""

# ---------------------------------------------------------------------------------------------
# The registry's content

_QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_ALPACA_SYSTEM = (
    "Below are some instructions that describe some tasks. "
    "Write responses that appropriately complete each request."
)

_TOOLS = "tool calling (tools, tool messages, tool calls: a template error)"


def _make(name: str, body: str, default_system: str | None = None, **fields) -> ChatTemplate:
    return ChatTemplate(name=name, jinja=system_line(default_system) + body.lstrip("\n"),
                        default_system=default_system, **fields)


def _llama(name: str, body: str, aliases: tuple[str, ...], source: str, not_covered: str,
           ollama: str, stop: tuple[str, ...]) -> ChatTemplate:
    return _make(
        name, body, end_of_turn="<|eot_id|>", stop=stop,
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
        ollama_template=ollama, ollama_parameters=_stops(*stop) + _LLAMA_SAMPLING,
        aliases=aliases, source=source, not_covered=not_covered,
    )


def _gemma(name: str, aliases: tuple[str, ...], source: str, not_covered: str,
           sampling: tuple[tuple[str, OllamaValue], ...]) -> ChatTemplate:
    stop = ("<end_of_turn>", "<eos>")
    return _make(
        name, _GEMMA, end_of_turn="<end_of_turn>", stop=stop,
        instruction_part="<start_of_turn>user\n", response_part="<start_of_turn>model\n",
        ollama_template=_OLLAMA_GEMMA, ollama_parameters=_stops(*stop) + sampling,
        aliases=aliases, source=source, not_covered=not_covered,
    )


def _phi3_template(name: str, system_test: str, aliases: tuple[str, ...], source: str,
                   not_covered: str) -> ChatTemplate:
    stop = ("<|end|>", "<|endoftext|>")
    return _make(
        name, _phi3(name, system_test), end_of_turn="<|end|>", stop=stop,
        instruction_part="<|user|>\n", response_part="<|assistant|>\n",
        ollama_template=_OLLAMA_PHI3, ollama_parameters=_stops(*stop) + _PLAIN_SAMPLING,
        aliases=aliases, source=source, not_covered=not_covered,
    )


TEMPLATES: tuple[ChatTemplate, ...] = (
    _llama(
        "llama-3", _LLAMA3, ("llama3", "llama-3.0", "llama3.0"),
        "meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json",
        f"{_TOOLS}; a default system prompt, when given, becomes the first system turn",
        _OLLAMA_LLAMA3, ("<|eot_id|>", "<|end_of_text|>"),
    ),
    _llama(
        "llama-3.1", _llama31("llama-3.1", _LLAMA31_DATE),
        ("llama3.1", "llama-31", "llama31", "llama-3.3", "llama3.3", "llama-33", "llama33"),
        "meta-llama/Llama-3.1-8B-Instruct (and Llama-3.3-70B-Instruct) tokenizer_config.json",
        f"{_TOOLS}, builtin_tools / custom_tools and the 'Environment: ipython' header included; "
        "the date line is 'Today Date: 26 Jul 2024' unless date_string= is passed, as officially",
        _OLLAMA_LLAMA31, ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
    ),
    _llama(
        "llama-3.2", _llama31("llama-3.2", _LLAMA32_DATE), ("llama3.2", "llama-32", "llama32"),
        "meta-llama/Llama-3.2-1B-Instruct tokenizer_config.json",
        f"{_TOOLS}; the date line is today's date (strftime_now) unless date_string= is passed, "
        "as officially; the Ollama template writes the fixed date 26 Jul 2024; images (Llama 3.2 "
        "Vision) are not covered",
        _OLLAMA_LLAMA31, ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
    ),
    _gemma(
        "gemma", ("gemma-1", "gemma1", "gemma-it"), "google/gemma-7b-it tokenizer_config.json",
        f"{_TOOLS}; a system message (which the official template rejects) is folded into the "
        "first user turn as Gemma 3 does; content given as parts renders as Gemma 3's",
        _PLAIN_SAMPLING,
    ),
    _gemma(
        "gemma2", ("gemma-2", "gemma2-it"), "google/gemma-2-9b-it tokenizer_config.json",
        f"{_TOOLS}; a system message (which the official template rejects) is folded into the "
        "first user turn as Gemma 3 does; content given as parts renders as Gemma 3's",
        _PLAIN_SAMPLING,
    ),
    _gemma(
        "gemma-3", ("gemma3",), "google/gemma-3-4b-it chat_template.json",
        f"{_TOOLS}; part types other than image and text are skipped, as officially",
        # As unsloth's chat_templates.py wrote Gemma 3's Modelfile (2025). Google's model card,
        # and unsloth's later Ollama mappers, sample at temperature 1.0 with the same top-k/top-p.
        (("temperature", 0.1), ("min_p", 0.0), ("top_k", 64), ("top_p", 0.95)),
    ),
    _make(
        "mistral", _MISTRAL, end_of_turn=None, stop=(EOS_PLACEHOLDER, "[INST]"),
        instruction_part="[INST]", response_part="[/INST]",
        ollama_template=_OLLAMA_MISTRAL,
        ollama_parameters=_stops(EOS_PLACEHOLDER, "[INST]", "[/INST]") + _PLAIN_SAMPLING,
        aliases=("mistral-v0.3", "mistral-v03", "mistral-instruct"),
        source="mistralai/Mistral-7B-Instruct-v0.3 tokenizer_config.json",
        not_covered=f"{_TOOLS}; as officially, the system prompt is written only into the last "
        "user turn when the chat ends with it (a chat ending in an assistant turn drops it), and "
        "there is no generation prompt ([/INST] is the prompt); turns end with the tokenizer's eos",
    ),
    _make(
        "chatml", _CHATML, end_of_turn="<|im_end|>", stop=("<|im_end|>", "<|im_start|>"),
        instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant\n",
        ollama_template=_OLLAMA_CHATML,
        ollama_parameters=_stops("<|im_end|>", "<|im_start|>") + _PLAIN_SAMPLING,
        source="ChatML as unsloth's 'chatml' template writes it",
        not_covered=f"{_TOOLS}; roles other than user/assistant keep their own name (unsloth's "
        "writes them as system); no bos token, as in unsloth's",
    ),
    _make(
        "qwen-2.5", _QWEN25, _QWEN25_SYSTEM, end_of_turn="<|im_end|>",
        stop=("<|im_end|>", "<|endoftext|>"),
        instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant\n",
        ollama_template=_OLLAMA_CHATML,
        ollama_parameters=_stops("<|im_end|>", "<|endoftext|>")
        + (("temperature", 0.7), ("top_p", 0.8), ("top_k", 20), ("repeat_penalty", 1.05)),
        aliases=("qwen2.5", "qwen-25", "qwen25"),
        source="Qwen/Qwen2.5-7B-Instruct tokenizer_config.json",
        not_covered=f"{_TOOLS}",
    ),
    _make(
        "qwen-3", _QWEN3, end_of_turn="<|im_end|>", stop=("<|im_end|>", "<|endoftext|>"),
        instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant\n",
        ollama_template=_OLLAMA_QWEN3,
        ollama_parameters=_stops("<|im_end|>", "<|endoftext|>")
        + (("temperature", 0.6), ("min_p", 0.0), ("top_k", 20), ("top_p", 0.95)),
        aliases=("qwen3",),
        source="Qwen/Qwen3-8B tokenizer_config.json",
        not_covered=f"{_TOOLS}; thinking (reasoning_content, <think> in content, "
        "enable_thinking) is covered; the Ollama template drops earlier turns' thinking and "
        "does not render .Thinking",
    ),
    _phi3_template(
        "phi-3", "message['role'] == 'system'", ("phi3", "phi-3-mini"),
        "microsoft/Phi-3-mini-4k-instruct tokenizer_config.json",
        f"{_TOOLS}; without a generation prompt the chat ends with the tokenizer's eos as "
        "officially (with map_eos_token the eos it had before, see get_chat_template)",
    ),
    _phi3_template(
        "phi-3.5", "message['role'] == 'system' and message['content']", ("phi3.5", "phi-35", "phi35"),
        "microsoft/Phi-3.5-mini-instruct tokenizer_config.json",
        f"{_TOOLS}; as phi-3, but an empty system message is skipped, as officially",
    ),
    _make(
        "phi-4", _PHI4, end_of_turn="<|im_end|>", stop=("<|im_end|>", "<|endoftext|>"),
        instruction_part="<|im_start|>user<|im_sep|>", response_part="<|im_start|>assistant<|im_sep|>",
        ollama_template=_OLLAMA_PHI4,
        ollama_parameters=_stops("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|im_sep|>") + _PLAIN_SAMPLING,
        aliases=("phi4",), source="microsoft/phi-4 tokenizer_config.json",
        not_covered=f"{_TOOLS}; roles other than system/user/assistant are skipped, as officially",
    ),
    _make(
        "zephyr", _ZEPHYR, end_of_turn=None, stop=(EOS_PLACEHOLDER,),
        instruction_part="<|user|>\n", response_part="<|assistant|>\n",
        ollama_template=_OLLAMA_ZEPHYR,
        ollama_parameters=_stops(EOS_PLACEHOLDER) + (("temperature", 0.7), ("top_k", 50), ("top_p", 0.95)),
        source="HuggingFaceH4/zephyr-7b-beta tokenizer_config.json",
        not_covered=f"{_TOOLS}; turns end with the tokenizer's eos (</s> on Zephyr's own)",
    ),
    _make(
        "vicuna", _VICUNA, _VICUNA_SYSTEM, end_of_turn=None, stop=(EOS_PLACEHOLDER,),
        instruction_part="USER:", response_part="ASSISTANT:",
        ollama_template=_OLLAMA_VICUNA, ollama_parameters=_stops(EOS_PLACEHOLDER) + _PLAIN_SAMPLING,
        aliases=("vicuna-1.1", "vicuna-v1.1", "vicuna-v1.5"),
        source="lmsys/vicuna-7b-v1.5: FastChat's vicuna_v1.1 conversation (no chat template ships)",
        not_covered=f"{_TOOLS}; only user/assistant turns after an optional system; turns end "
        "with the tokenizer's eos (</s> on Vicuna's own, as FastChat's sep2); a leading bos",
    ),
    _make(
        "alpaca", _ALPACA, _ALPACA_SYSTEM, end_of_turn=None, stop=(EOS_PLACEHOLDER,),
        instruction_part="### Instruction:\n", response_part="### Response:\n",
        ollama_template=_OLLAMA_ALPACA, ollama_parameters=_stops(EOS_PLACEHOLDER) + _PLAIN_SAMPLING,
        source="Alpaca, multi-turn, as unsloth's 'alpaca' template writes it",
        not_covered=f"{_TOOLS}; only user/assistant turns after an optional system; turns end "
        "with the tokenizer's eos",
    ),
)
