"""The `minift` command line (offline, tiny local checkpoints) and the Trainer's logging: unsloth-cli's
usage line as is, --config YAML with a flag overriding it (an adapter PEFT loads, metrics,
TensorBoard events, a merged model), refused flags (exit 2, nothing written), chat through stdin,
GGUF export, info's counts and memory estimate, raw-text windows, W&B offline."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minift
from minift.cli import main
from minift.testing import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread_and_private_datasets_cache(tmp_path_factory, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    write_tiny_checkpoint(d / "base", "llama")
    write_jsonl(d / "chat.jsonl", chats(8))
    write_jsonl(d / "alpaca.jsonl", [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)}
                                     for i in range(8)])
    return d


def cli_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp / ".hf-datasets"), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


# ---- train ------------------------------------------------------------------------------------------


def test_unsloth_cli_usage_line_runs_as_is(work, tmp_path):
    """unsloth-cli.py's extended usage line, with a local model and dataset, through `python -m minift`
    (no subcommand, as `python unsloth-cli.py ...`): 8-bit AdamW runs on bitsandbytes' CPU path."""
    line = (f"--model_name {work / 'base'} --dataset {work / 'alpaca.jsonl'} --max_seq_length 64 --r 8 --lora_alpha 16 "
            "--lora_dropout 0 --bias none --use_gradient_checkpointing unsloth --random_state 3407 --use_rslora "
            "--per_device_train_batch_size 2 --gradient_accumulation_steps 2 --warmup_steps 1 --max_steps 2 "
            "--learning_rate 2e-4 --optim adamw_8bit --weight_decay 0.01 --lr_scheduler_type linear --seed 3407 "
            "--output_dir OUT --report_to none --save_model --save_method lora")
    r = subprocess.run([sys.executable, "-m", "minift", *line.split()], cwd=tmp_path, env=cli_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Alpaca rows" in r.stderr
    steps = [json.loads(x)["step"] for x in (tmp_path / "OUT" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    cfg = json.loads((tmp_path / "model" / "adapter_config.json").read_text())  # --save_path default "model"
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["use_rslora"] is True
    assert (tmp_path / "OUT" / "final" / "adapter_model.safetensors").is_file()


SLOW_CLI = """
import sys, time, torch
torch.set_num_threads(1)
from minift.train import Trainer
batch = Trainer._batch
def slow_batch(self, units, idx):  # slow steps, so that the signal lands mid-run
    time.sleep(0.2)
    return batch(self, units, idx)
Trainer._batch = slow_batch
from minift.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_ctrl_c_exits_130_with_a_checkpoint_and_resume_continues(work, tmp_path):
    """Ctrl-C during `minift train`: exit status 130, no traceback, the checkpoint's path and how to
    resume on stderr; the same command with --resume runs the remaining steps."""
    import signal
    import time

    line = (f"train --model_name {work / 'base'} --dataset {work / 'chat.jsonl'} --max_seq_length 64 --r 4 "
            "--per_device_train_batch_size 2 --gradient_accumulation_steps 1 --max_steps 8 --optim adamw_torch "
            "--output_dir OUT --report_to none").split()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *line], cwd=tmp_path, env=cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "OUT" / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no step was logged"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    saved = sorted((tmp_path / "OUT").glob("checkpoint-*"))
    assert len(saved) == 1 and f"saved a resumable checkpoint in {Path('OUT') / saved[0].name}\n" in err, err[-2000:]
    assert "Ctrl-C: stopping after this step" in out + err  # minift's log lines go through tqdm.write
    assert "the same command with --resume" in err
    step = int(saved[0].name.split("-")[1])
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(line + ["--resume"]) == 0
    finally:
        os.chdir(cwd)
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 9)) and step < 8
    assert (tmp_path / "OUT" / "final" / "adapter_model.safetensors").is_file()


CONFIG = """\
model_name: {base}
dataset: {data}
max_seq_length: 64
r: 4
lora_alpha: 8
max_steps: 6            # the command line's --max_steps 3 wins
logging_steps: 2
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
warmup_steps: 0
learning_rate: 1.0e-3
optim: adamw_torch_fused
train_on_responses_only: true
use_gradient_checkpointing: true
report_to: tensorboard
output_dir: OUT
save_model: true
save_method: merged_16bit
save_path: merged
"""


@pytest.fixture(scope="module")
def trained(work, tmp_path_factory):
    """`minift train --config cfg.yaml --max_steps 3`, in-process; returns its directory."""
    d = tmp_path_factory.mktemp("trained")
    (d / "cfg.yaml").write_text(CONFIG.format(base=work / "base", data=work / "chat.jsonl"))
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert main(["train", "--config", "cfg.yaml", "--max_steps", "3"]) == 0
    finally:
        os.chdir(cwd)
    return d


def test_yaml_config_flag_override_peft_tensorboard_merged(work, trained):
    pytest.importorskip("tensorboard")
    import peft
    import transformers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recs = [json.loads(x) for x in (trained / "OUT" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]  # the flag's 3 steps, step 1 logged, then every 2 and the last

    acc = EventAccumulator(str(trained / "OUT" / "runs"))
    acc.Reload()
    tb = acc.Scalars("train/loss")
    assert [e.step for e in tb] == [1, 2, 3]
    assert [e.value for e in tb] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
    assert {"train/learning_rate", "train/tokens_per_s", "train/peak_memory_gb"} <= set(acc.Tags()["scalars"])

    base = transformers.AutoModelForCausalLM.from_pretrained(str(work / "base"))
    tuned = peft.PeftModel.from_pretrained(base, str(trained / "OUT" / "final")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(trained / "merged"), dtype=torch.float32).eval()
    cfg = json.loads((trained / "OUT" / "final" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    ids = torch.tensor([[1, 5, 9, 17, 33, 40]])
    with torch.no_grad():
        a, b = tuned(ids).logits, merged(ids).logits
        with tuned.disable_adapter():
            plain = tuned(ids).logits
    assert torch.allclose(a, b, atol=5e-2), (a - b).abs().max()  # the merged copy is bf16
    assert not torch.allclose(a, plain, atol=1e-6)  # the adapter trained


BASE_ARGS = ["--dataset", "chat.jsonl", "--output_dir", "OUT", "--max_steps", "1", "--save_model",
             "--save_path", "SAVE"]


@pytest.mark.parametrize("extra, flag", [
    (["--bias", "all"], "--bias"),
    (["--loftq_config", "loftq.json"], "--loftq_config"),
    (["--push_model"], "--hub_path"),
    (["--push_gguf", "--save_gguf", "--hub_path", "a/b/c"], "--hub_path"),
    (["--optim", "adafactor"], "--optim"),
    (["--lr_scheduler_type", "polynomial"], "--lr_scheduler_type"),
    (["--report_to", "mlflow"], "--report_to"),
    (["--use_gradient_checkpointing", "sometimes"], "--use_gradient_checkpointing"),
    (["--memory_budget_gb", "8"], "--memory_budget_gb"),
    (["--cuda_graphs", "sometimes"], "--cuda_graphs"),
    (["--use_gradient_checkpointing", "auto", "--memory_budget_gb", "-1"], "--memory_budget_gb"),
    (["--raw_text_file", "chat.jsonl"], "--raw_text_file"),
    (["--epochs", "2"], "--epochs"),
    (["--lora_dropout", "1.5"], "--lora_dropout"),
    (["--quantization", "q3_k_m"], "--quantization"),
    (["--dataset", "missing.jsonl"], "--dataset"),
    (["--target_modules", "lm_head"], "--target_modules"),
    (["--chat_template", "no-such-template"], "--chat_template"),
    (["--text_field", "no_such_column"], "--text_field"),
    (["--stride", "4"], "--stride"),
    (["--max_seq_length", "1"], "--max_seq_length"),
    (["--dtype", "int3"], "--dtype"),
    (["--config", "bad.yaml"], "--config"),
    (["--model_name", "./no/such/dir"], "--model_name"),
])
def test_bad_flags_exit_2_name_the_flag_and_write_nothing(work, tmp_path, monkeypatch, capsys, extra, flag):
    (tmp_path / "chat.jsonl").write_text((work / "chat.jsonl").read_text())
    (tmp_path / "bad.yaml").write_text("model_name: x\nlearning_rte: 1e-4\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--model_name", str(work / "base"), *BASE_ARGS, *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    msg = [line for line in err.splitlines() if line.startswith("minift train: error:")]
    assert msg and flag in msg[0], err  # the error line itself names the flag (the usage line names them all)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records its token and calls (and the uploaded files)."""

    made: list["FakeHfApi"] = []

    def __init__(self, token=None):
        self.token, self.calls = token, []
        FakeHfApi.made.append(self)

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        self.calls.append(("upload_folder", kw["repo_id"], folder, sorted(p.name for p in folder.iterdir())))


@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub online with no saved token, HfApi replaced by FakeHfApi: nothing reaches the network."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.made = []
    return FakeHfApi


@pytest.mark.parametrize("extra, flag, offline", [
    (["--push_model", "--hub_path", "me/x"], "--hub_token", False),  # no --hub_token and no saved token
    (["--push_gguf", "--hub_path", "me/x", "--hub_token", "hf_x"], "--push_gguf", True),  # HF_HUB_OFFLINE=1
    (["--push_model", "--save_model", "false", "--hub_path", "me/x", "--hub_token", "hf_x"], "--push_model", False),
    (["--push_model", "--hub_path", "me/x", "--hub_token", "hf_x", "--save_path", "taken"], "--save_path", False),
    (["--push_model", "--hub_path", "me/x", "--hub_token", "hf_x", "--save_path", "taken", "--overwrite"],
     "--save_path", False),  # --overwrite replaces only what minift wrote
    (["--push_gguf", "--hub_path", "me/x", "--hub_token", "hf_x", "--output_dir", "run"], "--push_gguf", False),
])
def test_push_flags_checked_before_anything_loads(work, tmp_path, monkeypatch, capsys, fake_hub, extra, flag,
                                                  offline):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    (tmp_path / "chat.jsonl").write_text((work / "chat.jsonl").read_text())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (tmp_path / "run" / "gguf").mkdir(parents=True)
    (tmp_path / "run" / "gguf" / "old.gguf").write_text("x")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model_name", str(work / "base"), "--dataset", "chat.jsonl", "--output_dir", "OUT",
            "--max_steps", "1", "--save_path", "SAVE"]
    rc = main(args + extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    msg = [line for line in err.splitlines() if line.startswith("minift train: error:")]
    assert msg and flag in msg[0], err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert not fake_hub.made


def test_train_push_model_and_push_gguf(work, tmp_path, monkeypatch, capsys, fake_hub):
    """--push_model with --save_method lora uploads --save_path (the adapter + README.md); --push_gguf
    uploads the GGUF staged in OUTPUT_DIR/gguf, first; both with --hub_token."""
    pytest.importorskip("gguf")
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--model_name", str(work / "base"), "--dataset", str(work / "chat.jsonl"), "--max_seq_length",
               "64", "--r", "4", "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "1", "--optim", "adamw", "--use_gradient_checkpointing", "false",
               "--output_dir", "OUT", "--save_method", "lora", "--save_path", "SAVE", "--push_model", "--push_gguf",
               "--quantization", "q8_0", "--hub_path", "me/tiny", "--hub_token", "hf_cli"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [a.token for a in fake_hub.made] == ["hf_cli", "hf_cli"]
    ups = [c for a in fake_hub.made for c in a.calls if c[0] == "upload_folder"]
    assert [(c[1], c[2]) for c in ups] == [("me/tiny", tmp_path / "OUT" / "gguf"), ("me/tiny", tmp_path / "SAVE")]
    assert ups[0][3] == [".minift-files.json", "README.md", "tiny.Q8_0.gguf"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(ups[1][3])
    card = (tmp_path / "SAVE" / "README.md").read_text()
    assert "library_name: peft" in card and "optimizer steps: 2" in card and "final training loss:" in card
    assert "pushed it to https://huggingface.co/me/tiny" in err


def test_export_push_to(trained, tmp_path, capsys, fake_hub):
    out = tmp_path / "m"
    assert main(["export", str(trained / "OUT" / "final"), "--to", "merged_16bit", "-o", str(out),
                 "--push_to", "me/merged", "--hub_token", "hf_e"]) == 0
    assert capsys.readouterr().out.split() == [str(out), "https://huggingface.co/me/merged"]
    (api,) = fake_hub.made
    assert api.token == "hf_e" and [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert {"README.md", "config.json", "model.safetensors"} <= set(api.calls[1][3])
    assert "r = 4" in (out / "README.md").read_text()  # the adapter's settings, merged
    assert main(["export", str(trained / "OUT" / "final"), "--to", "gguf", "--push_to", "not a repo"]) == 2
    assert main(["export", str(trained / "OUT" / "final"), "--to", "gguf", "--hub_token", "x"]) == 2
    assert len(fake_hub.made) == 1


def test_raw_text_windows_cover_every_token_once(work, tmp_path):
    from transformers import AutoTokenizer

    from minift.cli.data import token_windows

    tok = AutoTokenizer.from_pretrained(str(work / "base"))
    f = tmp_path / "corpus.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    w = token_windows(f, tok, chunk=8, stride=3)
    ids = tok(f.read_text())["input_ids"] + [tok.eos_token_id]
    assert w.n_tokens == len(ids) and all(len(x) <= 8 for x in w.windows)
    exs = w.examples()
    targets = []
    for k, ex in enumerate(exs):
        assert ex.input_ids.tolist() == ids[k * 5: k * 5 + 8]
        lab = ex.labels[1:] if k == 0 else ex.labels  # a window's first position is never a target
        targets += [t for t in lab.tolist() if t != -100]
    assert targets == ids[1:]  # every token but the first is a target exactly once


# ---- chat / generate / export / info ----------------------------------------------------------------


def test_chat_reads_stdin_until_eof_and_stops_at_exit(trained, monkeypatch, capsys):
    calls = []
    real = minift.chat

    def spy(model, tok, messages, **kw):
        calls.append(([dict(m) for m in messages], kw))
        return real(model, tok, messages, **kw)

    monkeypatch.setattr(minift, "chat", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 plus 2?\n\nAnd 3 plus 3?\n"))
    assert main(["chat", str(trained / "OUT" / "final"), "--max_new_tokens", "5"]) == 0  # EOF ends it
    assert len(calls) == 2 and all(kw["stream"] is True for _, kw in calls)
    second = calls[1][0]
    assert [m["role"] for m in second] == ["user", "assistant", "user"] and second[2]["content"] == "And 3 plus 3?"
    out = capsys.readouterr().out
    assert out.count("\n") >= 2

    calls.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/exit\nnever asked\n"))
    assert main(["chat", str(trained / "OUT" / "final"), "--max_new_tokens", "3"]) == 0
    assert len(calls) == 1

    assert main(["generate", str(trained / "OUT" / "final"), "--prompt", "Hi", "--max_new_tokens", "3"]) == 0
    assert main(["chat", str(trained / "OUT" / "final"), "--image", "nope.png"]) == 2


def test_export_writes_gguf_and_modelfile(trained, tmp_path):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "g"
    assert main(["export", str(trained / "OUT" / "final"), "--to", "gguf", "--quantization", "q8_0", "f16",
                 "--modelfile", "-o", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["Modelfile", "base.F16.gguf", "base.Q8_0.gguf"], files
    r = gguf.GGUFReader(str(out / "base.Q8_0.gguf"))
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama" and len(r.tensors) > 0
    assert main(["export", str(trained / "OUT" / "final"), "--to", "gguf", "-o", str(out)]) != 0  # exists


@pytest.mark.parametrize("family", ["llama", "gemma3_vision"])
def test_info_counts_equal_the_models(tmp_path, capsys, family):
    if family == "llama":
        path = write_tiny_checkpoint(tmp_path / "m", "llama")
    else:
        from minift.testing import write_tiny_gemma3_vision

        path = write_tiny_gemma3_vision(tmp_path / "m")
    assert main(["info", str(path), "--r", "4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    model, _ = minift.load(path)
    assert d["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    minift.add_lora(model, r=4)
    assert d["parameters"]["lora_trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert d["memory_bytes"]["qlora_nf4"]["total"] < d["memory_bytes"]["lora_16bit"]["total"]
    assert main(["info", str(path)]) == 0 and "parameters:" in capsys.readouterr().out
    assert d["run"]["host_offload_bytes"] == 0  # checkpoints kept on the GPU
    assert main(["info", str(path), "--use_gradient_checkpointing", "unsloth", "--max_seq_length", "64",
                 "--per_device_train_batch_size", "3", "--json"]) == 0
    cfg = model.config.text if hasattr(model.config, "text") else model.config
    host = json.loads(capsys.readouterr().out)["run"]["host_offload_bytes"]
    assert host == cfg.num_hidden_layers * 3 * 64 * cfg.hidden_size * 2


LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": True}
GEMMA3_4B_TEXT = {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                  "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                  "vocab_size": 262208, "query_pre_attn_scalar": 256, "sliding_window": 1024,
                  "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                  "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "max_position_embeddings": 131072,
                  "sliding_window_pattern": 6, "tie_word_embeddings": True}


# bench/common.py's gemma-3-4b-vision and llama-3.1-8b shapes
GEMMA3_4B_VISION = {"model_type": "gemma3", "text_config": GEMMA3_4B_TEXT, "mm_tokens_per_image": 256,
                    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152,
                                      "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                                      "image_size": 896, "patch_size": 14, "vision_use_head": False}}
LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False}


@pytest.mark.parametrize("cfg, ckpt, measured", [
    # bench/RESULTS.md's H100 peaks (GiB) for 4 x 2048 tokens, r=16 all-linear: (bf16, NF4)
    (LLAMA_1B, True, (4.20, 2.94)),
    (GEMMA3_4B_TEXT, True, (10.53, 6.24)),
    (GEMMA3_4B_TEXT, "offload", (None, 5.08)),
    # one H200, 2026-12-01, the same workload with one 896x896 image a row and adapters on the
    # vision tower too (README's `minift info` table), measured before the Trainer offloaded the
    # tower's checkpointed inputs: its estimate with them on the device
    (GEMMA3_4B_VISION, True, (12.48, 7.61)),
    (GEMMA3_4B_VISION, "offload", (None, 6.45)),
    (LLAMA_8B, True, (None, 10.31)),
])
def test_info_memory_estimate_is_near_the_bench_peaks(cfg, ckpt, measured):
    from minift.cli.info import GIB, describe

    d = describe(cfg, r=16, seq=2048, batch=4, checkpointing=ckpt, vision_offload=False)
    for key, want in zip(("lora_16bit", "qlora_nf4"), measured):
        if want is not None:
            got = d["memory_bytes"][key]["total"] / GIB
            assert abs(got - want) <= 0.1 * want, (key, got, want)


# ---- the Trainer's logging --------------------------------------------------------------------------


def test_metrics_step_one_window_mean_loss_and_mfu(work, tmp_path):
    from minift.train import TrainConfig, Trainer

    model, tok = minift.load(work / "base")
    minift.add_lora(model, r=4, alpha=8)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=7, batch_size=2, grad_accum=1, logging_steps=3,
                      logging_first_step=True, peak_tflops=1.0, progress_bar=False, plot=False,
                      gradient_checkpointing=False)
    t = Trainer(model, tok, chats(8), config=cfg)
    s = t.train()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 3, 6, 7]
    windows = {1: s.losses[0:1], 3: s.losses[1:3], 6: s.losses[3:6], 7: s.losses[6:7]}
    for r in recs:
        assert r["loss"] == pytest.approx(sum(windows[r["step"]]) / len(windows[r["step"]]), rel=1e-9)
        assert r["mfu"] == pytest.approx(6 * t._flop_params * r["tokens_per_s"] / 1e12, rel=1e-9)
    from minift.train.report import count_parameters, flop_parameters

    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters())
    assert flop_parameters(model) == n - model.config.vocab_size * model.config.hidden_size  # untied embedding


def test_report_to_needs_its_package(monkeypatch):
    import importlib.util

    from minift.errors import TrainConfigError
    from minift.train import TrainConfig
    from minift.train import report

    real = importlib.util.find_spec
    monkeypatch.setattr(report.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a))
    with pytest.raises(TrainConfigError, match="tensorboard"):
        report.resolve_report_to("tensorboard")
    assert report.resolve_report_to("all") == []
    with pytest.raises(TrainConfigError, match="report_to"):
        TrainConfig(report_to="mlflow").validate()


def test_wandb_offline(work, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from minift.train import TrainConfig, Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model, tok = minift.load(work / "base")
    minift.add_lora(model, r=4)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=2, grad_accum=1, report_to="wandb",
                      run_name="minift-test", progress_bar=False, plot=False, gradient_checkpointing=False)
    Trainer(model, tok, chats(4), config=cfg).train()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and b"train/loss" in runs[0].read_bytes()


def test_cli_reference_lists_every_command_and_unsloth_flag():
    from minift.cli import COMMANDS, reference_markdown

    ref = reference_markdown()
    assert all(f"#### `minift {c}`" in ref for c in COMMANDS)
    unsloth = ("model_name max_seq_length dtype load_in_4bit dataset r lora_alpha lora_dropout bias "
               "use_gradient_checkpointing random_state use_rslora loftq_config per_device_train_batch_size "
               "gradient_accumulation_steps warmup_steps max_steps learning_rate optim weight_decay lr_scheduler_type "
               "seed report_to logging_steps output_dir save_model save_method save_gguf save_path quantization "
               "quantization_method push_model push_gguf hub_path hub_token").split()
    missing = [f for f in unsloth if f"`--{f}`" not in ref]
    assert not missing, missing
    assert main(["--help"]) == 0 and main(["train", "--help"]) == 0 and main(["nope"]) == 2


def test_readme_cli_reference_is_generated_from_the_parsers():
    from minift.cli import reference_markdown

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- cli-reference:begin -->\n", "<!-- cli-reference:end -->"
    assert readme.count(begin) == 1 and readme.count(end) == 1, "README.md lacks the cli-reference markers"
    section = readme[readme.index(begin) + len(begin): readme.index(end)]
    assert section == reference_markdown(), (
        "README.md's CLI reference differs from the parsers; regenerate it: python tools/update_cli_reference.py")


def test_cli_reference_does_not_depend_on_the_terminal_width(monkeypatch):
    from minift.cli import reference_markdown

    monkeypatch.setenv("COLUMNS", "40")
    narrow = reference_markdown()
    monkeypatch.setenv("COLUMNS", "300")
    assert reference_markdown() == narrow


@pytest.mark.parametrize("value, want", [(None, "auto"), ("false", False), ("True", True), ("auto", "auto")])
def test_cuda_graphs_flag_reaches_the_train_config(work, value, want):
    from minift.cli.train import _train_config, build_parser, check, parse

    argv = ["--model_name", str(work / "base"), "--dataset", str(work / "chat.jsonl")]
    v, given = parse(argv + (["--cuda_graphs", value] if value else []), build_parser())
    assert _train_config(v, check(v, given)).cuda_graphs == want
