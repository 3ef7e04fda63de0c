"""ops.nf4_matmul: x @ W^T (+ bias) reading NF4 weights once. Against a float64 reference (no worse
than plain PyTorch in the same dtype), W dequantised bit-exactly in the kernel, every tile path
(split K, batched K slices, masked tails, several x-row tiles), the fallbacks, gradients, opcheck,
compile, Linear4bit's small-batch path, input errors."""

from __future__ import annotations

import importlib
from unittest import mock

import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from op_checks import assert_no_worse
from ops_helpers import assert_compiled_matches_eager, make_x, upstream

import minift.ops as ops
from minift.errors import InputError
from minift.ops import _backend, nf4
from minift.ops import reference as ref
from minift.ops.nf4 import NF4Weight

nm = importlib.import_module("minift.ops.nf4_matmul")  # the module (minift.ops.nf4_matmul is the function)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Kernel paths the default rules may not pick for small test shapes: split K (ticket reduction),
# batched K slices (S > 1), narrow K slices.
CONFIGS = [None, dict(SPLIT=3), dict(S=2, BLOCK_N=32, num_warps=2), dict(BLOCK_N=16, S=4, KS=128, SPLIT=2, num_warps=4)]
# The one-row kernel's tiles: the rules, one row a program, a K tile narrower than K (several
# iterations, a masked tail), wide programs; None: one row takes the tensor-core kernel instead.
GEMV_CONFIGS = [{}, dict(BLOCK_N=1, BLOCK_K=256, num_warps=1), dict(BLOCK_N=8, BLOCK_K=512, num_warps=4), None]


def quantize(n: int, k: int, dtype: torch.dtype, nested: bool, device: str, seed: int = 0, blocksize: int = 64):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * (0.5 + torch.rand(n, 1, generator=gen))).to(dtype).to(device)
    data, qs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    return NF4Weight.from_bnb(data, qs)


