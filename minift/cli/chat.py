"""`minift chat MODEL`: an interactive, streaming terminal chat (lines from stdin until EOF or
/exit); `minift generate MODEL --prompt ...`: one answer. MODEL is a model directory, a hub id or
an adapter directory (its base from adapter_config.json)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import (
    UsageError, adapter_base, check_adapter_arg, check_chat_template, check_model_arg, is_adapter_dir, load_model,
    open_image, parse_dtype,
)

HELP_LINES = "/exit (or EOF) quits, /reset forgets the conversation"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a model directory, a hub id, or an adapter directory")
    p.add_argument("--adapter", metavar="DIR", help="apply this LoRA adapter (PEFT or minift format)")
    p.add_argument("--base", metavar="MODEL", help="the base model of an adapter MODEL (default: its "
                                                    "adapter_config.json base_model_name_or_path)")
    p.add_argument("--image", metavar="FILE", help="an image for a vision model (the first user turn gets it)")
    p.add_argument("--system", metavar="TEXT", help="a system prompt")
    p.add_argument("--chat_template", metavar="NAME", help="put this minift chat template on the tokenizer")
    p.add_argument("--load_in_4bit", action="store_true", help="NF4 base")
    p.add_argument("--dtype", default=None, help="None (auto), bfloat16, float16, float32")
    p.add_argument("--max_new_tokens", type=int, default=256, help="(default: 256)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (default); > 0 samples with this temperature")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    p.add_argument("--top_k", type=int, default=0, help="top-k sampling, 0: off (default: 0)")
    p.add_argument("--min_p", type=float, default=0.0, help="min-p sampling (default: 0.0)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="(default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def build_chat_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="minift chat")
    p.description = f"Interactive chat, streamed as it is generated; {HELP_LINES}."
    _common(p)
    return p


def build_generate_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="minift generate")
    p.description = "One answer to --prompt (through the chat template unless --raw)."
    _common(p)
    p.add_argument("--prompt", required=True, help="the user message (or, with --raw, the text to continue)")
    p.add_argument("--raw", action="store_true", help="continue --prompt as plain text, without the chat template")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    return p


def _check(a: argparse.Namespace) -> None:
    check_model_arg(a.model, "MODEL")
    check_adapter_arg(a.adapter)
    if a.adapter and is_adapter_dir(a.model):
        raise UsageError("--adapter", "MODEL is already an adapter directory; give its base as MODEL instead")
    if a.base is not None:
        if not is_adapter_dir(a.model):
            raise UsageError("--base", "only applies when MODEL is an adapter directory")
        check_model_arg(a.base, "--base")
    check_chat_template(a.chat_template)
    if a.max_new_tokens < 1:
        raise UsageError("--max_new_tokens", f"must be >= 1, got {a.max_new_tokens}")
    if a.temperature < 0:
        raise UsageError("--temperature", f"must be >= 0, got {a.temperature}")
    if not 0 < a.top_p <= 1:
        raise UsageError("--top_p", f"must be in (0, 1], got {a.top_p}")
    a.dtype = parse_dtype(a.dtype)
    a.image = open_image(a.image)
    if a.image is not None:
        base = a.base or (adapter_base(Path(a.model).expanduser()) if is_adapter_dir(a.model) else a.model)
        cfg = Path(base).expanduser() / "config.json"
        if cfg.is_file():  # a local model: say so before loading it
            kind = json.loads(cfg.read_text()).get("model_type")
            if kind != "gemma3":
                raise UsageError("--image", f"{base} is a text-only {kind} model; images need a Gemma 3 vision "
                                            "checkpoint")


def _gen_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_new_tokens=a.max_new_tokens, repetition_penalty=a.repetition_penalty)
    if a.temperature > 0:
        kw.update(do_sample=True, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p)
    if a.seed is not None:
        kw["seed"] = a.seed
    return kw


def _load(a: argparse.Namespace) -> tuple[Any, Any]:
    model, tok = load_model(a.model, adapter=a.adapter, base=a.base, load_in_4bit=a.load_in_4bit, dtype=a.dtype,
                            chat_template=a.chat_template)
    if a.image is not None and not hasattr(model, "image_features"):
        raise UsageError("--image", f"{model.config.model_type} is a text-only model; images need a Gemma 3 "
                                    "vision checkpoint")
    return model, tok


def _user(text: str, image: Any) -> dict[str, Any]:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


def run_chat(argv: list[str]) -> int:
    p = build_chat_parser()
    a = p.parse_args(argv)
    try:
        _check(a)
        model, tok = _load(a)
    except UsageError as e:
        p.print_usage(sys.stderr)
        sys.stderr.write(f"minift chat: error: {e}\n")
        return 2
    import minift

    interactive = sys.stdin.isatty()
    if interactive:
        sys.stderr.write(f"[minift] chatting with {a.model}; {HELP_LINES}\n")
    system = [{"role": "system", "content": a.system}] if a.system else []
    history: list[dict[str, Any]] = []
    image = a.image
    kw = _gen_kwargs(a)
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            history, image = [], a.image
            continue
        history.append(_user(text, image))
        image = None  # the image belongs to the first turn
        reply = minift.chat(model, tok, system + history, stream=True, **kw)
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply})
    if interactive:
        sys.stdout.write("\n")
    return 0


def run_generate(argv: list[str]) -> int:
    p = build_generate_parser()
    a = p.parse_args(argv)
    try:
        _check(a)
        if a.raw and a.system:
            raise UsageError("--system", "does not apply with --raw")
        model, tok = _load(a)
    except UsageError as e:
        p.print_usage(sys.stderr)
        sys.stderr.write(f"minift generate: error: {e}\n")
        return 2
    import minift

    kw = _gen_kwargs(a)
    if a.raw:
        prompt = a.prompt
        if a.image is not None:
            img_tok = getattr(tok, "boi_token", None) or "<start_of_image>"
            prompt = prompt if img_tok in prompt else img_tok + prompt
        out = minift.generate(model, tok, prompt, images=a.image, **kw)
        sys.stdout.write(out + "\n")
        return 0
    messages = ([{"role": "system", "content": a.system}] if a.system else []) + [_user(a.prompt, a.image)]
    if a.stream:
        minift.chat(model, tok, messages, stream=True, **kw)
    else:
        sys.stdout.write(minift.chat(model, tok, messages, **kw) + "\n")
    return 0
