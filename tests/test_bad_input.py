"""A catalogue of bad input to every public entry point: minift.load, add_lora, load_adapter,
save_adapter and save_merged (model.generate's arguments are in test_generate.py). Each row
asserts the MiniftError subclass raised and that the message names the argument (or file, field)
at fault; nothing may escape as a bare TypeError / AttributeError / AssertionError."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import minift
from minift import errors
from minift.lora import LoraLinear
from minift.testing import write_tiny_checkpoint, write_tiny_gemma3_vision

E = errors


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bad_input") / "llama", "llama", tie_word_embeddings=False)


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    """The same family with one layer more (an adapter of `ckpt` covers only part of it)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bad_input") / "deep", "llama", num_hidden_layers=3,
                                 tie_word_embeddings=False)


@pytest.fixture(scope="module")
def adapter(ckpt, tmp_path_factory) -> Path:
    """A minift adapter on q_proj and v_proj of every layer (r=4)."""
    model, _ = minift.load(ckpt)
    minift.add_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"])
    return model.save_adapter(tmp_path_factory.mktemp("bad_input") / "adapter")


@dataclass
class Ctx:
    tmp: Path
    ckpt: Path
    deep: Path
    adapter: Path

    def model(self):
        return minift.load(self.ckpt)[0]

    def lora(self):
        m = self.model()
        minift.add_lora(m, r=4, targets=["q_proj", "v_proj"])
        return m

    def edited(self, config: dict[str, Any] | None = None, tensors: Callable[[dict], None] | None = None) -> Path:
        """A copy of the adapter with adapter_config.json fields replaced and/or its tensors edited."""
        from safetensors.torch import load_file, save_file

        d = self.tmp / "edited"
        shutil.copytree(self.adapter, d)
        if config:
            cfg = json.loads((d / "adapter_config.json").read_text())
            cfg.update(config)
            (d / "adapter_config.json").write_text(json.dumps(cfg))
        if tensors:
            f = d / "adapter_model.safetensors"
            sd = load_file(str(f))
            tensors(sd)
            save_file(sd, str(f))
        return d

    def no_tokenizer(self, corrupt_weights: bool = False) -> Path:
        d = self.tmp / "notok"
        shutil.copytree(self.ckpt, d)
        for f in d.iterdir():
            if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                f.unlink()
        if corrupt_weights:  # the tokenizer is checked first: these weights are never read
            (d / "model.safetensors").write_bytes(b"garbage")
        return d


def drop_v(sd: dict) -> None:
    for k in [k for k in sd if "v_proj" in k]:
        del sd[k]


def drop_layer1(sd: dict) -> None:
    for k in [k for k in sd if ".layers.1." in k]:
        del sd[k]