def ref64(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x float64 @ the dequantised W (the op's W: w.dtype, then x's dtype) float64 (+ bias)."""
    y = x.double() @ ref.dequantize_nf4(w).to(x.dtype).double().T
    return y if bias is None else y + bias.to(x.dtype).double()


def run(x, w, bias=None, cfg=None, backend="triton", gemv_cfg=None, low_rank=None):
    """The op with `cfg` as the tensor-core kernel's override and `gemv_cfg` the one-row kernel's
    (None: one row takes the tensor-core kernel)."""
    old = nm.CONFIG_OVERRIDE, nm.GEMV_CONFIG_OVERRIDE, nm.GEMV_ROWS
    nm.CONFIG_OVERRIDE = cfg
    nm.GEMV_CONFIG_OVERRIDE, nm.GEMV_ROWS = (None, 0) if gemv_cfg is None and cfg is not None else (gemv_cfg, 1)
    try:
        with ops.backend(backend):
            return ops.nf4_matmul(x, w, bias, low_rank=low_rank)
    finally:
        nm.CONFIG_OVERRIDE, nm.GEMV_CONFIG_OVERRIDE, nm.GEMV_ROWS = old


def spy(name):
    return mock.patch.object(nm, name, wraps=getattr(nm, name))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=min(settings.default.max_examples, 60))  # each draw may compile a kernel variant on a GPU
@given(
    m=st.integers(1, 17),
    n=st.integers(1, 80),
    k64=st.sampled_from([1, 3, 4, 6, 9]),
    dtype=st.sampled_from(DTYPES),
    w_dtype=st.sampled_from([None, torch.bfloat16, torch.float32]),
    nested=st.booleans(),
    has_bias=st.booleans(),
    layout=st.sampled_from(["contiguous", "strided", "sliced", "expanded", "batched"]),
    cfg=st.sampled_from(CONFIGS),
    gemv_cfg=st.sampled_from(GEMV_CONFIGS),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(device, m, n, k64, dtype, w_dtype, nested, has_bias, layout, cfg, gemv_cfg, seed):
    k = 64 * k64
    w = quantize(n, k, w_dtype or dtype, nested, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = make_x(m, k, dtype, layout, device, gen)
    bias = torch.randn(n, generator=gen).to(dtype).to(device) if has_bias else None
    if gemv_cfg is None:
        cfg = cfg or dict(SPLIT=1)  # one row through the tensor-core kernel
    with spy("_launch") as launched, spy("_launch_gemv") as one_row:
        y = run(x, w, bias, cfg, gemv_cfg=gemv_cfg)
    assert launched.call_count == 1
    assert one_row.call_count == (x.numel() == k and gemv_cfg is not None)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], n)
    assert_no_worse(y, ref.nf4_matmul(x, w, bias), ref64(x, w, bias), dtype, f"nf4_matmul {layout} {cfg} {gemv_cfg}",
                    factor=max(1.0, (32 / y.numel()) ** 0.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_dtype, nested, blocksize", [(None, True, 64), (None, False, 64), (torch.float32, True, 32),
                                                        (torch.bfloat16, False, 128), (None, True, 256)])
def test_weight_dequantised_exactly(device, dtype, w_dtype, nested, blocksize):
    """x = rows of the identity: y = W^T exactly, so the kernel's in-register dequantisation (nested
    absmax, rounding to w.dtype then x's dtype) is dequantize_nf4's bit for bit; 64 rows take
    two x-row tiles of 32; single rows take the one-row kernel (K in one tile and in two)."""
    n, k = 70, 256
    w = quantize(n, k, w_dtype or dtype, nested, device, seed=blocksize, blocksize=blocksize)
    want = ref.dequantize_nf4(w).to(dtype).T
    eye = torch.eye(k, dtype=dtype, device=device)
    for cfg in (None, dict(SPLIT=2, S=2, BLOCK_N=32, num_warps=2)):
        got = torch.cat([run(eye[i:i + 64], w, cfg=cfg) for i in range(0, k, 64)])
        assert torch.equal(got, want), cfg
    for gemv_cfg, rows in (({}, (0, 63, k - 1)), (dict(BLOCK_K=128 if blocksize <= 64 else 256), (1, 129)),
                           (dict(BLOCK_N=4, BLOCK_K=128 if blocksize <= 64 else 256, num_warps=1), (2, 200))):
        for i in rows:
            assert torch.equal(run(eye[i:i + 1], w, gemv_cfg=gemv_cfg), want[i:i + 1]), (i, gemv_cfg)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_split_independent(device):
    """Split K adds its partials in split order: repeated calls are bit-identical (the ticket counters
    reset themselves), and a split changes only the float32 summation order."""
    w = quantize(96, 2048, torch.bfloat16, True, device, seed=7)
    x = torch.randn(4, 2048, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16).to(device)
    a, b = run(x, w, cfg=dict(SPLIT=4)), run(x, w, cfg=dict(SPLIT=4))
    assert torch.equal(a, b)
    torch.testing.assert_close(run(x, w, cfg=dict(SPLIT=1)).float(), a.float(), rtol=1.6e-2, atol=1e-2)
    assert int(_backend._TICKETS[x.device].abs().sum()) == 0


def test_default_rules_split_k_for_short_grids():
    """K is split to fill one wave of 2 programs an SM, never past it (132 SMs off CUDA)."""
    cfg = nm._config(1, 4096, 14336, torch.device("cpu"))  # Llama-3.1-8B's down_proj: 64 tiles
    assert cfg["BLOCK_N"] == 64 and cfg["S"] == 1 and cfg["SPLIT"] == 4
    assert nm._config(1, 14336, 4096, torch.device("cpu"))["SPLIT"] == 1  # 224 tiles: a wave already
    assert nm._config(16, 512, 2048, torch.device("cpu"))["SPLIT"] == 4  # capped by K: >= 2 iterations a split


def test_fallbacks_take_the_reference():
    """K not a multiple of the blocksize, more rows than MAX_ROWS, float64, and the torch backend
    dequantise + F.linear instead of launching the kernel."""
    gen = torch.Generator().manual_seed(3)
    cases = [(quantize(10, 96, torch.float32, True, "cpu"), torch.randn(3, 96, generator=gen)),
             (quantize(10, 64, torch.bfloat16, False, "cpu"), torch.randn(nm.MAX_ROWS + 1, 64, generator=gen).bfloat16()),
             (quantize(10, 64, torch.float32, True, "cpu"), torch.randn(2, 64, generator=gen, dtype=torch.float64))]
    for w, x in cases:
        with spy("_launch") as launched:
            y = run(x, w)
        assert launched.call_count == 0
        torch.testing.assert_close(y, ref.nf4_matmul(x, w), rtol=0, atol=0)
    w, x = cases[0][0], torch.randn(2, 96, generator=gen)
    with spy("_launch") as launched:
        assert torch.equal(run(x[:, :96], w, backend="torch"), ref.nf4_matmul(x, w))
        assert torch.equal(ops.nf4_matmul(x, w), ref.nf4_matmul(x, w))  # auto: CPU tensors take the reference
    assert launched.call_count == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["random", "sum"])
def test_backward_matches_reference_autograd(device, dtype, mode):
    gen = torch.Generator().manual_seed(11)
    w = quantize(48, 192, dtype, True, device, seed=11)
    x = torch.randn(2, 3, 192, generator=gen).to(dtype).to(device).requires_grad_()
    bias = torch.randn(48, generator=gen).to(dtype).to(device).requires_grad_()
    with ops.backend("triton"):
        y = ops.nf4_matmul(x, w, bias)
    g = upstream(y, mode, torch.Generator().manual_seed(12))
    dx, db = torch.autograd.grad(y, (x, bias), g)
    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y64 = F.linear(x64, ref.dequantize_nf4(w).to(dtype).double(), b64)
    dx64, db64 = torch.autograd.grad(y64, (x64, b64), g.double())
    xt, bt = x.detach().requires_grad_(), bias.detach().requires_grad_()
    dxt, dbt = torch.autograd.grad(ref.nf4_matmul(xt, w, bt), (xt, bt), g)
    assert_no_worse(dx, dxt, dx64, dtype, "dx")
    assert_no_worse(db, dbt, db64, dtype, "dbias")


def test_backward_saves_no_dense_weight():
    w = quantize(128, 64, torch.float32, True, "cpu")
    x = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t), \
            ops.backend("triton"):
        y = ops.nf4_matmul(x, w)
    y.sum().backward()
    assert (128, 64) not in saved and x.grad.shape == x.shape


def test_opcheck():
    w = quantize(40, 128, torch.float32, True, "cpu")
    ts, meta = nf4.pack_base(w)
    x = torch.randn(3, 128, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    with ops.backend("triton"):
        torch.library.opcheck(torch.ops.minift.nf4_matmul.default, (x, ts, meta, bias, None, None, 0.0))
        torch.library.opcheck(torch.ops.minift.nf4_matmul.default, (x.detach(), ts, meta, None, None, None, 0.0))
        a, b = torch.randn(4, 128, requires_grad=True), torch.randn(40, 4, requires_grad=True)
        for rows in (x[:1], x):  # the one-row kernel's epilogue, and the adapter after the tensor-core kernel
            torch.library.opcheck(torch.ops.minift.nf4_matmul.default, (rows, ts, meta, None, a, b, 0.5))
        torch.library.opcheck(torch.ops.minift.nf4_matmul_backward.default, (torch.randn(3, 40), ts, meta, 0))


def test_compile_fullgraph_matches_eager():
    w = quantize(48, 192, torch.bfloat16, True, "cpu", seed=5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 192, generator=gen).bfloat16()
    bias = torch.randn(48, generator=gen).bfloat16()
    assert_compiled_matches_eager(lambda x, b: ops.nf4_matmul(x, w, b).float().square().sum(), (x, bias), "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 6, 16, 17])
def test_linear4bit_small_batches_use_it(device, rows):
    """Linear4bit without an input gradient and <= 16 rows runs nf4_matmul, equal to its old
    dequantise + F.linear path (bit for bit where both take the reference, as CPU's auto backend
    does; within rounding with the kernel); 17 rows, and inputs needing a gradient, keep the old paths."""
    from minift.quant import Linear4bit
    from minift.quant import linear4bit as l4

    w = quantize(96, 128, torch.bfloat16, True, device, seed=rows)
    layer = Linear4bit.from_nf4(w, bias=torch.randn(96, device=device))
    x = torch.randn(rows, 1, 128, generator=torch.Generator().manual_seed(rows)).to(device)  # float32 in
    old = F.linear(x.to(torch.bfloat16), layer.dequantize(), layer.bias).float()
    with torch.no_grad(), mock.patch.object(l4.ops, "nf4_matmul", wraps=l4.ops.nf4_matmul) as called:
        got = layer(x)
        assert called.call_count == (rows <= l4.NF4_MATMUL_MAX_ROWS)
        with ops.backend("triton"):
            kernel = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 1, 96)
    if device == "cpu":
        assert torch.equal(got, old)
    xb = x.to(torch.bfloat16)
    assert_no_worse(kernel.bfloat16(), old.bfloat16(), ref64(xb, w, layer.bias), torch.bfloat16, "Linear4bit")
    with mock.patch.object(l4.ops, "nf4_matmul", wraps=l4.ops.nf4_matmul) as called:
        y = layer(x.requires_grad_())
        y.sum().backward()
    assert called.call_count == 0 and x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=min(settings.default.max_examples, 40))
@given(
    m=st.sampled_from([1, 1, 3]),
    n=st.integers(1, 80),
    k64=st.sampled_from([1, 3, 4]),
    dtype=st.sampled_from(DTYPES),
    nested=st.booleans(),
    has_bias=st.booleans(),
    rank=st.sampled_from([1, 3, 8, 16]),
    a_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    gemv_cfg=st.sampled_from(GEMV_CONFIGS[:3]),
    seed=st.integers(0, 2**16),
)
def test_low_rank_matches_float64(device, m, n, k64, dtype, nested, has_bias, rank, a_dtype, gemv_cfg, seed):
    """An unmerged adapter (A, B, scaling): in the one-row kernel's epilogue (A x from a small launch),
    after the tensor-core kernel for more rows; no worse than the torch path against float64."""
    k = 64 * k64
    w = quantize(n, k, dtype, nested, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    a = (torch.randn(rank, k, generator=gen) / k**0.5).to(a_dtype).to(device)
    b = (torch.randn(n, rank, generator=gen) * 0.2).to(a_dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device) if has_bias else None
    with spy("_launch_gemv") as one_row:
        y = run(x, w, bias, gemv_cfg=gemv_cfg, low_rank=(a, b, 0.5))
    assert one_row.call_count == (m == 1)
    plain = run(x, w, bias, backend="torch", low_rank=(a, b, 0.5))
    want = ref64(x, w, bias) + 0.5 * (x.double() @ a.double().T) @ b.double().T
    assert y.dtype == dtype and y.shape == (m, n)
    # factor: on the CPU interpreter each of the adapter's extra 16-bit roundings truncates
    assert_no_worse(y, plain, want, dtype, f"nf4_matmul low_rank {gemv_cfg}",
                    factor=max(1.0, (32 / y.numel()) ** 0.5) * (1 if dtype == torch.float32 or device != "cpu" else 4))


@pytest.mark.parametrize("rows", [1, 3])
def test_low_rank_gradients(rows):
    """Gradients for x, bias, A and B: finite differences in float64 (the reference path), and the
    kernel path's autograd (one row: the epilogue) against autograd through the plain formula."""
    w = quantize(24, 128, torch.float32, True, "cpu", seed=3)
    gen = torch.Generator().manual_seed(4)
    d = dict(dtype=torch.float64)
    x, bias = torch.randn(rows, 128, generator=gen, **d), torch.randn(24, generator=gen, **d)
    a, b = torch.randn(3, 128, generator=gen, **d) / 10, torch.randn(24, 3, generator=gen, **d)
    inputs = [t.requires_grad_() for t in (x, bias, a, b)]
    with ops.backend("torch"):
        torch.autograd.gradcheck(lambda x, bias, a, b: ops.nf4_matmul(x, w, bias, low_rank=(a, b, 1.5)), inputs)
    x32, b32, a32, bb32 = (t.detach().float().requires_grad_() for t in inputs)
    with ops.backend("triton"):
        y = ops.nf4_matmul(x32, w, b32, low_rank=(a32, bb32, 1.5))
    want = x32 @ ref.dequantize_nf4(w).float().T + b32 + 1.5 * (x32 @ a32.T) @ bb32.T
    go = torch.randn(y.shape, generator=gen)
    got = torch.autograd.grad(y, (x32, b32, a32, bb32), go)
    for g1, g2 in zip(got, torch.autograd.grad(want, (x32, b32, a32, bb32), go)):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)


