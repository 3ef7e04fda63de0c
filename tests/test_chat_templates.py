"""minift.templates against the official chat templates.

Each family's OFFICIAL Jinja (as its tokenizer_config.json / chat_template.json ships it; the
source is noted above each) is put on a tiny offline tokenizer, a table of plain conversations is
rendered with it, and `get_chat_template(copy, name)` must render exactly the same text. Then the
registry (names, aliases, errors), map_eos_token, system_message, processors, the
responses-only markers and the Ollama texts.
"""

from __future__ import annotations

import copy
import re
import warnings

import jinja2
import pytest

from minift.errors import ConfigError
from minift.templates import EOS_PLACEHOLDER, ChatTemplate, chat_templates, get_chat_template, template
from minift.testing import tiny_tokenizer

# ---------------------------------------------------------------------------------------------
# Official templates (verbatim Jinja; quoted from the model repositories' tokenizer configs)

# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json "chat_template" (as vendored in
# openvinotoolkit/openvino.genai tests/python_tests/tokenizer_configs.py).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    "<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-3.1-8B-Instruct, tokenizer_config.json "chat_template" (Llama-3.3-70B-Instruct
# ships the same one).
LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# meta-llama/Llama-3.2-1B-Instruct, tokenizer_config.json "chat_template": Llama 3.1's, with
# today's date through strftime_now and no builtin tools (the public copies searched carry local
# edits, {% generation %} markers or a dropped bos; this is the text with those undone).
LLAMA32 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# google/gemma-2-9b-it, tokenizer_config.json "chat_template"; google/gemma-7b-it's renders the
# same format (role 'model', trimmed turns, no system role).
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/"
    "user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' "
    "%}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)

