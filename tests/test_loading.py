"""Hub ids through a hand-made HF cache (offline), and typed errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import minift
from minift.errors import CheckpointError, ConfigError, ShapeMismatchError, UnsupportedModelError
from minift.testing import write_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


def make_cache(root: Path, repo: str, src: Path, rev: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """The layout huggingface_hub writes: models--org--name/{snapshots/<rev>/..., refs/main}."""
    d = root / ("models--" + repo.replace("/", "--"))
    snap = d / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(rev)
    return snap


def run_offline(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300)


def test_hub_id_from_cache_offline(ckpt, tmp_path):
    cache = tmp_path / "hub"
    make_cache(cache, "org/tiny-llama", ckpt)
    r = run_offline(
        """
        import torch, minift
        m, tok = minift.load("org/tiny-llama")
        print("OK", m.config.model_type, type(tok).__name__, m.model.layers[0].self_attn.q_proj.weight.shape[0])
        try:
            minift.load("org/not-cached")
        except minift.errors.HubError as e:
            print("HUBERR", e)
        """,
        cache,
    )
    assert r.returncode == 0, r.stderr
    assert "OK llama" in r.stdout
    assert "HUBERR org/not-cached: not in the Hugging Face cache" in r.stdout and "HF_HUB_OFFLINE=1" in r.stdout


def test_missing_path_and_config(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        minift.load(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json: missing"):
        minift.load(tmp_path)


def test_unsupported_model_type(ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported; minift supports llama, mistral"):
        minift.load(d)


def test_bad_json(ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        minift.load(d)


def _rewrite(src: Path, dst: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_named(ckpt, tmp_path):
    _rewrite(ckpt, tmp_path / "m", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        minift.load(tmp_path / "m")


def test_unexpected_tensor_named(ckpt, tmp_path):
    _rewrite(ckpt, tmp_path / "m", lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"does not have: model\.layers\.0\.extra\.weight"):
        minift.load(tmp_path / "m")


def test_shape_mismatch_named(ckpt, tmp_path):
    def edit(sd):
        sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 64)

    _rewrite(ckpt, tmp_path / "m", edit)
    with pytest.raises(ShapeMismatchError, match=r"q_proj\.weight' has shape \(3, 64\), expected \(64, 64\)"):
        minift.load(tmp_path / "m")


def test_truncated_safetensors(ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        minift.load(d)


def test_corrupted_header(ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"garbage!!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        minift.load(d)


def test_pickle_only_refused(ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        minift.load(d)


def test_hub_id_and_path_spellings(ckpt, tmp_path, monkeypatch):
    """'org/name' is a hub id (its adapters record the id); the same words written as a path
    ('./org/name') are a local path, never looked up on the hub; 'org/name' naming an existing
    relative directory is that directory."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    make_cache(cache, "org/tiny-llama", ckpt)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model, _ = minift.load("org/tiny-llama")
    assert model.load_info.name_or_path == "org/tiny-llama"
    minift.add_lora(model, r=2)
    cfg = json.loads((model.save_adapter("ad") / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/tiny-llama"
    with pytest.raises(ConfigError, match=r"\./org/tiny-llama: no such directory"):
        minift.load("./org/tiny-llama")
    (work / "org").mkdir()
    shutil.copytree(ckpt, work / "org" / "tiny-llama")
    local, _ = minift.load("org/tiny-llama")
    assert local.load_info.name_or_path == str(work / "org" / "tiny-llama")
    assert local.load_info.source_path == Path("org/tiny-llama")


def test_missing_tokenizer_reported_before_the_weights(ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    for f in d.glob("tokenizer*"):
        f.unlink()
    (d / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ConfigError, match=r"has no tokenizer files \(tokenizer\.json, or tokenizer\.model"):
        minift.load(d)
