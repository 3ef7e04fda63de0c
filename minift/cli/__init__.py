"""The `minift` command (also `python -m minift`):

  minift train ...        fine-tune (unsloth-cli.py's options under the same names; --config file.yaml)
  minift chat MODEL       interactive streaming chat (stdin until EOF or /exit)
  minift generate MODEL --prompt TEXT
  minift export DIR --to merged_16bit | merged_4bit | gguf
  minift info MODEL       architecture, parameter counts, memory estimate

`minift --model_name ...` (options without a command) runs `train`, so an unsloth-cli.py command
line works with only the script's name changed.
"""

from __future__ import annotations

import argparse
import functools
import sys

COMMANDS = {
    "train": "fine-tune LoRA adapters (unsloth-cli.py's options; --config file.yaml)",
    "chat": "interactive streaming chat with a model or adapter",
    "generate": "one answer to --prompt",
    "export": "merge an adapter and write a transformers checkpoint or GGUF",
    "info": "architecture, parameter counts and a memory estimate",
}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line as one parser (used for --help and the generated CLI reference;
    each command parses its own arguments)."""
    from . import chat, export, info, train

    p = argparse.ArgumentParser(prog="minift", description="minift: fast, memory-lean LLM fine-tuning.",
                                epilog="`minift --model_name ...` without a command runs `minift train`.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    builders = {"train": train.build_parser, "chat": chat.build_chat_parser, "generate": chat.build_generate_parser,
                "export": export.build_parser, "info": info.build_parser}
    for name, help_ in COMMANDS.items():
        builders[name](sub.add_parser(name, help=help_, description=help_))
    return p


REFERENCE_WIDTH = 100  # argparse wraps to the terminal's width (COLUMNS); the reference must not depend on it


def reference_markdown() -> str:
    """The CLI reference as Markdown, generated from the parsers: the README's "CLI reference"
    section is exactly this (tests/test_cli.py checks; `python tools/update_cli_reference.py`
    rewrites it). Formatted at a fixed width, so the output is the same on every terminal."""
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, sp in sub.choices.items():
        sp.formatter_class = functools.partial(sp.formatter_class, width=REFERENCE_WIDTH)
        usage = " ".join(sp.format_usage().split())[len("usage: "):]
        out += [f"#### `minift {name}`", "", sp.description or "", ""]
        if len(usage) < 300:  # train's lists every option: its table below says it better
            out += [f"`{usage}`", ""]
        for group in sp._action_groups:
            rows = [a for a in group._group_actions if a.help is not argparse.SUPPRESS and a.dest != "help"]
            if not rows:
                continue
            title = group.title if group.title not in ("options", "optional arguments") else "options"
            out += [f"*{title}*", "", "| argument | meaning |", "|---|---|"]
            for a in rows:
                names = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.metavar or a.dest}`"
                text = " ".join(str(a.help % {"default": a.default} if "%(" in str(a.help) else a.help).split())
                out.append(f"| {names} | {text.replace('|', '/')} |")
            out.append("")
    return "\n".join(out)


def _version() -> str:
    from .. import __version__

    return f"minift {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0 if args else 2
    if args[0] == "--version":
        print(_version())
        return 0
    cmd, rest = args[0], args[1:]
    if cmd.startswith("-"):  # an unsloth-cli.py command line: options only
        cmd, rest = "train", args
    if cmd not in COMMANDS:
        sys.stderr.write(f"minift: error: unknown command {cmd!r}; commands: {', '.join(COMMANDS)}\n")
        return 2
    from ..errors import MiniftError

    try:
        if cmd == "train":
            from .train import run
        elif cmd == "chat":
            from .chat import run_chat as run
        elif cmd == "generate":
            from .chat import run_generate as run
        elif cmd == "export":
            from .export import run
        else:
            from .info import run
        return run(rest)
    except MiniftError as e:
        sys.stderr.write(f"minift {cmd}: error: {type(e).__name__}: {e}\n")
        return 1
    except SystemExit as e:  # argparse's --help (0) and its own usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt as e:
        sys.stderr.write("\n")
        interrupt = sys.modules.get("minift.train.interrupt")  # loaded if training ran
        if interrupt is not None and isinstance(e, interrupt.TrainingInterrupted):  # where the checkpoint is
            sys.stderr.write(f"minift {cmd}: {e.what}\n")
            if e.resumable is not None:
                sys.stderr.write(f"minift {cmd}: to continue, run the same command with --resume "
                                 f"(the latest checkpoint in its --output_dir) or --resume {e.resumable}\n")
        return 130


__all__ = ["main", "build_parser", "reference_markdown", "COMMANDS"]
