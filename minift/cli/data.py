"""Datasets for `minift train`: a hub id or a local json / jsonl / parquet / csv / txt file or
folder through `datasets`' loaders, Alpaca rows mapped to minift's canonical rows, `--text_field`,
and raw text cut into overlapping token windows for continued pretraining."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .common import UsageError, looks_local

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
            ".arrow": "arrow"}
CANONICAL = ("messages", "conversations", "prompt+completion", "text")

# The Alpaca prompt unsloth-cli.py (and unsloth's notebooks) format rows with.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def check_data_arg(spec: str, flag: str) -> None:
    """Refuses a local-looking dataset path that does not exist (before anything loads)."""
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_file() and p.suffix.lower() not in BUILDERS:
            raise UsageError(flag, f"{spec}: unknown file type {p.suffix!r}; use one of "
                                   f"{', '.join(sorted(BUILDERS))} (or a folder of them, or a hub id)")
        return
    if looks_local(spec):
        raise UsageError(flag, f"{spec}: no such file or directory")


def load_rows(spec: str, split: str, flag: str) -> Any:
    """A datasets.Dataset from a hub id, a local file or a local folder (datasets' loaders: a
    file's only split is "train", which split slicing such as "train[:100]" may narrow)."""
    import datasets

    p = Path(spec).expanduser()
    try:
        if p.is_file():
            return datasets.load_dataset(BUILDERS[p.suffix.lower()], data_files=str(p), split=split)
        if p.is_dir():
            if (p / "dataset_info.json").is_file() and (p / "state.json").is_file():  # save_to_disk
                ds = datasets.load_from_disk(str(p))
                return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            return datasets.load_dataset(str(p), split=split)
        return datasets.load_dataset(spec, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise UsageError(flag, f"could not load {spec!r} (split {split!r}): {e}") from None
    except Exception as e:  # datasets raises its own DatasetNotFoundError, DataFilesNotFoundError, ...
        raise UsageError(flag, f"could not load {spec!r} (split {split!r}): {type(e).__name__}: {e}") from None


def columns(ds: Any) -> list[str]:
    return list(getattr(ds, "column_names", None) or (list(ds[0]) if len(ds) else []))


def is_alpaca(cols: list[str]) -> bool:
    c = set(cols)
    canonical = "messages" in c or "conversations" in c or {"prompt", "completion"} <= c or "text" in c
    return {"instruction", "output"} <= c and not canonical


def alpaca_formatter(chat: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """instruction / input / output → a chat (user: instruction + input, assistant: output) when a
    chat template is used, else prompt / completion in unsloth-cli's Alpaca prompt (the eos is
    appended to the completion by minift's tokenisation, as unsloth appends EOS_TOKEN)."""

    def fmt(row: dict[str, Any]) -> dict[str, Any]:
        ins, inp, out = str(row.get("instruction") or ""), str(row.get("input") or ""), str(row.get("output") or "")
        if chat:
            user = ins + ("\n\n" + inp if inp.strip() else "")
            return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": out}]}
        return {"prompt": ALPACA_PROMPT.format(instruction=ins, input=inp), "completion": out}

    return fmt


def text_field_formatter(field: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def fmt(row: dict[str, Any]) -> dict[str, Any]:
        return {"text": str(row[field])}

    return fmt


def formatting_for(ds: Any, *, text_field: str | None, chat: bool, responses_only: bool, flag: str) -> tuple[Callable | None, str]:
    """The formatting_func a dataset needs (None for canonical rows) and its format's name;
    UsageError when its columns hold no format minift knows."""
    from ..errors import DataError
    from ..train.formats import check_columns

    cols = columns(ds)
    if text_field is not None:
        if text_field not in cols:
            raise UsageError("--text_field", f"column {text_field!r} is not in {flag}'s columns {cols}")
        if responses_only:
            raise UsageError("--train_on_responses_only", "needs chat or prompt/completion rows; --text_field gives "
                                                          "plain text, which does not say where responses are")
        return (None if text_field == "text" else text_field_formatter(text_field)), "text"
    if is_alpaca(cols):
        return alpaca_formatter(chat), "alpaca"
    try:
        kind = check_columns(cols, flag)
    except DataError as e:
        raise UsageError(flag, f"{e}; Alpaca rows (instruction / input / output) are recognised too, and "
                               "--text_field names a text column") from None
    if kind == "text" and responses_only:
        raise UsageError("--train_on_responses_only", f"{flag} holds plain 'text' rows, which do not say where "
                                                      "responses are; use chat or prompt/completion rows")
    return None, kind


# ---- continued pretraining on raw text ------------------------------------------------------------


@dataclass
class TokenWindows:
    """Raw text as overlapping token windows: the file is tokenised once (bos first, eos last),
    and window k covers tokens [k * (chunk - stride), k * (chunk - stride) + chunk). Each token is a
    target once: a window's first `stride` tokens (shared with the window before) are context
    only (label -100), as in a sliding-window evaluation."""

    windows: list[list[int]]
    stride: int
    n_tokens: int

    def __len__(self) -> int:
        return len(self.windows)

    def examples(self) -> list[Any]:
        import torch

        from ..train.tokenize import IGNORE, Example

        out = []
        for k, ids in enumerate(self.windows):
            t = torch.tensor(ids, dtype=torch.long)
            labels = t.clone()
            if k > 0 and self.stride:
                labels[: self.stride] = IGNORE
            out.append(Example(t, labels))
        return out


def token_windows(path: Path, tokenizer: Any, chunk: int, stride: int) -> TokenWindows:
    from ..templates import tokenizer_of

    tok = tokenizer_of(tokenizer)
    text = path.read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids = ids + [tok.eos_token_id]
    step = chunk - stride
    windows = []
    start = 0
    while True:
        w = ids[start: start + chunk]
        if len(w) >= 2 and (start == 0 or len(w) > stride):
            windows.append(w)
        if start + chunk >= len(ids):
            break
        start += step
    if not windows:
        raise UsageError("--raw_text_file", f"{path}: fewer than 2 tokens of text")
    return TokenWindows(windows, stride, len(ids))
