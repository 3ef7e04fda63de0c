"""The model classes `minift.load` returns: the decoder of `minift.arch` plus the methods users
call on a model, each delegating to the stage that owns it (lora/, export/). The arch classes
stay pure modelling code that knows nothing of adapters or files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import export, infer, lora
from ..arch import model as _model
from ..arch import vision as _vision
from ..arch.config import VISION_MODEL_TYPES, ModelConfig


class ModelAPI:
    """What a loaded minift model offers beyond `forward` (mixed into its class)."""

    lora_settings: lora.LoraSettings | None = None  # set by add_lora / load_adapter

    def save_adapter(self, save_dir: str | os.PathLike, *, overwrite: bool = False, tokenizer: Any = None) -> Path:
        """adapter_config.json + adapter_model.safetensors in PEFT's format, and the tokenizer /
        processor files (`tokenizer`'s, else those beside the source checkpoint), atomically."""
        return lora.save_adapter(self, save_dir, overwrite=overwrite, tokenizer=tokenizer)

    def save_merged(self, save_dir: str | os.PathLike, dtype: torch.dtype | str = torch.bfloat16, *,
                    overwrite: bool = False, max_shard_size: int | str = "5GB", tokenizer: Any = None) -> Path:
        """A complete transformers checkpoint with the adapters merged in float32 and cast once to
        `dtype` ("4bit": a bitsandbytes NF4 checkpoint); see `minift.export.save_merged`."""
        return export.save_merged(self, save_dir, dtype, overwrite=overwrite, max_shard_size=max_shard_size,
                                  tokenizer=tokenizer)

    def save_gguf(self, path: str | os.PathLike, quant: str | list[str] = "q8_0", *, tokenizer: Any = None,
                  overwrite: bool = False, modelfile: bool | str = False) -> Path | list[Path]:
        """llama.cpp GGUF file(s) with the adapters merged (+ mmproj for Gemma 3 vision, + an Ollama
        Modelfile with modelfile=); see `minift.export.save_gguf`."""
        return export.save_gguf(self, path, quant, tokenizer=tokenizer, overwrite=overwrite, modelfile=modelfile)

    def push_to_hub(self, repo_id: str, *, what: str = "adapter", quant: str | list[str] | None = None,
                    dtype: torch.dtype | str | None = None, token: str | None = None, private: bool = True,
                    tokenizer: Any = None, summary: Any = None, staging_dir: str | os.PathLike | None = None,
                    overwrite: bool = False, modelfile: bool | str = False, commit_message: str | None = None,
                    api: Any = None) -> str:
        """The adapter, merged checkpoint or GGUF(s), staged locally with a model card, uploaded to
        a hub repository; a failed upload keeps the staged folder. See `minift.export.push_to_hub`."""
        return export.push_to_hub(self, repo_id, what=what, quant=quant, dtype=dtype, token=token, private=private,
                                  tokenizer=tokenizer, summary=summary, staging_dir=staging_dir, overwrite=overwrite,
                                  modelfile=modelfile, commit_message=commit_message, api=api)

    def merge_lora(self) -> None:
        """Folds every adapter into its 16-bit base; the forward then skips them."""
        lora.merge_lora(self)

    def unmerge_lora(self) -> None:
        lora.unmerge_lora(self)

    def disable_adapters(self) -> Any:
        """The base model's outputs until `enable_adapters()`; also a context manager
        (`with model.disable_adapters(): ...`)."""
        return lora.disable_adapters(self)

    def enable_adapters(self) -> None:
        lora.enable_adapters(self)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """(batch, prompt + new) token ids, with transformers' argument names (max_new_tokens,
        do_sample, temperature, top_p, top_k, min_p, repetition_penalty, eos_token_id,
        stop_strings, tokenizer, seed, streamer; pixel_values / token_type_ids for images); see
        `minift.infer.generation.generate`."""
        return infer.generate_ids(self, input_ids, attention_mask, **kwargs)

    def set_fused_lora(self, fuse: bool) -> None:
        """Adapters through the fused custom ops (True) or plain matmuls (False); same function."""
        lora.set_fused(self, fuse)


class CausalLM(ModelAPI, _model.CausalLM):
    """A Llama / Mistral / Gemma / Gemma 2 / Gemma 3 text model as `minift.load` returns it."""


class Gemma3VisionLM(ModelAPI, _vision.Gemma3VisionLM):
    """A Gemma 3 vision-language model as `minift.load` returns it."""


def build_model(cfg: dict[str, Any], *, text_only: bool = False) -> nn.Module:
    """The model for a config.json dict (call under `torch.device('meta')`); `text_only` builds
    just the language model of a vision checkpoint."""
    if cfg["model_type"] in VISION_MODEL_TYPES:
        if text_only:
            return CausalLM(ModelConfig.from_hf(_vision.gemma3_text_config(cfg), source="config.json text_config"))
        return Gemma3VisionLM(_vision.VisionLMConfig.from_hf(cfg))
    return CausalLM(ModelConfig.from_hf(cfg))
