"""The bottom of the pipeline: where files come from and how they are named.

hub (hub ids, local directories, the HF cache), names (bnb-4bit ↔ 16-bit twin ids), weights
(safetensors reading), keys (checkpoint and PEFT names ↔ minift's), files (JSON configs, the
atomic directory writer, tokenizer files), info (what a load recorded)."""

from .files import (
    MANIFEST, atomic_dir, finish_tree, foreign_files, parse_size, read_json_object, remove_dir, remove_stale,
    write_tokenizer_files,
)
from .hub import HUB_PATTERNS, base_name, is_hub_id, is_local_path, resolve_path
from .info import LoadInfo
from .names import map_name
from .weights import iter_tensors, weight_files

__all__ = [
    "MANIFEST", "atomic_dir", "finish_tree", "foreign_files", "parse_size", "read_json_object", "remove_dir",
    "remove_stale", "write_tokenizer_files", "HUB_PATTERNS", "base_name", "is_hub_id", "is_local_path", "resolve_path", "LoadInfo", "map_name", "iter_tensors", "weight_files",
]
