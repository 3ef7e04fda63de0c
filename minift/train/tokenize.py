"""Canonical rows → token ids and labels, with responses-only masking by incremental rendering.

Why incremental rendering: a chat template is opaque Jinja, so the only robust way to know where
an assistant turn sits is to ask the template itself. For assistant turn i, the conversation up
to i rendered with the generation prompt ends exactly where the turn's content starts, and the
conversation through i ends where the turn (with its end-of-turn token) ends. Those character
positions are mapped to tokens through the tokenizer's offsets (or, for slow tokenizers and
processors, by tokenising the prefixes), so BPE merges across boundaries cannot shift them.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DataError
from ..templates import is_processor
from .formats import has_images, images_of, text_only

IGNORE = -100


@dataclass
class Example:
    """One tokenised example. labels are input_ids with -100 where no loss is taken (unshifted:
    the model predicts labels[t+1] at position t). An example with images holds their pixels as
    `pixel_loader`, run when a batch is collated: a processed 896x896 image is 9.6 MB of float32,
    so a dataset's worth (the Gemma 3 vision notebook's 68k rows: ~660 GB) cannot be kept."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None
    truncated: bool = False
    position_ids: torch.Tensor | None = None  # packed rows only: restarts at 0 per sequence
    pixel_loader: Callable[[], torch.Tensor] | None = None  # the processor's pixel_values, made on demand
    n_images: int = 0  # images the vision tower sees (pan-and-scan crops included)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def pixels(self) -> torch.Tensor | None:
        """The example's pixel_values (None without images)."""
        if self.pixel_values is not None or self.pixel_loader is None:
            return self.pixel_values
        return self.pixel_loader()

    @property
    def n_targets(self) -> int:
        """Tokens the loss is taken on (labels[1:], since position 0 is never predicted)."""
        return int((self.labels[1:] != IGNORE).sum())


