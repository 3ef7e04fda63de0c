"""What `minift.load` records about where a model came from (read by saving, export and training)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoadInfo:
    """name_or_path: the hub id (after the pre-quantised twin map) or the absolute path of the local
    directory loaded, written as an adapter's `base_model_name_or_path`. source_path: the local directory the files came from
    (a hub snapshot or the user's directory; tokenizer files and generation_config.json are copied
    from it). revision: the hub revision asked for. text_of_vision: the language half of a Gemma 3
    vision checkpoint loaded alone (`text_only=True`), so adapters are named as on the full model.
    quantization: "nf4" for a 4-bit base, None for 16-bit. prequantized: the checkpoint was a
    bitsandbytes 4-bit one. max_seq_length: the Trainer's default maximum length."""

    name_or_path: str | None = None
    source_path: Path | None = None
    revision: str | None = None
    text_of_vision: bool = False
    quantization: str | None = None
    prequantized: bool = False
    max_seq_length: int | None = None