def add_k(sd: dict) -> None:
    a = next(v for k, v in sd.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    b = next(v for k, v in sd.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    sd["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = a.clone()
    sd["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] = b.clone()  # (64, r): k_proj has 32 outputs


def int_tensor(sd: dict) -> None:
    k = next(k for k in sd if "lora_B" in k)
    sd[k] = sd[k].to(torch.int32)


def magnitude(sd: dict) -> None:
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)


def full_dir(c: Ctx) -> Path:
    d = c.tmp / "full"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    return d


def a_file(c: Ctx) -> Path:
    f = c.tmp / "file"
    f.write_text("x")
    return f


L = minift.load
CUDA = torch.cuda.is_available()

# (id, call taking a Ctx, expected class, texts the message must contain)
CASES: list[tuple[str, Callable[[Ctx], Any], type, tuple[str, ...]]] = [
    # ---- minift.load --------------------------------------------------------------------------
    ("load name_or_path int", lambda c: L(3), E.ConfigError, ("name_or_path", "int")),
    ("load name_or_path empty", lambda c: L(""), E.ConfigError, ("name_or_path", "empty")),
    ("load name_or_path None", lambda c: L(None), E.ConfigError, ("name_or_path",)),
    ("load relative ./ path missing", lambda c: L("./no/such"), E.ConfigError, ("./no/such", "no such directory")),
    ("load deep relative path missing", lambda c: L("outputs/run/final"), E.ConfigError, ("no such directory",)),
    ("load ~ path missing", lambda c: L("~/no-such-minift-dir"), E.ConfigError, ("no such directory",)),
    ("load Path missing", lambda c: L(c.tmp / "x" / "y"), E.ConfigError, ("no such directory",)),
    ("load a file", lambda c: L(c.ckpt / "config.json"), E.ConfigError, ("is a file",)),
    ("load dtype name", lambda c: L(c.ckpt, dtype="float17"), E.InputError, ("dtype", "float17", "bfloat16")),
    ("load dtype int", lambda c: L(c.ckpt, dtype=torch.int8), E.InputError, ("dtype", "torch.int8")),
    ("load dtype type", lambda c: L(c.ckpt, dtype=16), E.InputError, ("dtype", "16")),
    ("load device name", lambda c: L(c.ckpt, device="gpu"), E.InputError, ("device", "'gpu'")),
    ("load device meta", lambda c: L(c.ckpt, device="meta"), E.InputError, ("device", "meta")),
    ("load device bool", lambda c: L(c.ckpt, device=True), E.InputError, ("device",)),
    ("load device list", lambda c: L(c.ckpt, device=["cpu"]), E.InputError, ("device",)),
    ("load device cuda index", lambda c: L(c.ckpt, device="cuda:99"), E.InputError, ("device", "cuda")),
    ("load max_seq_length 1", lambda c: L(c.ckpt, max_seq_length=1), E.InputError, ("max_seq_length", ">= 2")),
    ("load max_seq_length str", lambda c: L(c.ckpt, max_seq_length="2048"), E.InputError, ("max_seq_length",)),
    ("load max_seq_length bool", lambda c: L(c.ckpt, max_seq_length=True), E.InputError, ("max_seq_length",)),
    ("load revision int", lambda c: L(c.ckpt, revision=3), E.InputError, ("revision",)),
    ("load revision empty", lambda c: L(c.ckpt, revision=""), E.InputError, ("revision",)),
    ("load token int", lambda c: L(c.ckpt, token=3), E.InputError, ("token",)),
    *[(f"load {flag} not bool", (lambda flag: lambda c: L(c.ckpt, **{flag: "yes"}))(flag), E.InputError, (flag, "True or False"))
      for flag in ("load_in_4bit", "text_only", "full_finetuning", "quantize_vision", "use_name_map",
                   "trust_remote_code")],
    ("load text_only on a text model", lambda c: L(c.ckpt, text_only=True), E.InputError, ("text_only", "llama")),
    ("load full_finetuning with 4-bit", lambda c: L(c.ckpt, full_finetuning=True, load_in_4bit=True),
     E.QuantizationError, ("full_finetuning", "load_in_4bit")),
    ("load no tokenizer", lambda c: L(c.no_tokenizer()), E.ConfigError, ("tokenizer", "tokenizer.json", "model.safetensors")),
    ("load no tokenizer: checked before the weights", lambda c: L(c.no_tokenizer(corrupt_weights=True)),
     E.ConfigError, ("tokenizer",)),
    # ---- add_lora -------------------------------------------------------------------------------
    ("add_lora model", lambda c: minift.add_lora("model"), E.AdapterError, ("model", "minift.load")),
    ("add_lora r 0", lambda c: minift.add_lora(c.model(), r=0), E.AdapterError, ("r:",)),
    ("add_lora r float", lambda c: minift.add_lora(c.model(), r=2.5), E.AdapterError, ("r:",)),
    ("add_lora r bool", lambda c: minift.add_lora(c.model(), r=True), E.AdapterError, ("r:",)),
    ("add_lora alpha 0", lambda c: minift.add_lora(c.model(), alpha=0), E.AdapterError, ("alpha",)),
    ("add_lora alpha str", lambda c: minift.add_lora(c.model(), alpha="8"), E.AdapterError, ("alpha",)),
    ("add_lora alpha nan", lambda c: minift.add_lora(c.model(), alpha=float("nan")), E.AdapterError, ("alpha",)),
    ("add_lora dropout 1", lambda c: minift.add_lora(c.model(), dropout=1.0), E.AdapterError, ("dropout",)),
    ("add_lora dropout bool", lambda c: minift.add_lora(c.model(), dropout=True), E.AdapterError, ("dropout",)),
    ("add_lora dropout str", lambda c: minift.add_lora(c.model(), dropout="0.1"), E.AdapterError, ("dropout",)),
    ("add_lora targets int", lambda c: minift.add_lora(c.model(), targets=3), E.AdapterError, ("targets",)),
    ("add_lora targets empty", lambda c: minift.add_lora(c.model(), targets=[]), E.AdapterError, ("targets",)),
    ("add_lora targets mixed", lambda c: minift.add_lora(c.model(), targets=["q_proj", 3]), E.AdapterError,
     ("targets",)),
    ("add_lora targets regex", lambda c: minift.add_lora(c.model(), targets="(q_proj"), E.AdapterError,
     ("targets", "regular expression")),
    ("add_lora targets unknown", lambda c: minift.add_lora(c.model(), targets=["nope"]), E.AdapterError, ("nope",)),
    *[(f"add_lora {flag} not bool", (lambda flag: lambda c: minift.add_lora(c.model(), **{flag: "yes"}))(flag),
       E.AdapterError, (flag, "True or False"))
      for flag in ("vision", "language", "attention", "mlp", "rslora", "dora", "fuse")],
    ("add_lora init", lambda c: minift.add_lora(c.model(), init="olora"), E.AdapterError, ("init", "olora")),
    ("add_lora modules_to_save str", lambda c: minift.add_lora(c.model(), modules_to_save="lm_head"), E.AdapterError,
     ("modules_to_save",)),
    ("add_lora modules_to_save int", lambda c: minift.add_lora(c.model(), modules_to_save=[3]), E.AdapterError,
     ("modules_to_save",)),
    ("add_lora modules_to_save unknown", lambda c: minift.add_lora(c.model(), modules_to_save=["nope"]),
     E.AdapterError, ("modules_to_save", "nope")),
    ("add_lora seed str", lambda c: minift.add_lora(c.model(), seed="1"), E.AdapterError, ("seed",)),
    ("add_lora seed negative", lambda c: minift.add_lora(c.model(), seed=-1), E.AdapterError, ("seed",)),
    ("add_lora twice", lambda c: minift.add_lora(c.lora()), E.AdapterError, ("already has adapters",)),
    # ---- load_adapter ---------------------------------------------------------------------------
    ("load_adapter model", lambda c: minift.load_adapter(None, c.adapter), E.AdapterError, ("model",)),
    ("load_adapter adapter_dir int", lambda c: minift.load_adapter(c.model(), 3), E.AdapterError, ("adapter_dir",)),
    ("load_adapter adapter_dir empty", lambda c: minift.load_adapter(c.model(), ""), E.AdapterError,
     ("adapter_dir",)),
    ("load_adapter fuse", lambda c: minift.load_adapter(c.model(), c.adapter, fuse="yes"), E.AdapterError, ("fuse",)),
    ("load_adapter strict", lambda c: minift.load_adapter(c.model(), c.adapter, strict=None), E.AdapterError,
     ("strict",)),
    ("load_adapter missing", lambda c: minift.load_adapter(c.model(), c.tmp / "nope"), E.AdapterError,
     ("nope", "no such adapter directory")),
    ("load_adapter no config", lambda c: minift.load_adapter(c.model(), c.tmp), E.AdapterError,
     ("adapter_config.json",)),
    ("load_adapter on adapters", lambda c: minift.load_adapter(c.lora(), c.adapter), E.AdapterError,
     ("already has adapters",)),
    ("load_adapter r vs tensors", lambda c: minift.load_adapter(c.model(), c.edited({"r": 8})), E.AdapterError,
     ("rank 8", "rank 4", "scaling")),
    ("load_adapter rank_pattern vs tensors",
     lambda c: minift.load_adapter(c.model(), c.edited({"rank_pattern": {"v_proj": 2}})), E.AdapterError,
     ("v_proj", "rank_pattern")),
    ("load_adapter rank_pattern type", lambda c: minift.load_adapter(c.model(), c.edited({"rank_pattern": {"q": "x"}})),
     E.AdapterError, ("rank_pattern",)),
    ("load_adapter lora_alpha", lambda c: minift.load_adapter(c.model(), c.edited({"lora_alpha": "8"})),
     E.AdapterError, ("lora_alpha",)),
    ("load_adapter lora_alpha 0", lambda c: minift.load_adapter(c.model(), c.edited({"lora_alpha": 0})),
     E.AdapterError, ("lora_alpha",)),
    ("load_adapter lora_dropout", lambda c: minift.load_adapter(c.model(), c.edited({"lora_dropout": 2})),
     E.AdapterError, ("lora_dropout",)),
    ("load_adapter use_dora type", lambda c: minift.load_adapter(c.model(), c.edited({"use_dora": "yes"})),
     E.AdapterError, ("use_dora",)),
    ("load_adapter use_dora without magnitudes", lambda c: minift.load_adapter(c.model(), c.edited({"use_dora": True})),
     E.AdapterError, ("lora_magnitude_vector",)),
    ("load_adapter magnitudes without use_dora", lambda c: minift.load_adapter(c.model(), c.edited(tensors=magnitude)),
     E.AdapterError, ("use_dora", "lora_magnitude_vector")),
    ("load_adapter target_modules type", lambda c: minift.load_adapter(c.model(), c.edited({"target_modules": 3})),
     E.AdapterError, ("target_modules",)),
    ("load_adapter target_modules regex", lambda c: minift.load_adapter(c.model(), c.edited({"target_modules": "(q"})),
     E.AdapterError, ("target_modules", "regular expression")),
    ("load_adapter targets without tensors", lambda c: minift.load_adapter(c.model(), c.edited(tensors=drop_v)),
     E.AdapterError, ("target_modules", "v_proj", "no weights", "strict=False")),
    ("load_adapter tensors outside targets",
     lambda c: minift.load_adapter(c.model(), c.edited({"target_modules": ["q_proj"]})), E.AdapterError,
     ("does not select", "v_proj")),
    ("load_adapter layers_to_transform", lambda c: minift.load_adapter(c.model(), c.edited({"layers_to_transform": [0]})),
     E.AdapterError, ("model.layers.1.self_attn.q_proj", "does not select")),
    ("load_adapter layers_to_transform type",
     lambda c: minift.load_adapter(c.model(), c.edited({"layers_to_transform": "0"})), E.AdapterError,
     ("layers_to_transform",)),
    ("load_adapter a layer missing", lambda c: minift.load_adapter(c.model(), c.edited(tensors=drop_layer1)),
     E.AdapterError, ("model.layers.1.self_attn.q_proj", "no weights")),
    ("load_adapter onto a deeper model", lambda c: minift.load_adapter(minift.load(c.deep)[0], c.adapter),
     E.AdapterError, ("model.layers.2.self_attn.q_proj", "fewer layers", "strict=False")),
    ("load_adapter shapes", lambda c: minift.load_adapter(c.model(), c.edited(tensors=add_k)), E.AdapterError,
     ("k_proj", "does not fit")),
    ("load_adapter dtype", lambda c: minift.load_adapter(c.model(), c.edited(tensors=int_tensor)), E.AdapterError,
     ("dtype", "floating point")),
    ("load_adapter peft_type", lambda c: minift.load_adapter(c.model(), c.edited({"peft_type": "IA3"})),
     E.AdapterError, ("peft_type",)),
    # ---- save_adapter ---------------------------------------------------------------------------
    ("save_adapter model", lambda c: minift.save_adapter(object(), c.tmp / "o"), E.AdapterError, ("model",)),
    ("save_adapter no adapters", lambda c: minift.save_adapter(c.model(), c.tmp / "o"), E.AdapterError,
     ("no adapters",)),
    ("save_adapter save_dir int", lambda c: c.lora().save_adapter(3), E.AdapterError, ("save_dir",)),
    ("save_adapter save_dir empty", lambda c: c.lora().save_adapter(""), E.AdapterError, ("save_dir",)),
    ("save_adapter overwrite", lambda c: c.lora().save_adapter(c.tmp / "o", overwrite="yes"), E.AdapterError,
     ("overwrite",)),
    ("save_adapter tokenizer", lambda c: c.lora().save_adapter(c.tmp / "o", tokenizer="tok"), E.AdapterError,
     ("tokenizer", "save_pretrained")),
    ("save_adapter onto a file", lambda c: c.lora().save_adapter(a_file(c)), E.AdapterError, ("not a directory",)),
    ("save_adapter not empty", lambda c: c.lora().save_adapter(full_dir(c)), E.AdapterError,
     ("not empty", "overwrite=True")),
    ("save_adapter overwrite foreign files", lambda c: c.lora().save_adapter(full_dir(c), overwrite=True),
     E.AdapterError, ("notes.txt", "only what minift wrote")),
    # ---- save_merged ----------------------------------------------------------------------------
    ("save_merged model", lambda c: minift.save_merged("m", c.tmp / "o"), E.AdapterError, ("model",)),
    ("save_merged save_dir", lambda c: minift.save_merged(c.lora(), None), E.AdapterError, ("save_dir",)),
    ("save_merged overwrite", lambda c: minift.save_merged(c.lora(), c.tmp / "o", overwrite=1), E.AdapterError,
     ("overwrite",)),
    ("save_merged tokenizer", lambda c: minift.save_merged(c.lora(), c.tmp / "o", tokenizer=3), E.AdapterError,
     ("tokenizer",)),
    ("save_merged dtype name", lambda c: minift.save_merged(c.lora(), c.tmp / "o", "int8"), E.AdapterError,
     ("dtype", "int8")),
    ("save_merged dtype int", lambda c: minift.save_merged(c.lora(), c.tmp / "o", torch.int8), E.AdapterError,
     ("dtype",)),
    ("save_merged dtype type", lambda c: minift.save_merged(c.lora(), c.tmp / "o", 16), E.AdapterError, ("dtype",)),
    *[(f"save_merged max_shard_size {v!r}", (lambda v: lambda c: minift.save_merged(c.lora(), c.tmp / "o",
                                                                                     max_shard_size=v))(v),
       E.AdapterError, ("max_shard_size",)) for v in ("5XB", "", 0, -1, True, 1.5, None)],
    ("save_merged not empty", lambda c: minift.save_merged(c.lora(), full_dir(c)), E.AdapterError, ("not empty",)),
    ("save_merged overwrite foreign files", lambda c: minift.save_merged(c.lora(), full_dir(c), overwrite=True),
     E.AdapterError, ("notes.txt",)),
]

if CUDA:  # the CUDA-less case can only be checked without CUDA
    CASES = [c for c in CASES if c[0] != "load device cuda index"]
else:
    CASES.append(("load device cuda without CUDA", lambda c: L(c.ckpt, device="cuda"), E.InputError,
                  ("device='cuda'", "CUDA is not available", "device='cpu'")))


@pytest.mark.parametrize("call, cls, texts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, cls, texts, tmp_path, ckpt, deep, adapter):
    ctx = Ctx(tmp_path, ckpt, deep, adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bad input is an error, not a warning
        with pytest.raises(cls) as info:
            call(ctx)
    assert isinstance(info.value, errors.MiniftError), type(info.value)
    for t in texts:
        assert t in str(info.value), f"{t!r} not in: {info.value}"


def test_failed_load_adapter_changes_nothing(ckpt, tmp_path, adapter):
    ctx = Ctx(tmp_path, ckpt, ckpt, adapter)
    model = ctx.model()
    with pytest.raises(errors.AdapterError):
        minift.load_adapter(model, ctx.edited({"r": 8}))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    minift.load_adapter(model, adapter)  # and the model still takes a good one


def test_partial_adapter_loads_with_strict_false(ckpt, deep, adapter, tmp_path):
    """An adapter covering only some of the layers its target_modules selects (here: trained on a
    shallower model) loads with strict=False, warning; the modules without weights stay plain, and
    a re-save names exactly the adapted modules."""
    model, _ = minift.load(deep)
    with pytest.warns(UserWarning, match=r"model\.layers\.2\.self_attn\.q_proj.*strict=False"):
        minift.load_adapter(model, adapter, strict=False)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLinear))
    assert len(adapted) == 4 and not any(".layers.2." in n for n in adapted)
    out = model.save_adapter(tmp_path / "again")
    cfg = json.loads((out / "adapter_config.json").read_text())
    again, _ = minift.load(deep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minift.load_adapter(again, out)  # self-consistent: strict loading passes
    assert cfg["target_modules"] != ["q_proj", "v_proj"]


def test_hub_id_neither_local_nor_on_the_hub(tmp_path, monkeypatch):
    """'org/name' with no such directory goes to the hub; the error names both places looked in."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.HubError) as info:
        minift.load("outputs/final")
    msg = str(info.value)
    assert "Hugging Face cache" in msg and "local directory" in msg and str(tmp_path / "outputs" / "final") in msg


def test_relative_local_path_is_never_a_hub_id(ckpt, tmp_path, monkeypatch):
    """A relative 'org/name'-shaped path that exists is the local directory (no hub call); adapters
    record the absolute path of a local base, so PEFT finds it from any working directory."""
    (tmp_path / "outputs").mkdir()
    shutil.copytree(ckpt, tmp_path / "outputs" / "final")
    monkeypatch.chdir(tmp_path)

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "HfApi", no_hub)
    model, _ = minift.load("outputs/final")
    assert model.load_info.name_or_path == str(tmp_path / "outputs" / "final")
    minift.add_lora(model, r=2)
    out = model.save_adapter("ad")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "outputs" / "final")


def test_vision_checkpoint_without_processor_config(tmp_path):
    d = write_tiny_gemma3_vision(tmp_path / "v")
    for name in ("preprocessor_config.json", "processor_config.json"):
        (d / name).unlink(missing_ok=True)
    with pytest.raises(errors.ConfigError, match="preprocessor_config.json"):
        minift.load(d)
    model, tok = minift.load(d, text_only=True)  # the language model alone needs only the tokenizer
    assert model.config.model_type == "gemma3_text"
