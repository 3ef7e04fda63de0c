"""Chat templates by name: the registry of chat formats minift can train and generate with.

A fine-tuned chat model only answers well when its prompts look exactly like the ones it was
trained on, and an exported model (Ollama) only stops where training taught it to. So each format
is kept here once, as a `ChatTemplate`: minift's own Jinja for transformers'
`apply_chat_template` (for plain chats it renders exactly what the family's official template
renders; tests/test_chat_templates.py checks that against the official Jinja), the token that ends
an assistant turn and the stop tokens, the user / assistant markers that responses-only training
masks on, and the Ollama Modelfile TEMPLATE and PARAMETERs.

    from minift.templates import chat_templates, get_chat_template, template
    tokenizer = get_chat_template(tokenizer, "llama-3.1")   # Jinja on, eos -> <|eot_id|>
    template("gemma-3").response_part                       # "<start_of_turn>model\\n"

Names: llama-3, llama-3.1 (also 3.3), llama-3.2, gemma, gemma2, gemma-3, mistral (v0.3),
chatml, qwen-2.5, qwen-3, phi-3, phi-3.5, phi-4, zephyr, vicuna, alpaca, plus aliases
(unsloth's spellings such as llama3, gemma3, gemma-2, qwen2.5, phi-35). llama-3.1 (alias
llama-3.3) and llama-3.2 are templates of their own, not aliases of llama-3: their official
templates always write a system header with the knowledge cutoff and a date line (a fixed date
for 3.1 / 3.3, today's for 3.2), which Llama 3's does not. Tool calling is covered by none of
them (a template error says so); each template's `not_covered` says what else it leaves out.

A bottom-level package: it imports only minift.errors and the standard library (the Jinja is
rendered by transformers, which the caller's tokenizer brings).
"""

from .base import EOS_PLACEHOLDER, ChatTemplate
from .registry import chat_templates, get_chat_template, template
from .tokenizers import end_of_turn_tokens, is_processor, stop_token_ids, tokenizer_of

__all__ = [
    "EOS_PLACEHOLDER", "ChatTemplate", "chat_templates", "get_chat_template", "template", "end_of_turn_tokens",
    "is_processor", "stop_token_ids", "tokenizer_of",
]
