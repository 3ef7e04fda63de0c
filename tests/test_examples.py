"""Every script in examples/ runs its --smoke mode (tiny local stand-ins, a few steps, offline) in a
subprocess, as CI runs them. The three start together and run side by side."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts every example's --smoke at once; each test waits for its own."""
    base = tmp_path_factory.mktemp("examples")
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(base / ".hf-datasets"),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    procs = {}
    for name in EXAMPLES:
        out = base / name[:-3]
        procs[name] = (subprocess.Popen([sys.executable, str(ROOT / "examples" / name), "--smoke", "--output_dir",
                                         str(out)], cwd=base, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True), out)
    yield procs
    for p, _ in procs.values():
        if p.poll() is None:
            p.kill()


def test_there_are_examples():
    assert {"gemma3_vision_latex.py", "llama_sft_responses_only.py", "continued_pretraining.py"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_smoke(runs, name):
    proc, out = runs[name]
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{name} --smoke did not finish in 240 s")
    assert proc.returncode == 0, log[-4000:]
    assert "done in" in log, log[-2000:]
    assert (out / "metrics.jsonl").is_file() or (out / "run" / "metrics.jsonl").is_file()
