"""Every Triton kernel launch the ops make compiles for an H100 (sm_90), here without a GPU:
the interpreter CI runs the kernels with never invokes Triton's compiler (tests/sm90_compile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton's NVIDIA backend (with ptxas) is not installed")
def test_every_kernel_launch_compiles_for_sm90(tmp_path: Path) -> None:
    script = str(Path(__file__).with_name("sm90_compile.py"))
    specs = str(tmp_path / "launches.json")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))  # compile for real, not from a cache
    rec = subprocess.run([sys.executable, script, "record", specs], env=env, capture_output=True, text=True, timeout=900)
    assert rec.returncode == 0, rec.stdout[-3000:] + rec.stderr[-3000:]
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, script, "compile", specs], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "compiled" in out.stdout