def test_low_rank_input_errors():
    w = quantize(8, 64, torch.float32, False, "cpu")
    x = torch.randn(1, 64)
    for bad in [(torch.randn(2, 63), torch.randn(8, 2), 1.0), (torch.randn(2, 64), torch.randn(8, 3), 1.0),
                (torch.randn(2, 64), torch.randn(8, 2), "1"), (torch.randn(2, 64),)]:
        with pytest.raises(InputError, match=r"nf4_matmul: low_rank\[0\]"):
            ops.nf4_matmul(x, w, low_rank=bad)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda w, x, b: (x[:, :64], w, None), r"x: last dim 64"),
        (lambda w, x, b: (x.long(), w, None), r"x: expected a floating-point"),
        (lambda w, x, b: (x, ref.dequantize_nf4(w), None), r"w: expected NF4Weight"),
        (lambda w, x, b: (x, w, b[:5]), r"bias: expected"),
        (lambda w, x, b: (x, w, b.long()), r"bias: expected"),
        (lambda w, x, b: (x, _with(w, absmax=w.absmax[:3]), None), r"w\.absmax"),
        (lambda w, x, b: (x, _with(w, shape=torch.Size([8, 8, 16])), None), r"w\.shape"),
    ],
)
def test_input_errors(make, match):
    w = quantize(8, 128, torch.float32, True, "cpu")
    x, b = torch.randn(2, 128), torch.randn(8)
    with pytest.raises(InputError, match=match):
        ops.nf4_matmul(*make(w, x, b))


def _with(w: NF4Weight, **changes) -> NF4Weight:
    import dataclasses

    return dataclasses.replace(w, **changes)
