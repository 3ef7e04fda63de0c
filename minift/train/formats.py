"""Dataset rows → one canonical form: plain text, a chat (role/content messages), or a
prompt/completion pair. Everything format-specific happens here so tokenisation sees one shape."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from ..errors import DataError

SUPPORTED = (
    "'text' (plain text), 'messages' (role/content chat, content a string or a list of "
    "{'type': 'text'|'image', ...} parts; images inline or in an 'images' column), "
    "'conversations' (ShareGPT from/value), 'prompt' + 'completion'"
)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "tool": "tool"}
ROLES = ("system", "user", "assistant", "tool")


def columns_of(dataset: Any) -> list[str]:
    """Column names of a datasets.Dataset, or the keys of a list of dicts' first row."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    try:
        first = dataset[0]
    except (IndexError, KeyError, TypeError):
        return []
    return list(first) if isinstance(first, dict) else []


def check_columns(columns: Iterable[str], where: str) -> str:
    """The format a set of columns holds, or DataError naming the supported ones."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "conversations"
    fmt = "prompt_completion" if "prompt" in cols and "completion" in cols else "text" if "text" in cols else None
    if fmt is not None and cols & {"image", "images"}:  # a LaTeX_OCR-style row: its image would be dropped
        raise DataError(
            f"{where}: an image column ({', '.join(sorted(cols & {'image', 'images'}))}) beside "
            f"{'prompt/completion' if fmt == 'prompt_completion' else 'text'} rows, which carry no image; map each row "
            "into a chat whose user content holds {'type': 'image', 'image': ...} and {'type': 'text', ...} parts "
            "and whose assistant turn holds the answer (formatting_func=, as unsloth's vision notebooks do)"
        )
    if fmt is not None:
        return fmt
    raise DataError(
        f"{where}: columns {sorted(cols)} hold no supported format; expected one of {SUPPORTED} "
        "(or pass formatting_func= to map rows into one)"
    )


def _clean_part(part: Any, where: str) -> dict[str, Any]:
    """A content part with the None fields Arrow adds to mixed structs dropped."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise DataError(f"{where}: a content part must be a dict or a string, got {type(part).__name__}")
    p = {k: v for k, v in part.items() if v is not None}
    kind = p.get("type") or ("image" if "image" in p else "text" if "text" in p else None)
    if kind not in ("text", "image"):
        raise DataError(f"{where}: content part type {kind!r} is not supported (text or image)")
    p["type"] = kind
    if kind == "image":
        if "image" not in p:
            raise DataError(f"{where}: an image part needs its PIL image under 'image' (or the row an 'images' list)")
        p["image"] = _as_image(p["image"], where)
    if kind == "text" and not isinstance(p.get("text"), str):
        raise DataError(f"{where}: a text part needs a string under 'text'")
    return p


def _as_image(img: Any, where: str) -> Any:
    """A PIL image as it is; Arrow's undecoded {'bytes', 'path'} image dicts are opened."""
    if isinstance(img, dict) and (img.get("bytes") or img.get("path")):
        import io

        from PIL import Image

        return Image.open(io.BytesIO(img["bytes"]) if img.get("bytes") else img["path"])
    if isinstance(img, (str, bytes, dict)) or img is None:
        raise DataError(f"{where}: an image part holds {type(img).__name__}; expected a PIL image")
    return img


def _fill_images(turns: list[Any], images: list[Any]) -> list[Any]:
    """TRL's layout: image parts without the image, the images in a separate 'images' column."""
    it = iter(images)
    out = []
    for m in turns:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, (list, tuple)):
            parts = []
            for p in content:
                if isinstance(p, dict) and p.get("type") == "image" and p.get("image") is None:
                    p = dict(p, image=next(it, None))
                parts.append(p)
            m = dict(m, content=parts)
        out.append(m)
    return out


def _message(m: Any, where: str, sharegpt: bool) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise DataError(f"{where}: each turn must be a dict, got {type(m).__name__}")
    if sharegpt and "from" in m:
        role, content = m.get("from"), m.get("value")
        if role not in SHAREGPT_ROLES:
            raise DataError(f"{where}: ShareGPT 'from' {role!r} is not one of {sorted(SHAREGPT_ROLES)}")
        role = SHAREGPT_ROLES[role]
    else:
        role, content = m.get("role"), m.get("content")
        if sharegpt and role in SHAREGPT_ROLES:
            role = SHAREGPT_ROLES[role]
    if role not in ROLES:
        raise DataError(f"{where}: role {role!r} is not one of {ROLES}")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if isinstance(content, (list, tuple)):
        return {"role": role, "content": [_clean_part(p, where) for p in content]}
    raise DataError(f"{where}: {role} content must be a string or a list of parts, got {type(content).__name__}")


def normalize_row(row: Any, index: int, formatting_func: Callable | None = None) -> dict[str, Any]:
    """One row → {'kind': 'text', 'text'} | {'kind': 'chat', 'messages', 'train_from'} |
    {'kind': 'pc', 'prompt', 'completion'} (strings). `train_from` is the first message index
    whose assistant turns a completion-style dataset trains on."""
    where = f"dataset row {index}"
    if formatting_func is not None:
        row = formatting_func(row)
        if isinstance(row, str):
            row = {"text": row}
        elif isinstance(row, (list, tuple)) and row and isinstance(row[0], dict):
            row = {"messages": list(row)}
        if not isinstance(row, dict):
            raise DataError(f"{where}: formatting_func returned {type(row).__name__}; expected a str or a dict row")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a dict row, got {type(row).__name__}")
    fmt = check_columns(row.keys(), where)
    if fmt in ("messages", "conversations"):
        turns = row[fmt]
        if not isinstance(turns, (list, tuple)) or not turns:
            raise DataError(f"{where}: '{fmt}' must be a non-empty list of turns")
        if row.get("images"):
            turns = _fill_images(list(turns), list(row["images"]))
        msgs = [_message(m, f"{where} '{fmt}'[{i}]", sharegpt=fmt == "conversations") for i, m in enumerate(turns)]
        return {"kind": "chat", "messages": msgs, "train_from": 0}
    if fmt == "prompt_completion":
        p, c = row["prompt"], row["completion"]
        if isinstance(p, str) and isinstance(c, str):
            return {"kind": "pc", "prompt": p, "completion": c}
        if isinstance(p, (list, tuple)) and isinstance(c, (list, tuple)):
            msgs = [_message(m, f"{where} prompt/completion", sharegpt=True) for m in [*p, *c]]
            return {"kind": "chat", "messages": msgs, "train_from": len(p)}
        raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages")
    text = row["text"]
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    return {"kind": "text", "text": text}


def has_images(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m["content"], list) and any(p["type"] == "image" for p in m["content"]) for m in messages)


def images_of(messages: list[dict[str, Any]]) -> list[Any]:
    """The images of a chat, in the order they appear."""
    return [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]


def text_only(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Content part lists joined into strings, for tokenizers whose templates expect strings."""
    return [
        m if isinstance(m["content"], str)
        else {"role": m["role"], "content": "".join(p["text"] for p in m["content"] if p["type"] == "text")}
        for m in messages
    ]
