"""The bottom of the pipeline: where files come from and how they are named.

hub (hub ids, local directories, the HF cache), names (bnb-4bit ↔ 16-bit twin ids), weights
(safetensors reading), keys (checkpoint and PEFT names ↔ minift's), files (JSON configs, the
atomic directory writer, tokenizer files), info (what a load recorded)."""

from .files import atomic_dir, parse_size, read_json_object, write_tokenizer_files
from .hub import HUB_PATTERNS, is_hub_id, resolve_path
from .info import LoadInfo
from .names import map_name
from .weights import iter_tensors, weight_files

__all__ = [
    "atomic_dir", "parse_size", "read_json_object", "write_tokenizer_files", "HUB_PATTERNS", "is_hub_id",
    "resolve_path", "LoadInfo", "map_name", "iter_tensors", "weight_files",
]
