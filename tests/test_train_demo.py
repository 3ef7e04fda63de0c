"""The demo (`python -m minift.demo`, the README's first command) runs end to end, shortened."""

from __future__ import annotations

from minift.data import load_sample


def test_sample_data_shape():
    rows = load_sample()
    assert 100 <= len(rows) <= 200
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    assert load_sample(as_dataset=True).num_rows == len(rows)


def test_demo_runs_shortened(tmp_path, capsys):
    import torch

    from minift.demo import main

    old = torch.get_num_threads()
    try:
        assert main(["--output-dir", str(tmp_path), "--epochs", "1"]) == 0
    finally:
        torch.set_num_threads(old)
    out = capsys.readouterr().out
    assert "Before fine-tuning:" in out and "After fine-tuning:" in out
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "metrics.jsonl").is_file()
