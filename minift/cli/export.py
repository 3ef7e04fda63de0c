"""`minift export DIR --to merged_16bit | merged_4bit | gguf`: an adapter directory (its base from
adapter_config.json) or a model directory, written as a merged transformers checkpoint or as
llama.cpp GGUF file(s), optionally with an Ollama Modelfile; `--push_to REPO` also uploads the
output folder (with a model card) to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import UsageError, check_chat_template, check_model_arg, is_adapter_dir, load_model

TARGETS = ("merged_16bit", "merged_4bit", "gguf")


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="minift export")
    p.description = "Merge an adapter into its base and write a transformers checkpoint or GGUF file(s)."
    p.add_argument("dir", metavar="DIR", help="an adapter directory (e.g. OUTPUT_DIR/final) or a model directory / hub id")
    p.add_argument("--to", required=True, choices=TARGETS, help="what to write")
    p.add_argument("--output", "-o", metavar="PATH",
                   help="the output directory (GGUF: files <name>.<QUANT>.gguf inside it; default: DIR-<to>)")
    p.add_argument("--quantization", "--quantization_method", nargs="+", default=["q8_0"], metavar="QUANT",
                   help="GGUF quantisation(s): f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k_s q4_k_m q5_k_s q5_k_m q6_k, "
                        "or not_quantized / fast_quantized / quantized (default: q8_0)")
    p.add_argument("--modelfile", nargs="?", const=True, default=False, metavar="TEMPLATE",
                   help="GGUF: also write an Ollama Modelfile (template matched from the tokenizer, or the name given)")
    p.add_argument("--base", metavar="MODEL", help="the base of an adapter DIR (default: adapter_config.json's)")
    p.add_argument("--chat_template", metavar="NAME", help="put this minift chat template on the tokenizer first")
    p.add_argument("--load_in_4bit", action="store_true",
                   help="load the base in NF4 (merging then dequantises it exactly; default: 16-bit)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output")
    p.add_argument("--push_to", metavar="REPO",
                   help="also upload the output folder, with a model card, to this hub repository 'org/name' "
                        "(a new one is created private)")
    p.add_argument("--hub_token", metavar="TOKEN",
                   help="the Hugging Face token for --push_to (default: huggingface_hub's, from `hf auth login` "
                        "or HF_TOKEN)")
    return p


def _check(a: argparse.Namespace) -> None:
    from ..io.hub import is_hub_id
    from .train import _quants, check_staging, hub_token

    if is_adapter_dir(a.dir):
        if a.base is not None:
            check_model_arg(a.base, "--base")
    else:
        if a.base is not None:
            raise UsageError("--base", "only applies when DIR is an adapter directory")
        check_model_arg(a.dir, "DIR")
    check_chat_template(a.chat_template)
    a.quants = _quants(a.quantization)
    if a.modelfile and a.to != "gguf":
        raise UsageError("--modelfile", "only applies with --to gguf")
    if isinstance(a.modelfile, str):
        check_chat_template(a.modelfile, "--modelfile")
    out = Path(a.output).expanduser() if a.output else Path(str(a.dir).rstrip("/") + f"-{a.to}")
    if Path(a.dir).expanduser().exists() and out.resolve() == Path(a.dir).expanduser().resolve():
        raise UsageError("--output", "must differ from DIR")
    if out.exists() and not a.overwrite:
        if out.is_file() or (a.to != "gguf" and any(out.iterdir())):
            raise UsageError("--output", f"{out} exists; pass --overwrite to replace it")
    a.token = None
    if a.push_to is not None:
        if not is_hub_id(a.push_to):
            raise UsageError("--push_to", f"expected a hub repository id 'org/name', got {a.push_to!r}")
        check_staging(out, "--output", a.overwrite)  # the folder uploaded is replaced whole, GGUF too
        a.token = hub_token(a.hub_token, "--push_to", "--hub_token")
    elif a.hub_token is not None:
        raise UsageError("--hub_token", "only applies with --push_to")
    a.out = out


def run(argv: list[str]) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        _check(a)
    except UsageError as e:
        p.print_usage(sys.stderr)
        sys.stderr.write(f"minift export: error: {e}\n")
        return 2
    import torch

    model, tok = load_model(a.dir, base=a.base, load_in_4bit=a.load_in_4bit, chat_template=a.chat_template)
    if a.push_to is not None:  # the output folder is the staged one: the same files, plus README.md
        import minift

        kw = ({"quant": a.quants, "modelfile": a.modelfile} if a.to == "gguf"
              else {"dtype": "4bit" if a.to == "merged_4bit" else torch.bfloat16})
        url = minift.push_to_hub(model, a.push_to, what="gguf" if a.to == "gguf" else "merged", staging_dir=a.out,
                                 token=a.token, tokenizer=tok, overwrite=a.overwrite, **kw)
        print(a.out)
        print(url)
        return 0
    if a.to == "gguf":
        a.out.mkdir(parents=True, exist_ok=True)
        paths = model.save_gguf(str(a.out) + "/", a.quants, tokenizer=tok, overwrite=a.overwrite,
                                modelfile=a.modelfile)
        for path in paths if isinstance(paths, list) else [paths]:
            print(path)
        if a.modelfile:
            print(a.out / "Modelfile")
    else:
        dtype = "4bit" if a.to == "merged_4bit" else torch.bfloat16
        print(model.save_merged(a.out, dtype, tokenizer=tok, overwrite=a.overwrite))
    return 0
