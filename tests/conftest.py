"""Test setup: Triton's interpreter on CPU-only machines, hypothesis profiles, the gpu marker."""

import os
import tempfile

# A private inductor/Triton cache per test session: a cache entry compiled against an older
# version of one of our custom ops' backward would otherwise be replayed (keys cover the forward only).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="minift-inductor-"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere, so the kernels run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], derandomize=False)
# CI draws the same examples every run (a red CI must be reproducible); dev/gpu explore anew.
settings.register_profile("ci", max_examples=12, **{**_common, "derandomize": True})
settings.register_profile("gpu", max_examples=200, **_common)
settings.register_profile("dev", max_examples=40, **_common)
settings.load_profile(os.environ.get("MINIFT_HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (runs the kernels natively, larger hypothesis profile)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")
    config.addinivalue_line("markers", "llamacpp: runs exported GGUFs in llama-cpp-python (opt-in: pytest -m llamacpp)")


def pytest_runtest_logreport(report):
    """With MINIFT_EAGER_FAILURES=1 a failure's traceback is printed when it happens, so a run
    killed at a time limit (the lent GPU's) still shows why earlier tests failed."""
    if report.failed and os.environ.get("MINIFT_EAGER_FAILURES") == "1":
        print(f"\n=== FAILED {report.nodeid}\n{report.longreprtext[-4000:]}\n", flush=True)


def pytest_collection_modifyitems(config, items):
    if "llamacpp" not in (config.getoption("markexpr", "") or ""):  # opt-in: only when -m names it
        skip_llamacpp = pytest.mark.skip(reason="llama.cpp tests are opt-in: pytest -m llamacpp")
        for item in items:
            if "llamacpp" in item.keywords:
                item.add_marker(skip_llamacpp)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