# google/gemma-3-4b-it, chat_template.json (the same in its tokenizer_config.json).
GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# mistralai/Mistral-7B-Instruct-v0.3, tokenizer_config.json "chat_template" (as vendored in
# huggingface/optimum-intel optimum/exporters/openvino/utils.py).
MISTRAL = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# ChatML as unsloth's get_chat_template(tokenizer, "chatml") writes it (unsloth/chat_templates.py).
CHATML = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{'<|im_start|>user\n' + "
    "message['content'] + '<|im_end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|im_start|>"
    "assistant\n' + message['content'] + '<|im_end|>\n' }}{% else %}{{ '<|im_start|>system\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen/Qwen2.5-7B-Instruct, tokenizer_config.json "chat_template".
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen/Qwen3-8B, tokenizer_config.json "chat_template" (as vendored in huggingface/optimum-intel
# optimum/exporters/openvino/utils.py).
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# microsoft/Phi-3-mini-4k-instruct, tokenizer_config.json "chat_template".
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' "
    "+ message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# microsoft/Phi-3.5-mini-instruct, tokenizer_config.json "chat_template".
PHI35 = PHI3.replace("{% if message['role'] == 'system' %}", "{% if message['role'] == 'system' and message['content'] %}")

# microsoft/phi-4, tokenizer_config.json "chat_template".
PHI4 = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' "
    "+ message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user"
    "<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# HuggingFaceH4/zephyr-7b-beta, tokenizer_config.json "chat_template".
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
    "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + "
    "message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'"
    "  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}"
    "\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# Alpaca (multi-turn) as unsloth's get_chat_template(tokenizer, "alpaca") writes it, with its
# default system message filled in (unsloth/chat_templates.py).
ALPACA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% set loop_messages = messages[1:] %}{% else %}{{ 'Below are some instructions that describe "
    "some tasks. Write responses that appropriately complete each request.' + '\n\n' }}{% set "
    "loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if message['role'] "
    "== 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% elif message['role'] == "
    "'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def fastchat_vicuna(messages: list[dict], add_generation_prompt: bool, bos: str) -> str:
    """lmsys/vicuna-7b-v1.5 ships no chat template: its format is FastChat's "vicuna_v1.1"
    conversation (fastchat/conversation.py: roles USER / ASSISTANT, SeparatorStyle.ADD_COLON_TWO,
    sep " ", sep2 "</s>"), whose get_prompt() this restates; Vicuna's tokenizer adds the bos."""
    system, rest = VICUNA_SYSTEM, messages
    if messages and messages[0]["role"] == "system":
        system, rest = messages[0]["content"], messages[1:]
    turns = [("USER" if m["role"] == "user" else "ASSISTANT", m["content"]) for m in rest]
    if add_generation_prompt:
        turns.append(("ASSISTANT", None))
    seps = [" ", "</s>"]
    text = system + seps[0]
    for i, (role, message) in enumerate(turns):
        text += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return bos + text


# name -> (official Jinja, or a renderer for formats without one, tokenizer overrides)
OFFICIAL: dict[str, tuple[object, dict]] = {
    "llama-3": (LLAMA3, {}),
    "llama-3.1": (LLAMA31, {}),
    "llama-3.2": (LLAMA32, {}),
    "gemma": (GEMMA2, {}),
    "gemma2": (GEMMA2, {}),
    "gemma-3": (GEMMA3, {}),
    "mistral": (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}),
    "chatml": (CHATML, {}),
    "qwen-2.5": (QWEN25, {"eos_token": "<|im_end|>"}),
    "qwen-3": (QWEN3, {"eos_token": "<|im_end|>"}),
    "phi-3": (PHI3, {"eos_token": "<|endoftext|>"}),
    "phi-3.5": (PHI35, {"eos_token": "<|endoftext|>"}),
    "phi-4": (PHI4, {}),
    "zephyr": (ZEPHYR, {"eos_token": "</s>"}),
    "vicuna": (fastchat_vicuna, {"bos_token": "<s>", "eos_token": "</s>"}),
    "alpaca": (ALPACA, {}),
}

EXTRA_TOKENS = [
    "<|eom_id|>", "<|end_of_text|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
    "<|im_sep|>", "<|endoftext|>", "[INST]", "[/INST]", "<s>", "</s>", "<think>", "</think>",
]

# ---------------------------------------------------------------------------------------------
# The conversations

U1 = {"role": "user", "content": "  What is the capital of France?\n"}
A1 = {"role": "assistant", "content": " The capital of France is Paris. "}
U2 = {"role": "user", "content": "And two plus two?"}
A2 = {"role": "assistant", "content": "Two plus two is four."}
SYS = {"role": "system", "content": "You are a terse assistant.\nAnswer in one line."}

CHATS: dict[str, list[dict]] = {
    "single": [U1],
    "single-answered": [U1, A1],
    "multi": [U1, A1, U2, A2],
    "multi-open": [U1, A1, U2],
    "system": [SYS, U1],
    "system-multi": [SYS, U1, A1, U2, A2],
    "system-multi-open": [SYS, U1, A1, U2],
    "system-padded": [{"role": "system", "content": "\n  Be kind.  "}, U1, A1],
    "system-empty": [{"role": "system", "content": ""}, U1, A1, U2],
}

# Templates whose official Jinja rejects a system message (minift folds it into the first turn).
NO_SYSTEM = {"gemma", "gemma2"}

QWEN3_THINKING: dict[str, list[dict]] = {
    "think-in-content": [U1, {"role": "assistant", "content": "<think>\nFrance... Paris.\n</think>\n\nParis."}],
    "old-thoughts-dropped": [
        U1, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nParis."}, U2,
        {"role": "assistant", "content": "<think>\n2+2\n</think>\n\nFour."},
    ],
    "reasoning-field": [U1, {"role": "assistant", "content": "\n\nParis.", "reasoning_content": "\nIt is Paris.\n"}],
    "after-query-reasoning": [
        U1, {"role": "assistant", "content": "Let me check.", "reasoning_content": "look it up"},
        {"role": "assistant", "content": "Paris."},
    ],
}

GEMMA3_IMAGES: dict[str, list[dict]] = {
    "image-parts": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is in the picture? "}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat on a mat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}, {"type": "image"}]},
    ],
    "system-parts": [
        {"role": "system", "content": [{"type": "text", "text": "Describe images briefly."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    ],
}


@pytest.fixture(scope="module")
def base_tok():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": EXTRA_TOKENS})
    return tok


def reference_tokenizer(base_tok, name: str):
    tok = copy.deepcopy(base_tok)
    official, overrides = OFFICIAL[name]
    for key, value in overrides.items():
        setattr(tok, key, value)
    if isinstance(official, str):
        tok.chat_template = official
    return tok


def render_official(ref, name: str, chat: list[dict], gp: bool, **kwargs) -> str:
    official, _ = OFFICIAL[name]
    if callable(official):
        return official(chat, gp, ref.bos_token)
    return ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gp, **kwargs)


def render(tok, chat: list[dict], gp: bool, **kwargs) -> str:
    return tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gp, **kwargs)


def cases():
    for name in OFFICIAL:
        chats = dict(CHATS)
        if name == "qwen-3":
            chats.update(QWEN3_THINKING)
        if name == "gemma-3":
            chats.update(GEMMA3_IMAGES)
        for label in chats:
            if name in NO_SYSTEM and label.startswith("system"):
                continue
            yield name, label, chats[label]


# ---------------------------------------------------------------------------------------------
# Fidelity


def test_every_template_has_an_official_reference():
    assert set(OFFICIAL) == set(chat_templates())


@pytest.mark.parametrize("name,label,chat", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in cases()])
def test_renders_like_the_official_template(base_tok, name, label, chat):
    ref = reference_tokenizer(base_tok, name)
    ours = get_chat_template(copy.deepcopy(ref), name)
    for gp in (False, True):
        expected = render_official(ref, name, chat, gp)
        assert render(ours, chat, gp) == expected, (name, label, gp)
        # the registry's Jinja as it is (no eos mapping) renders the same text too
        assert render(ref, chat, gp, chat_template=template(name).jinja) == expected, (name, label, gp)


def test_official_extras_llama_date_and_qwen3_thinking_switch(base_tok):
    for name in ("llama-3.1", "llama-3.2"):
        ref = reference_tokenizer(base_tok, name)
        ours = get_chat_template(copy.deepcopy(ref), name)
        for chat in (CHATS["system-multi-open"], CHATS["multi"]):
            expected = render_official(ref, name, chat, True, date_string="01 Mar 2025")
            assert "Today Date: 01 Mar 2025" in expected
            assert render(ours, chat, True, date_string="01 Mar 2025") == expected
    ref = reference_tokenizer(base_tok, "qwen-3")
    ours = get_chat_template(copy.deepcopy(ref), "qwen-3")
    for flag in (False, True):
        expected = render_official(ref, "qwen-3", CHATS["multi-open"], True, enable_thinking=flag)
        assert render(ours, CHATS["multi-open"], True, enable_thinking=flag) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    assert render(ours, CHATS["multi-open"], True, enable_thinking=False).endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize("name", sorted(NO_SYSTEM))
def test_gemma_system_prompt_is_folded_where_the_official_template_refuses(base_tok, name):
    ref = reference_tokenizer(base_tok, name)
    with pytest.raises(jinja2.TemplateError, match="System role not supported"):
        render(ref, CHATS["system"], True)
    ours = get_chat_template(copy.deepcopy(ref), name)
    # as Gemma 3 does it: the system text and a blank line open the first user turn
    assert render(ours, CHATS["system-multi"], False) == render(
        reference_tokenizer(base_tok, "gemma-3"), CHATS["system-multi"], False
    )
    assert render(ours, CHATS["system"], True) == (
        f"<bos><start_of_turn>user\n{SYS['content']}\n\n{U1['content'].strip()}<end_of_turn>\n<start_of_turn>model\n"
    )


def test_mistral_drops_the_system_prompt_when_the_chat_ends_with_an_answer(base_tok):
    """The official v0.3 template's own rule, kept: the system prompt rides on the last user turn."""
    ours = get_chat_template(reference_tokenizer(base_tok, "mistral"), "mistral")
    assert SYS["content"] not in render(ours, CHATS["system-multi"], False)
    assert f"[INST] {SYS['content']}\n\n{U2['content']}[/INST]" in render(ours, CHATS["system-multi-open"], False)


def test_alternation_is_enforced_where_the_official_template_enforces_it(base_tok):
    bad = [U1, U2]
    for name in ("gemma", "gemma2", "gemma-3", "mistral"):
        ours = get_chat_template(reference_tokenizer(base_tok, name), name)
        with pytest.raises(jinja2.TemplateError, match="alternate"):
            render(ours, bad, True)


@pytest.mark.parametrize("name", chat_templates())
def test_tool_calling_is_refused_not_misrendered(base_tok, name):
    tok = get_chat_template(reference_tokenizer(base_tok, name), name)
    tool = {"type": "function", "function": {"name": "add", "description": "Add", "parameters": {"type": "object"}}}
    with pytest.raises(jinja2.TemplateError, match="does not render tools"):
        tok.apply_chat_template([U1], tools=[tool], tokenize=False)
    if name not in ("vicuna", "alpaca"):  # these two refuse any role but user / assistant anyway
        with pytest.raises(jinja2.TemplateError, match="tool"):
            render(tok, [U1, {"role": "tool", "content": "4"}], True)


# ---------------------------------------------------------------------------------------------
# Registry


def test_names():
    names = chat_templates()
    for required in ("llama-3", "gemma", "gemma2", "gemma-3", "mistral", "chatml", "alpaca", "vicuna",
                     "zephyr", "phi-3", "phi-4", "qwen-2.5", "qwen-3", "llama-3.1", "llama-3.2"):
        assert required in names
    assert len(names) == len(set(names))
    for name in names:
        tpl = template(name)
        assert isinstance(tpl, ChatTemplate) and tpl.name == name
        assert tpl.jinja and tpl.instruction_part and tpl.response_part and tpl.stop and tpl.source


@pytest.mark.parametrize("alias,name", [
    ("llama3", "llama-3"), ("LLaMA-3", "llama-3"), ("llama-3.1", "llama-3.1"), ("llama3.1", "llama-3.1"),
    ("llama-31", "llama-3.1"), ("llama-3.3", "llama-3.1"), ("llama-33", "llama-3.1"), ("llama-3.2", "llama-3.2"),
    ("llama-32", "llama-3.2"), ("gemma3", "gemma-3"), ("gemma-2", "gemma2"), ("qwen2.5", "qwen-2.5"),
    ("qwen_2.5", "qwen-2.5"), ("qwen25", "qwen-2.5"), ("qwen3", "qwen-3"), ("phi-3.5", "phi-3.5"),
    ("phi-35", "phi-3.5"), ("phi3", "phi-3"), ("phi4", "phi-4"), (" Mistral ", "mistral"),
])
def test_aliases(alias, name):
    assert template(alias) is template(name)


def test_unknown_name_lists_the_names(base_tok):
    tok = copy.deepcopy(base_tok)
    before = (tok.chat_template, tok.eos_token)
    with pytest.raises(ConfigError) as err:
        get_chat_template(tok, "llama-9")
    assert "llama-9" in str(err.value)
    for name in chat_templates():
        assert name in str(err.value)
    assert (tok.chat_template, tok.eos_token) == before
    with pytest.raises(ConfigError):
        template("no-such-template")
    with pytest.raises(ConfigError):
        template(None)


# ---------------------------------------------------------------------------------------------
# map_eos_token, system_message, processors


@pytest.mark.parametrize("name", chat_templates())
def test_map_eos_token(base_tok, name):
    tok = copy.deepcopy(base_tok)
    eos_before = tok.eos_token
    tpl = template(name)
    assert get_chat_template(tok, name) is tok
    if tpl.end_of_turn is None:  # turns end with the tokenizer's own eos
        assert tok.eos_token == eos_before
    else:
        assert tok.eos_token == tpl.end_of_turn
        assert tok.eos_token_id == tok.convert_tokens_to_ids(tpl.end_of_turn)
    kept = get_chat_template(copy.deepcopy(base_tok), name, map_eos_token=False)
    assert kept.eos_token == eos_before


def test_map_eos_token_with_the_token_missing_keeps_the_eos_and_says_so():
    tok = tiny_tokenizer()  # has no <|end|>
    with pytest.warns(UserWarning, match=re.escape("'<|end|>' is not in the tokenizer's vocabulary")):
        get_chat_template(tok, "phi-3")
    assert tok.eos_token == "<eos>"
    assert tok.chat_template == template("phi-3").jinja


def test_phi3_keeps_writing_its_original_eos_after_mapping(base_tok):
    ref = reference_tokenizer(base_tok, "phi-3")
    ours = get_chat_template(copy.deepcopy(ref), "phi-3")
    assert ours.eos_token == "<|end|>"
    assert render(ours, CHATS["multi"], False).endswith("<|end|>\n<|endoftext|>")
    again = get_chat_template(ours, "phi-3.5")  # a second call on the mapped tokenizer
    assert again.eos_token == "<|end|>"
    assert render(again, CHATS["multi"], False) == render_official(ref, "phi-3", CHATS["multi"], False)


def test_system_message(base_tok):
    qwen = get_chat_template(copy.deepcopy(base_tok), "qwen-2.5")
    default = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    assert render(qwen, [U1], True).startswith(default)
    assert template("qwen-2.5").default_system.startswith("You are Qwen")
    custom = get_chat_template(copy.deepcopy(base_tok), "qwen-2.5", system_message="Be nice.")
    assert render(custom, [U1], True).startswith("<|im_start|>system\nBe nice.<|im_end|>\n")
    assert render(custom, [SYS, U1], True).startswith(f"<|im_start|>system\n{SYS['content']}<|im_end|>\n")

    # a default system message renders as if the chat had carried it, in every template
    tricky = 'Say "hi" {{ not jinja }} {% raw %} \\ end.\nSecond line, é.'
    for name in chat_templates():
        ref = reference_tokenizer(base_tok, name)
        with_default = get_chat_template(copy.deepcopy(ref), name, system_message=tricky)
        explicit = get_chat_template(copy.deepcopy(ref), name)
        for chat in (CHATS["single"], CHATS["multi-open"]):
            assert render(with_default, chat, True) == render(
                explicit, [{"role": "system", "content": tricky}] + chat, True
            ), name
        assert template(name).with_system(tricky).default_system == tricky


class StandInProcessor:
    """What get_chat_template needs of a processor: a chat_template and a tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chat_template = "old"


def test_processor_stand_in(base_tok):
    proc = StandInProcessor(copy.deepcopy(base_tok))
    assert get_chat_template(proc, "gemma-3") is proc
    assert proc.chat_template == proc.tokenizer.chat_template == template("gemma-3").jinja
    assert proc.tokenizer.eos_token == "<end_of_turn>"


def test_real_gemma3_processor_renders_images_like_the_official_template(base_tok):
    from minift.testing import tiny_gemma3_processor

    proc = tiny_gemma3_processor()
    get_chat_template(proc, "gemma-3")
    assert proc.tokenizer.eos_token == "<end_of_turn>"
    ref = reference_tokenizer(base_tok, "gemma-3")
    for chat in GEMMA3_IMAGES.values():
        expected = render_official(ref, "gemma-3", chat, True)
        assert proc.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected
        assert render(proc.tokenizer, chat, True) == expected


class RefusingTokenizer:
    """A tokenizer whose eos cannot be set: get_chat_template must undo what it did."""

    chat_template = "old"

    def __init__(self):
        self._eos = "<eos>"

    def get_vocab(self):
        return {"<eos>": 0, "<|eot_id|>": 1}

    @property
    def eos_token(self):
        return self._eos

    @eos_token.setter
    def eos_token(self, value):
        raise RuntimeError("read-only")


def test_nothing_changes_when_it_fails():
    proc = StandInProcessor(RefusingTokenizer())
    with pytest.raises(RuntimeError):
        get_chat_template(proc, "llama-3")
    assert proc.chat_template == "old" and proc.tokenizer.chat_template == "old"
    assert proc.tokenizer.eos_token == "<eos>"


# ---------------------------------------------------------------------------------------------
# Responses-only markers and Ollama


@pytest.mark.parametrize("name", chat_templates())
def test_instruction_and_response_parts_mark_the_turns(base_tok, name):
    tpl = template(name)
    tok = get_chat_template(reference_tokenizer(base_tok, name), name)
    text = render(tok, CHATS["system-multi"] if name not in NO_SYSTEM else CHATS["multi"], False)
    assert text.count(tpl.instruction_part) >= 2, name
    assert text.count(tpl.response_part) >= 2, name
    assert text.index(tpl.instruction_part) < text.index(tpl.response_part)
    assert render(tok, CHATS["multi-open"], True).rstrip().endswith(tpl.response_part.rstrip())


def _go_blocks_balance(text: str) -> bool:
    opened = len(re.findall(r"\{\{-?\s*(?:if|range|with|define|block)\b", text))
    closed = len(re.findall(r"\{\{-?\s*end\b", text))
    return opened == closed and text.count("{{") == text.count("}}")


@pytest.mark.parametrize("name", chat_templates())
def test_ollama_template(name):
    tpl = template(name)
    text = tpl.ollama_template
    assert text.strip() and (".Messages" in text or ".Prompt" in text)
    assert _go_blocks_balance(text), name
    end = tpl.end_of_turn if tpl.end_of_turn is not None else EOS_PLACEHOLDER
    assert end in text
    stops = [v for k, v in tpl.ollama_parameters if k == "stop"]
    assert end in stops
    resolved = tpl.resolved("</s>")
    assert EOS_PLACEHOLDER not in resolved.ollama_template and EOS_PLACEHOLDER not in resolved.stop
    assert (tpl.end_of_turn or "</s>") in resolved.ollama_template
    modelfile = tpl.ollama_modelfile("./model.gguf", eos_token="</s>")
    assert modelfile.startswith("FROM ./model.gguf\nTEMPLATE \"\"\"")
    for stop in resolved.stop:
        assert f'PARAMETER stop "{stop}"' in modelfile
    assert (f'SYSTEM """{tpl.default_system}"""' in modelfile) == (tpl.default_system is not None)
    if EOS_PLACEHOLDER in text:
        with pytest.raises(ConfigError, match="eos_token"):
            tpl.ollama_modelfile("./model.gguf")


def test_gemma3_ollama_parameters():
    assert template("gemma-3").ollama_parameters == (
        ("stop", "<end_of_turn>"), ("stop", "<eos>"), ("temperature", 0.1), ("min_p", 0.0),
        ("top_k", 64), ("top_p", 0.95),
    )
    text = template("gemma-3").ollama_template
    assert "range $i, $_ := .Messages" in text and "<start_of_turn>user" in text and "<end_of_turn>" in text
    modelfile = template("gemma-3").ollama_modelfile("gemma.gguf")
    assert "PARAMETER temperature 0.1\nPARAMETER min_p 0.0\nPARAMETER top_k 64\nPARAMETER top_p 0.95" in modelfile


def test_templates_import_nothing_heavy():
    """A bottom-level package: minift.errors and the standard library only, at import time."""
    import ast
    from pathlib import Path

    import minift.templates as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [("." * node.level) + (node.module or "")]
            else:
                continue
            for mod in mods:
                assert mod.startswith(".") or mod in ("__future__", "dataclasses", "typing", "warnings", "re") \
                    or mod == "minift.errors", (path.name, mod)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        template("llama-3")