@dataclass
class Encoder:
    """Tokenises canonical rows for one tokenizer or processor."""

    tokenizer: Any
    processor: Any = None
    max_length: int = 2048
    responses_only: bool = False
    stats: dict[str, int] = field(default_factory=lambda: {"truncated": 0, "dropped_images_too_long": 0})
    # pixels are made on the Trainer's collate thread too: one processor call at a time (_process)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.has_offsets = bool(getattr(self.tokenizer, "is_fast", False))

    # -- rendering -----------------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        owner = self.processor if self.processor is not None else self.tokenizer
        if getattr(owner, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError(
                "the tokenizer has no chat template, so 'messages'/'conversations' rows cannot be rendered; "
                "set tokenizer.chat_template or give a 'text' column"
            )
        msgs = messages if self.processor is not None else text_only(messages)
        try:
            return owner.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except DataError:
            raise
        except Exception as e:  # jinja raises TemplateError, templates raise their own messages
            raise DataError(f"the chat template failed to render a conversation: {e}") from e

    def assistant_spans(self, messages: list[dict[str, Any]], full: str, train_from: int) -> list[tuple[int, int, int]]:
        """(start char, end char, message index) of each trained assistant turn in `full`."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < train_from:
                continue
            try:
                pre = self.render(messages[:i], generation_prompt=True)
                thru = self.render(messages[: i + 1])
            except DataError:
                pre = thru = None
            if pre is not None and thru is not None and full.startswith(thru) and thru.startswith(pre):
                spans.append((len(pre), len(thru), i))
                continue
            # Templates that rewrite earlier turns (or refuse a prefix): find the content itself.
            content = m["content"] if isinstance(m["content"], str) else "".join(
                p["text"] for p in m["content"] if p["type"] == "text")
            content = content.strip()
            start = spans[-1][1] if spans else 0
            k = full.find(content, start) if content else -1
            if k < 0 or self.processor is not None:
                raise DataError(
                    f"assistant turn {i} could not be located in the rendered conversation: the chat template does "
                    "not render prefixes of the conversation consistently (template mismatch); "
                    "train_on_responses_only needs a template that renders turns in order"
                )
            spans.append((k, k + len(content), i))
        return spans

    # -- tokenisation --------------------------------------------------------------------
    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _label_chat_text(self, full: str, spans: list[tuple[int, int, int]]) -> tuple[list[int], list[int]]:
        if self.has_offsets:
            enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            ids, offs = enc["input_ids"], enc["offset_mapping"]
            labels = [IGNORE] * len(ids)
            j = 0
            for s, e, _ in spans:  # token overlaps the span: it carries some of the turn
                while j < len(ids) and offs[j][1] <= s:
                    j += 1
                while j < len(ids) and offs[j][0] < e:
                    if offs[j][1] > offs[j][0]:
                        labels[j] = ids[j]
                    j += 1
            return ids, labels
        ids = self._ids(full, False)
        labels = [IGNORE] * len(ids)
        for s, e, _ in spans:
            a, b = len(self._ids(full[:s], False)), len(self._ids(full[:e], False))
            labels[a:b] = ids[a:b]
        return ids, labels

    def encode(self, row: dict[str, Any], images: Callable[[], list[Any]] | None = None,
               where: str = "a dataset row") -> Example | None:
        """A canonical row (see formats.normalize_row) → Example; None when dropped. `images`: gets
        the row's images again when its pixels are needed (the Trainer reads them back from the
        dataset, so decoded images are not held either); None: the row's own image objects.
        `where` names the row in the error an image that cannot be processed raises then."""
        kind = row["kind"]
        if kind == "text":
            if self.responses_only:
                raise DataError(
                    "train_on_responses_only needs 'messages', 'conversations' or 'prompt'/'completion' rows; "
                    "plain 'text' rows do not say where responses are"
                )
            ids = self._append_eos(self._ids(row["text"], True))
            labels = list(ids)
        elif kind == "pc":
            p = self._ids(row["prompt"], True)
            c = self._append_eos(self._ids(row["completion"], False))
            ids = p + c
            labels = ([IGNORE] * len(p) if self.responses_only else list(p)) + list(c)
        else:
            msgs = row["messages"]
            if has_images(msgs):
                if self.processor is None:
                    raise DataError(
                        "a row holds images but a tokenizer, not a processor, was given; load a vision checkpoint "
                        "(minift.load returns its processor) and pass the processor to the Trainer"
                    )
                return self._encode_vision(row, images, where)
            full = self.render(msgs)
            if self.responses_only:
                ids, labels = self._label_chat_text(full, self.assistant_spans(msgs, full, row["train_from"]))
            else:
                ids = self._ids(full, False)
                labels = list(ids)
        return self._finish(ids, labels)

    def _append_eos(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids

    def _finish(self, ids, labels, token_type_ids=None, pixel_loader=None, n_images: int = 0) -> Example:
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        lab_t = torch.as_tensor(labels, dtype=torch.long)
        tt = None if token_type_ids is None else torch.as_tensor(token_type_ids, dtype=torch.long)
        truncated = len(ids_t) > self.max_length
        if truncated:
            self.stats["truncated"] += 1
            ids_t, lab_t = ids_t[: self.max_length], lab_t[: self.max_length]
            tt = None if tt is None else tt[: self.max_length]
        return Example(ids_t, lab_t, None, tt, truncated, pixel_loader=pixel_loader, n_images=n_images)

    # -- vision --------------------------------------------------------------------------
    def _process(self, text: str, images: list[Any]) -> dict[str, torch.Tensor]:
        kw: dict[str, Any] = dict(text=[text], return_tensors="pt", add_special_tokens=False)
        if images:
            kw["images"] = [images]
        with self._lock:
            return self.processor(**kw)

    def _image_text(self) -> tuple[str, str, frozenset[int]] | None:
        """(placeholder, expansion, image token ids) when this processor turns each image
        placeholder into one fixed string whatever the image (Gemma 3's `full_image_sequence`,
        without pan-and-scan), checked against the processor itself on a small and a wide image;
        None otherwise. With it, a row's tokens come from its text alone, and its images are
        processed only when a batch needs their pixels (~16 ms an 896x896 image on a CPU core)."""
        if "_image_text_cache" in self.__dict__:
            return self.__dict__["_image_text_cache"]
        found = None
        ph = getattr(self.processor, "image_token", None) or getattr(self.processor, "boi_token", None)
        exp = getattr(self.processor, "full_image_sequence", None)
        crops = getattr(getattr(self.processor, "image_processor", None), "do_pan_and_scan", None)
        if isinstance(ph, str) and isinstance(exp, str) and ph and not crops:  # crops depend on each image's size
            try:
                from PIL import Image

                text, want = f"a{ph} b", self._ids(f"a{exp} b", False)
                image_ids: set[int] = set()
                for size in ((32, 32), (1792, 448)):  # a wide image is what pan-and-scan would crop
                    out = self._process(text, [Image.new("RGB", size, (127, 127, 127))])
                    ids = out["input_ids"][0].tolist()
                    if ids != want:
                        break
                    tt = out.get("token_type_ids")
                    image_ids |= ({i for i, t in zip(ids, tt[0].tolist()) if t == 1} if tt is not None
                                  else {self.image_token_id()})
                else:
                    found = (ph, exp, frozenset(image_ids))
            except Exception:  # a processor this probe does not fit: process every row
                found = None
        self.__dict__["_image_text_cache"] = found
        return found

    def _vision_ids(self, text: str, images: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(input_ids, token_type_ids or None, images the tower sees) of `text` with `images`."""
        fast = self._image_text()
        if fast is not None:
            ph, exp, image_ids = fast
            if text.count(ph) != len(images):
                raise DataError(f"a row's text holds {text.count(ph)} image placeholders ({ph!r}) for "
                                f"{len(images)} images; each image needs one")
            ids = torch.as_tensor(self._ids(text.replace(ph, exp), False), dtype=torch.long)
            tt = torch.isin(ids, torch.as_tensor(sorted(image_ids), dtype=torch.long)).long()
            return ids, tt, len(images)
        out = self._process(text, images)
        pv = out.get("pixel_values")
        tt = out.get("token_type_ids")
        return out["input_ids"][0], None if tt is None else tt[0], 0 if pv is None else int(pv.shape[0])

    def _pixels(self, text: str, images: Callable[[], list[Any]], where: str) -> torch.Tensor:
        try:
            return self._process(text, images())["pixel_values"]
        except DataError:
            raise
        except Exception as e:  # PIL, numpy or the processor: a corrupt or unreadable image
            raise DataError(f"{where}: its images could not be processed when its batch was collated: "
                            f"{type(e).__name__}: {e}") from e

    def _encode_vision(self, row: dict[str, Any], fetch: Callable[[], list[Any]] | None = None,
                       where: str = "a dataset row") -> Example | None:
        msgs = row["messages"]
        full = self.render(msgs)
        images = images_of(msgs)
        ids, tt, n_images = self._vision_ids(full, images)
        if self.responses_only:
            # Token positions of each span from the prefixes (with their images), since the
            # processor expands every image placeholder into many tokens.
            labels = torch.full_like(ids, IGNORE)
            for s, e, i in self.assistant_spans(msgs, full, row["train_from"]):
                a = len(self._vision_ids(full[:s], images_of(msgs[:i]))[0])
                b = len(self._vision_ids(full[:e], images_of(msgs[: i + 1]))[0])
                labels[a:b] = ids[a:b]
        else:
            labels = ids.clone()
        if tt is None:
            tt = (ids == self.image_token_id()).long()
        if n_images:
            labels = labels.masked_fill(tt == 1, IGNORE)  # image tokens are never targets
        if len(ids) > self.max_length and bool((tt[self.max_length:] == 1).any()):
            self.stats["dropped_images_too_long"] += 1  # cutting inside an image would break the model
            return None
        if fetch is None:
            def fetch(kept: list[Any] = images) -> list[Any]:
                return kept
        loader = functools.partial(self._pixels, full, fetch, where) if n_images else None
        return self._finish(ids, labels, tt, loader, n_images)

    def image_token_id(self) -> int:
        tok = getattr(self.processor, "image_token_id", None)
        if tok is None:
            tok = self.tokenizer.convert_tokens_to_ids(getattr(self.processor, "image_token", "<image_soft_token>"))
        return int(tok)


def make_encoder(tokenizer_or_processor: Any, *, max_length: int, responses_only: bool) -> Encoder:
    """An Encoder for a tokenizer, or a processor (which carries its tokenizer)."""
    if is_processor(tokenizer_or_processor):
        return Encoder(tokenizer_or_processor.tokenizer, tokenizer_or_processor, max_length, responses_only)
    return Encoder(tokenizer_or_processor, None, max_length, responses_only)
