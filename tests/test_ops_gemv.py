"""ops.gemv / ops.linear: decoding's 16-bit x @ W^T (+ bias). Against a float64 reference (no worse
than F.linear in the same dtype) over odd shapes, strided / expanded / batched x, strided W, every
tile path (masked N and K tails, several rows of x), the fallbacks, gradients, opcheck, compile,
and the model's Linear taking it only when no gradient is wanted."""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from op_checks import assert_no_worse
from ops_helpers import assert_compiled_matches_eager, upstream

import minift.ops as ops
from minift.errors import InputError
from minift.ops import reference as ref

gm = importlib.import_module("minift.ops.gemv")  # the module (minift.ops.gemv is the function)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CONFIGS = [None, dict(BLOCK_N=1, BLOCK_K=64), dict(BLOCK_N=16, BLOCK_K=128, num_warps=2), dict(BLOCK_N=4, BLOCK_K=512)]


def make_x(m: int, k: int, dtype, layout: str, device: str, gen: torch.Generator) -> torch.Tensor:
    if layout == "strided":  # last dim not contiguous
        return torch.randn(k, m, generator=gen).to(dtype).to(device).t()
    if layout == "sliced":  # rows further apart than K
        return torch.randn(m, 2 * k + 3, generator=gen).to(dtype).to(device)[:, 1:k + 1]
    if layout == "expanded":  # stride-0 rows
        return torch.randn(1, k, generator=gen).to(dtype).to(device).expand(m, k)
    if layout == "batched":  # (2, m, k) -> 2m rows
        return torch.randn(2, m, k, generator=gen).to(dtype).to(device)
    return torch.randn(m, k, generator=gen).to(dtype).to(device)


def run(x, w, bias=None, cfg=None, backend="triton"):
    old = gm.CONFIG_OVERRIDE
    gm.CONFIG_OVERRIDE = cfg
    try:
        with ops.backend(backend):
            return ops.gemv(x, w, bias)
    finally:
        gm.CONFIG_OVERRIDE = old


def spy():
    return mock.patch.object(gm, "_launch", wraps=gm._launch)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=min(settings.default.max_examples, 60))
@given(
    m=st.integers(1, 4),
    n=st.integers(1, 70),
    k=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    has_bias=st.booleans(),
    layout=st.sampled_from(["contiguous", "strided", "sliced", "expanded", "batched"]),
    w_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    cfg=st.sampled_from(CONFIGS),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(device, m, n, k, dtype, has_bias, layout, w_layout, cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_x(m, k, dtype, layout, device, gen)
    if w_layout == "transposed":
        w = torch.randn(k, n, generator=gen).to(dtype).to(device).t()
    elif w_layout == "sliced":
        w = torch.randn(n, k + 5, generator=gen).to(dtype).to(device)[:, 2:k + 2]
    else:
        w = torch.randn(n, k, generator=gen).to(dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device) if has_bias else None
    with spy() as launched:
        y = run(x, w, bias, cfg)
    assert launched.call_count == 1
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], n)
    y64 = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert_no_worse(y, ref.linear(x, w, bias), y64, dtype, f"gemv {layout} {w_layout} {cfg}",
                    factor=max(1.0, (32 / y.numel()) ** 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_rows_up_to_max_rows_and_decode_shapes(device):
    """Every row count the kernel takes (padded to a power of two), on a Llama-3.2-1B k_proj-sized K."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(96, 2048, generator=gen).bfloat16().to(device)
    for m in range(1, gm.MAX_ROWS + 1):
        x = torch.randn(m, 2048, generator=gen).bfloat16().to(device)
        y = run(x, w)
        y64 = x.double() @ w.double().T
        assert_no_worse(y, ref.linear(x, w), y64, torch.bfloat16, f"gemv m={m}")


def test_fallbacks_take_the_reference():
    """More rows than MAX_ROWS, float64, mixed dtypes and the torch backend run F.linear."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(10, 64, generator=gen)
    cases = [(torch.randn(gm.MAX_ROWS + 1, 64, generator=gen), w), (torch.randn(2, 64, dtype=torch.float64), w.double()),
             (torch.randn(2, 64, generator=gen).bfloat16(), w)]
    for x, wt in cases:
        with spy() as launched:
            y = run(x, wt)
        assert launched.call_count == 0
        assert torch.equal(y, ref.linear(x, wt))
    x = torch.randn(2, 64, generator=gen)
    with spy() as launched:
        assert torch.equal(run(x, w, backend="torch"), F.linear(x, w))
        assert torch.equal(ops.gemv(x, w), F.linear(x, w))  # auto on CPU: the reference
    assert launched.call_count == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["random", "sum", "expand"])
def test_backward_matches_float64(device, dtype, mode):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 100, generator=gen).to(dtype).to(device).requires_grad_()
    w = torch.randn(40, 100, generator=gen).to(dtype).to(device).requires_grad_()
    b = torch.randn(40, generator=gen).to(dtype).to(device).requires_grad_()
    with ops.backend("triton"):
        y = ops.gemv(x, w, b)
    g = upstream(y, mode, torch.Generator().manual_seed(12))
    got = torch.autograd.grad(y, (x, w, b), g)
    l64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(F.linear(*l64), l64, g.double())
    lt = [t.detach().requires_grad_() for t in (x, w, b)]
    plain = torch.autograd.grad(F.linear(*lt), lt, g)
    for name, a, p, e in zip(("dx", "dw", "db"), got, plain, want):
        assert a.dtype == dtype
        assert_no_worse(a, p, e, dtype, name)


def test_opcheck():
    x, w, b = torch.randn(3, 128, requires_grad=True), torch.randn(40, 128, requires_grad=True), torch.randn(40, requires_grad=True)
    with ops.backend("triton"):
        torch.library.opcheck(torch.ops.minift.gemv.default, (x, w, b))
        torch.library.opcheck(torch.ops.minift.gemv.default, (x.detach(), w.detach(), None))


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_fullgraph(device):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, generator=gen).to(device)
    w = torch.randn(24, 64, generator=gen).to(device)
    assert_compiled_matches_eager(lambda x, w: ops.gemv(x, w).square().sum(), (x, w), device)


def test_linear_takes_gemv_only_without_grad(monkeypatch):
    """ops.linear (the model's Linear and LoRA's frozen base): the kernel for a few CUDA rows with no
    gradient wanted, F.linear otherwise - here the CUDA check is bypassed to see the routing."""
    calls = []
    monkeypatch.setattr(gm, "_gemv_op", lambda x, w, b: calls.append(x.shape) or F.linear(x, w, b))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    x, w = torch.randn(1, 1, 32), torch.randn(8, 32, requires_grad=True)
    ops.linear(x, w)  # grad enabled: F.linear
    with torch.no_grad():
        ops.linear(x, w)
        ops.linear(torch.randn(gm.MAX_ROWS + 1, 32), w)  # too many rows
    assert calls == [(1, 1, 32)]


def test_bad_input():
    with pytest.raises(InputError, match="w: expected a 2-d"):
        ops.gemv(torch.randn(2, 4), torch.randn(4))
    with pytest.raises(InputError, match="last dim 4 != w's in_features 5"):
        ops.gemv(torch.randn(2, 4), torch.randn(3, 5))
    with pytest.raises(InputError, match="bias: expected shape"):
        ops.gemv(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4))
    with pytest.raises(InputError, match="x: expected a floating-point"):
        ops.gemv(torch.ones(2, 4, dtype=torch.long), torch.randn(3, 4))
