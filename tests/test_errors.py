"""Bad input to each public function raises a typed MiniftError subclass whose message names
what is wrong; and every error class is one, and is documented."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

import minift
from minift import errors
from minift.arch.attention import set_attention_backend
from minift.testing import write_tiny_checkpoint
from minift.train import TrainConfig, Trainer

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bad") / "llama", "llama")


@pytest.fixture
def model(ckpt):
    return minift.load(ckpt)[0]


def unsupported(tmp_path, ckpt):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    return d


# (case id, call taking (tmp_path, ckpt, model), expected class, text the message must contain)
CASES = [
    ("load: missing directory", lambda t, c, m: minift.load(t / "nowhere"), errors.ConfigError, "nowhere"),
    ("load: a file", lambda t, c, m: minift.load(c / "config.json"), errors.ConfigError, "is a file"),
    ("load: no config.json", lambda t, c, m: minift.load(t), errors.ConfigError, "config.json"),
    ("load: unsupported model_type", lambda t, c, m: minift.load(unsupported(t, c)), errors.UnsupportedModelError,
     "gpt2"),
    ("load: dtype", lambda t, c, m: minift.load(c, dtype="float17"), errors.InputError, "dtype"),
    ("load: device", lambda t, c, m: minift.load(c, device="gpu"), errors.InputError, "device"),
    ("add_lora: rank", lambda t, c, m: minift.add_lora(m, r=0), errors.AdapterError, "r:"),
    ("add_lora: flag", lambda t, c, m: minift.add_lora(m, dora="yes"), errors.AdapterError, "dora"),
    ("load_adapter: strict", lambda t, c, m: minift.load_adapter(m, t, strict="no"), errors.AdapterError, "strict"),
    ("save_merged: max_shard_size", lambda t, c, m: minift.save_merged(m, t / "out", max_shard_size="big"),
     errors.AdapterError, "max_shard_size"),
    ("add_lora: targets", lambda t, c, m: minift.add_lora(m, targets=["nope"]), errors.AdapterError, "nope"),
    ("load_adapter: missing", lambda t, c, m: minift.load_adapter(m, t / "ad"), errors.AdapterError, "ad"),
    ("save_adapter: no adapters", lambda t, c, m: minift.save_adapter(m, t / "out"), errors.AdapterError,
     "no adapters"),
    ("model.save_adapter: no adapters", lambda t, c, m: m.save_adapter(t / "out"), errors.AdapterError,
     "no adapters"),
    ("save_merged: dtype", lambda t, c, m: minift.save_merged(m, t / "out", "int8"), errors.AdapterError, "dtype"),
    ("push_to_hub: what", lambda t, c, m: minift.push_to_hub(m, "me/x", what="lora", staging_dir=t / "s"),
     errors.InputError, "what:"),
    ("push_to_hub: quant", lambda t, c, m: m.push_to_hub("me/x", what="gguf", quant="q3_k_m", staging_dir=t / "s"),
     errors.InputError, "quant:"),
    ("push_to_hub: repo_id", lambda t, c, m: minift.push_to_hub(m, "x", staging_dir=t / "s"), errors.InputError,
     "repo_id:"),
    ("model: pixel_values", lambda t, c, m: m(torch.ones(1, 3, dtype=torch.long), pixel_values=torch.ones(1)),
     errors.InputError, "pixel_values"),
    ("TrainConfig: lr", lambda t, c, m: TrainConfig(lr=-1.0).validate(), errors.TrainConfigError, "lr"),
    ("Trainer: dataset rows", lambda t, c, m: Trainer(m, minift.load(c)[1], [{"x": 1}], config=TrainConfig(
        max_steps=1, output_dir=str(t / "run"), progress_bar=False)), errors.DataError, "x"),
    ("ops.rms_norm: shapes", lambda t, c, m: minift.ops.rms_norm(torch.ones(2, 4), torch.ones(3)), errors.InputError,
     "weight"),
    ("ops.set_backend", lambda t, c, m: minift.ops.set_backend("cuda-graphs"), errors.MiniftError, "cuda-graphs"),
    ("set_attention_backend", lambda t, c, m: set_attention_backend("fast"), errors.MiniftError, "fast"),
]


@pytest.mark.parametrize("call, cls, text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_typed_error(call, cls, text, tmp_path, ckpt, model):
    with pytest.raises(cls) as info:
        call(tmp_path, ckpt, model)
    assert isinstance(info.value, errors.MiniftError)
    assert text in str(info.value)


def test_every_error_class_is_a_documented_minift_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    readme = README.read_text()
    for cls in classes:
        assert issubclass(cls, errors.MiniftError), cls
        assert f"`{cls.__name__}`" in readme, f"{cls.__name__} is not in the README's error list"


def test_every_train_config_field_is_in_the_readme():
    import dataclasses

    readme = README.read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in readme]
    assert not missing, f"TrainConfig fields missing from the README's field list: {missing}"
