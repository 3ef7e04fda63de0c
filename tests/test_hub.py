"""`push_to_hub` offline: the staged folder is complete and loads (the adapter in PEFT, the merged
checkpoint in transformers, the GGUF in gguf-py), with a model card; the upload goes through a
fake API that records its calls, so nothing here reaches the network. No token / HF_HUB_OFFLINE
/ a failing upload raise HubError after staging, naming the kept folder, which `push_folder`
then uploads; bad arguments raise before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import minift
from minift import errors
from minift.export import hub
from minift.testing import write_tiny_checkpoint


class FakeApi:
    """Records create_repo / upload_folder calls (and a copy of the uploaded folder's file names)."""

    def __init__(self, token: str | None = None, fail: Exception | None = None):
        self.token, self.fail, self.calls = token, fail, []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], dict(kw, files=sorted(
            p.name for p in Path(kw["folder_path"]).iterdir()))))
        if self.fail is not None:
            raise self.fail
        return "https://huggingface.co/commit/abc"


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    """huggingface_hub online (HF_HUB_OFFLINE unset) but with no saved token: every test passes a
    fake api or its own token; HfApi itself raises if anything builds one."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)

    def no_network(*a, **k):
        raise AssertionError("a test built a real huggingface_hub.HfApi")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("hub") / "llama", "llama")


@pytest.fixture
def tuned(ckpt):
    model, tok = minift.load(ckpt, dtype=torch.float32)
    minift.add_lora(model, r=4, alpha=8, seed=1)
    with torch.no_grad():  # non-zero B: the adapter changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok


SUMMARY = {"steps": 12, "tokens": 3456, "losses": [2.5, 1.25], "eval_loss": 1.5, "time_s": 3.0}


def test_adapter_staged_complete_loads_in_peft_and_uploads(tuned, ckpt, tmp_path):
    import peft
    import transformers

    model, tok = tuned
    api = FakeApi()
    stage = tmp_path / "stage"
    url = minift.push_to_hub(model, "me/tiny-adapter", what="adapter", tokenizer=tok, summary=SUMMARY,
                             staging_dir=stage, api=api)
    assert url == "https://huggingface.co/me/tiny-adapter"
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    up = api.calls[1][2]
    assert up["folder_path"] == str(stage) and up["repo_type"] == "model"
    assert ".minift-files.json" in up["ignore_patterns"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(up["files"])
    assert stage.is_dir()  # a staging_dir named by the caller is kept

    card = (stage / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "- minift" in card
    assert "r = 4, alpha = 8" in card and "optimizer steps: 12" in card and "tokens trained on: 3,456" in card
    assert "final training loss: 1.2500" in card and "eval loss: 1.5000" in card
    assert "base_model:" not in card  # a local base is not hub metadata
    assert f"minift {minift.__version__}" in card

    base = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, str(stage)).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        want = model(ids).logits
        got = loaded(ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_merged_staged_loads_in_transformers(tuned, tmp_path):
    import transformers

    model, tok = tuned
    model.load_info.name_or_path = "org/tiny-base"  # as if loaded from the hub: the card names it
    api = FakeApi()
    stage = tmp_path / "merged"
    model.push_to_hub("me/tiny-merged", what="merged", dtype=torch.float32, tokenizer=tok, staging_dir=stage,
                      api=api, private=False)
    assert api.calls[0][2]["private"] is False
    files = set(api.calls[1][2]["files"])
    assert {"README.md", "config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    card = (stage / "README.md").read_text()
    assert "library_name: transformers" in card and "merged into these weights" in card
    assert "base_model: org/tiny-base" in card and "(https://huggingface.co/org/tiny-base)" in card
    assert "Not recorded here" in card  # no summary given
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(stage), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, model(ids).logits, atol=1e-4)


def test_gguf_staged_reads_in_gguf_py_and_default_staging_is_removed(tuned, tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    model, tok = tuned
    monkeypatch.chdir(tmp_path)
    seen: dict[str, object] = {}

    class Inspecting(FakeApi):
        def upload_folder(self, **kw):
            folder = Path(kw["folder_path"])
            seen["folder"] = folder
            seen["files"] = sorted(p.name for p in folder.iterdir())
            r = gguf.GGUFReader(str(folder / "tiny-gguf.Q8_0.gguf"))
            arch = r.fields["general.architecture"]
            seen["arch"] = bytes(arch.parts[arch.data[0]]).decode()
            seen["tensors"] = len(r.tensors)
            return super().upload_folder(**kw)

    api = Inspecting()
    minift.push_to_hub(model, "me/tiny-gguf", what="gguf", quant=["q8_0", "f16"], tokenizer=tok, api=api)
    assert seen["folder"] == tmp_path / "minift-hub" / "me--tiny-gguf-gguf"
    assert seen["files"] == [".minift-files.json", "README.md", "tiny-gguf.F16.gguf", "tiny-gguf.Q8_0.gguf"]
    assert seen["arch"] == "llama" and seen["tensors"] > 0
    assert not (tmp_path / "minift-hub").exists()  # the default staging folder goes once uploaded


def test_one_quant_file_is_labelled_and_card_shows_how_to_run(tuned, tmp_path):
    pytest.importorskip("gguf")
    model, tok = tuned
    stage = tmp_path / "g"
    minift.push_to_hub(model, "me/tiny", what="gguf", quant="fast_quantized", tokenizer=tok, staging_dir=stage,
                       api=FakeApi())
    assert (stage / "tiny.Q8_0.gguf").is_file()
    card = (stage / "README.md").read_text()
    assert "- gguf" in card and "llama-cli -hf me/tiny:Q8_0" in card and "ollama run hf.co/me/tiny:Q8_0" in card


def test_trainer_summary_in_card(ckpt, tmp_path):
    from minift.train import TrainConfig, Trainer

    model, tok = minift.load(ckpt, dtype=torch.float32)
    minift.add_lora(model, r=4, alpha=8)
    rows = [{"messages": [{"role": "user", "content": f"{i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(4)]
    cfg = TrainConfig(max_steps=2, batch_size=2, grad_accum=1, output_dir=str(tmp_path / "run"), progress_bar=False,
                      plot=False, gradient_checkpointing=False, optimizer="adamw")
    summary = Trainer(model, tok, rows, config=cfg).train()
    stage = tmp_path / "s"
    model.push_to_hub("me/x", summary=summary, staging_dir=stage, api=FakeApi())
    card = (stage / "README.md").read_text()
    assert "optimizer steps: 2" in card and f"tokens trained on: {summary.tokens:,}" in card
    assert f"final training loss: {summary.losses[-1]:.4f}" in card


def test_no_token_raises_after_staging_and_push_folder_retries(tuned, tmp_path):
    model, tok = tuned
    stage = tmp_path / "stage"
    with pytest.raises(errors.HubError) as info:
        minift.push_to_hub(model, "me/tiny", tokenizer=tok, staging_dir=stage)  # no token, no api
    msg = str(info.value)
    assert "no Hugging Face token" in msg and str(stage) in msg and "push_folder" in msg
    assert (stage / "adapter_model.safetensors").is_file() and (stage / "README.md").is_file()
    # the retry: the staged folder as it is, no model needed
    api = FakeApi()
    assert minift.push_folder(stage, "me/tiny", api=api) == "https://huggingface.co/me/tiny"
    assert api.calls[1][2]["folder_path"] == str(stage)


def test_default_staging_is_kept_after_a_failed_push_and_refused_without_overwrite(tuned, tmp_path, monkeypatch):
    model, tok = tuned
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.HubError) as info:
        minift.push_to_hub(model, "me/tiny", tokenizer=tok)
    folder = tmp_path / "minift-hub" / "me--tiny-adapter"
    assert str(folder) in str(info.value) and (folder / "adapter_config.json").is_file()
    with pytest.raises(errors.ExportError, match="push_folder"):  # not restaged over silently
        minift.push_to_hub(model, "me/tiny", tokenizer=tok, api=FakeApi())
    api = FakeApi()
    minift.push_to_hub(model, "me/tiny", tokenizer=tok, api=api, overwrite=True)  # stages anew, uploads, cleans up
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"] and not folder.exists()


def test_offline_raises_after_staging(tuned, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, tok = tuned
    api = FakeApi()
    stage = tmp_path / "stage"
    with pytest.raises(errors.HubError, match="HF_HUB_OFFLINE=1") as info:
        minift.push_to_hub(model, "me/tiny", tokenizer=tok, staging_dir=stage, api=api)
    assert str(stage) in str(info.value) and not api.calls  # nothing reached the api
    assert (stage / "adapter_config.json").is_file()


def test_failed_upload_keeps_the_staged_folder(tuned, tmp_path):
    model, tok = tuned
    stage = tmp_path / "stage"
    api = FakeApi(fail=ConnectionError("no route to host"))
    with pytest.raises(errors.HubError, match="no route to host") as info:
        minift.push_to_hub(model, "me/tiny", what="merged", tokenizer=tok, staging_dir=stage, api=api)
    assert isinstance(info.value, OSError) and str(stage) in str(info.value)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]  # staged before the first call
    manifest = json.loads((stage / ".minift-files.json").read_text())
    assert {"README.md", "config.json", "model.safetensors"} <= set(manifest["files"])
    api2 = FakeApi()
    minift.push_folder(stage, "me/tiny", api=api2)
    assert api2.calls[1][2]["files"] == api.calls[1][2]["files"]


def test_token_reaches_hfapi(tuned, tmp_path, monkeypatch):
    import huggingface_hub

    made: list[FakeApi] = []

    def make(token=None):
        made.append(FakeApi(token))
        return made[-1]

    monkeypatch.setattr(huggingface_hub, "HfApi", make)
    model, tok = tuned
    minift.push_to_hub(model, "me/tiny", tokenizer=tok, staging_dir=tmp_path / "a", token="hf_given")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_saved")
    minift.push_to_hub(model, "me/tiny", tokenizer=tok, staging_dir=tmp_path / "b")
    assert [a.token for a in made] == ["hf_given", "hf_saved"]
    assert all([c[0] for c in a.calls] == ["create_repo", "upload_folder"] for a in made)


@pytest.mark.parametrize("kw, text", [
    (dict(what="lora"), "what:"),
    (dict(what="gguf", quant="q3_k_m"), "quant:"),
    (dict(what="gguf", quant=[]), "quant:"),
    (dict(what="adapter", quant="q8_0"), "quant:"),
    (dict(what="merged", dtype="int8"), "dtype:"),
    (dict(what="adapter", dtype="float16"), "dtype:"),
    (dict(private="yes"), "private:"),
    (dict(token=123), "token:"),
    (dict(summary=[1, 2]), "summary:"),
    (dict(api=object()), "api:"),
    (dict(repo_id="not a repo"), "repo_id:"),
    (dict(repo_id="a/b/c"), "repo_id:"),
])
def test_bad_arguments_raise_typed_errors_and_write_nothing(tuned, tmp_path, kw, text):
    model, _ = tuned
    kw = {"repo_id": "me/tiny", "staging_dir": tmp_path / "stage", "api": FakeApi(), **kw}
    with pytest.raises(errors.InputError, match=text):
        minift.push_to_hub(model, kw.pop("repo_id"), **kw)
    assert list(tmp_path.iterdir()) == []


def test_adapter_push_needs_adapters(ckpt, tmp_path):
    model, _ = minift.load(ckpt)
    with pytest.raises(errors.InputError, match="no adapters"):
        minift.push_to_hub(model, "me/tiny", staging_dir=tmp_path / "s", api=FakeApi())
    assert list(tmp_path.iterdir()) == []


def test_push_folder_checks_its_folder(tmp_path):
    with pytest.raises(errors.InputError, match="folder"):
        minift.push_folder(tmp_path / "nowhere", "me/tiny", api=FakeApi())
    with pytest.raises(errors.InputError, match="folder"):
        minift.push_folder(tmp_path, "me/tiny", api=FakeApi())  # empty


def test_default_staging_dir_is_documented_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.default_staging_dir("org/name", "merged") == tmp_path / "minift-hub" / "org--name-merged"


def test_readme_documents_the_signatures():
    import inspect

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sig = inspect.signature(minift.models.classes.ModelAPI.push_to_hub)
    params = ", ".join(("*, " if p.kind is p.KEYWORD_ONLY and i == 2 else "") + (
        p.name if p.default is p.empty else f"{p.name}={p.default!r}".replace("'", '"'))
        for i, p in enumerate(list(sig.parameters.values())[1:], 1))
    assert f"`model.push_to_hub({params})`" in readme, params
    fn = inspect.signature(minift.push_to_hub)
    assert list(fn.parameters)[1:] == list(sig.parameters)[1:]  # the function and the method take the same
    assert "minift.push_folder(folder, repo_id, *, token=None, private=True, commit_message=None, api=None)" in readme
    assert list(inspect.signature(minift.push_folder).parameters) == ["folder", "repo_id", "token", "private",
                                                                       "commit_message", "api"]
