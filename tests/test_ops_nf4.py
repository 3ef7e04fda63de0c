"""NF4 dequantisation: bit-identical to bitsandbytes (reference and Triton), converters, checks."""

from unittest import mock

import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minift.ops as ops
from minift.errors import InputError, QuantizationError
from minift.ops import nf4
from minift.ops import reference as ref
from minift.ops.nf4 import NF4Weight


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def quantize(rows: int, cols: int, dtype: torch.dtype, nested: bool, device: str, seed: int = 0, log_mag: float = 0.0):
    """A weight with per-column magnitudes spread over ~6 decades around 10**log_mag (kept inside
    float16's range), quantised by bitsandbytes."""
    gen = torch.Generator().manual_seed(seed)
    spread = 10 ** (torch.rand(cols, generator=gen) * 6 - 3 + log_mag)
    w = (torch.randn(rows, cols, generator=gen) * spread).clamp(-6e4, 6e4).to(dtype).to(device)
    data, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    return data, qs


@pytest.mark.parametrize("device", DEVICES)
@given(
    rows=st.integers(1, 160),
    cols64=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    nested=st.booleans(),
    seed=st.integers(0, 2**16),
    log_mag=st.floats(-3.0, 1.0),
)
def test_dequantize_bit_identical_to_bnb(device, rows, cols64, dtype, nested, seed, log_mag):
    data, qs = quantize(rows, 64 * cols64, dtype, nested, device, seed, log_mag)
    want = bnbF.dequantize_4bit(data, qs, quant_type="nf4")
    w = NF4Weight.from_bnb(data, qs)
    assert w.nested == nested

    got_ref = ref.dequantize_nf4(w)
    assert got_ref.dtype == dtype and got_ref.shape == want.shape
    assert torch.equal(got_ref, want)

    with ops.backend("triton"), mock.patch.object(nf4, "_dequant_triton", wraps=nf4._dequant_triton) as spy:
        got = ops.dequantize_nf4(w)
    assert spy.call_count == 1
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_many_nested_blocks(device, dtype):
    # 1200 absmax blocks: five nested blocks of 256, the last one partial.
    data, qs = quantize(200, 384, dtype, True, device, seed=3)
    assert qs.state2.absmax.numel() == 5
    want = bnbF.dequantize_4bit(data, qs, quant_type="nf4")
    w = NF4Weight.from_bnb(data, qs)
    with ops.backend("triton"):
        assert torch.equal(ops.dequantize_nf4(w), want)
    assert torch.equal(w.dequantize(), want)  # device's default path


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024, 4096])
def test_dequantize_other_blocksizes(device, blocksize):
    # in_features a multiple of blocksize: bitsandbytes' CPU kernel counts blocks per row, its
    # CUDA and generic kernels (and minift) over the flat tensor; they agree only then.
    gen = torch.Generator().manual_seed(blocksize)
    w = (torch.randn(3, 4096, generator=gen) * 100).to(torch.bfloat16).to(device)
    for nested in (True, False):
        data, qs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
        nw = NF4Weight.from_bnb(data, qs)
        if blocksize < 2048 or device != "cpu":
            want = bnbF.dequantize_4bit(data, qs, quant_type="nf4")
        else:  # bitsandbytes' CPU path for large blocks torch.compiles itself: slow, so use our reference
            want = ref.dequantize_nf4(nw)
        with ops.backend("triton"):
            assert torch.equal(ops.dequantize_nf4(nw), want)


@pytest.mark.parametrize("nested", [True, False])
def test_quant_state_round_trip(nested):
    data, qs = quantize(8, 128, torch.bfloat16, nested, "cpu")
    w = NF4Weight.from_bnb(data, qs)
    qs2 = w.to_bnb_quant_state()
    assert qs2.nested == nested and qs2.quant_type == "nf4" and tuple(qs2.shape) == (8, 128)
    assert torch.equal(bnbF.dequantize_4bit(w.data, qs2, quant_type="nf4"), bnbF.dequantize_4bit(data, qs, quant_type="nf4"))
    # a state dict round trip (what pre-quantised checkpoints hold) gives the same weight
    qs3 = bnbF.QuantState.from_dict(qs.as_dict(packed=True), device=torch.device("cpu"))
    assert torch.equal(ref.dequantize_nf4(NF4Weight.from_bnb(data, qs3)), ref.dequantize_nf4(w))


def test_compile_fullgraph_matches_eager():
    data, qs = quantize(16, 192, torch.bfloat16, True, "cpu", seed=5)
    w = NF4Weight.from_bnb(data, qs)
    with ops.backend("triton"):
        eager = ops.dequantize_nf4(w)
        compiled = torch.compile(lambda w: ops.dequantize_nf4(w) * 2, fullgraph=True)(w)
    assert torch.equal(compiled, eager * 2)


@pytest.mark.parametrize("device", DEVICES)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 96), st.integers(1, 4), st.booleans()), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_dequantize_nf4_many_is_each_weight_in_turn(device, shapes, dtype, seed):
    """One call over weights of other shapes, nested or not: their bitsandbytes dequantisations
    back to back, bit for bit, with one kernel launch a weight (reference and Triton)."""
    ws, want = [], []
    for k, (rows, cols64, nested) in enumerate(shapes):
        data, qs = quantize(rows, 64 * cols64, dtype, nested, device, seed + k)
        ws.append(NF4Weight.from_bnb(data, qs))
        want.append(bnbF.dequantize_4bit(data, qs, quant_type="nf4").reshape(-1))
    want = torch.cat(want)
    with ops.backend("torch"):
        assert torch.equal(ops.dequantize_nf4_many(ws), want)
    with ops.backend("triton"), mock.patch.object(nf4, "_dequant_triton", wraps=nf4._dequant_triton) as spy:
        got = ops.dequantize_nf4_many(ws)
    assert spy.call_count == len(ws)
    assert got.dtype == dtype and torch.equal(got, want)


def test_dequantize_nf4_many_compiles_and_passes_opcheck():
    ws = [NF4Weight.from_bnb(*quantize(r, 128, torch.bfloat16, r % 2 == 0, "cpu", seed=r)) for r in (3, 8, 5)]
    with ops.backend("triton"):
        eager = ops.dequantize_nf4_many(ws)
        compiled = torch.compile(lambda ws: ops.dequantize_nf4_many(ws) * 2, fullgraph=True)(ws)
    assert torch.equal(compiled, eager * 2)
    torch.library.opcheck(torch.ops.minift.dequantize_nf4_many.default, nf4._pack_many(ws))


def test_dequantize_nf4_many_bad_input():
    w32 = _weight()
    w16 = NF4Weight.from_bnb(*quantize(4, 128, torch.float16, True, "cpu"))
    with pytest.raises(InputError, match=r"ws: expected a non-empty list"):
        ops.dequantize_nf4_many([])
    with pytest.raises(InputError, match=r"ws\[1\]: is torch.float16 .* one dtype and device"):
        ops.dequantize_nf4_many([w32, w16])
    with pytest.raises(InputError, match=r"ws\[1\]\.code"):
        ops.dequantize_nf4_many([w32, _weight(code=torch.zeros(8))])


@pytest.mark.parametrize("device", DEVICES)
@given(
    lead=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    rows=st.integers(1, 96),
    cols64=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    nested=st.booleans(),
    strided=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nf4_linear_against_float64(device, lead, rows, cols64, dtype, nested, strided, bias, seed):
    """x W^T (+ b) and its input gradient g W against float64 over the exact dequantised W, for odd
    shapes, a strided x and every dtype (reference and Triton); nothing dense is saved."""
    cols = 64 * cols64
    data, qs = quantize(rows, cols, dtype, nested, device, seed)
    w = NF4Weight.from_bnb(data, qs)
    dense = bnbF.dequantize_4bit(data, qs, quant_type="nf4").double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 2 * cols if strided else cols, generator=gen).to(device, dtype)
    x = x[..., ::2] if strided else x
    b = torch.randn(rows, generator=gen).to(device, dtype) if bias else None
    g = torch.randn(*lead, rows, generator=gen).to(device, dtype)
    want = x.double() @ dense.T + (b.double() if bias else 0)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    for backend in ("torch", "triton"):
        xr = x.detach().requires_grad_()
        saved: list[tuple] = []
        with ops.backend(backend), torch.autograd.graph.saved_tensors_hooks(
                lambda t, saved=saved: saved.append(tuple(t.shape)) or t, lambda t: t):
            y = ops.nf4_linear(xr, w, b)
        assert y.dtype == dtype and y.shape == (*lead, rows)
        assert (rows, cols) not in saved
        with ops.backend(backend):
            y.backward(g)
        scale = want.abs().max().item() + 1e-30
        assert (y.double() - want).abs().max().item() <= tol * scale
        gwant = g.double() @ dense
        assert xr.grad.dtype == dtype and (xr.grad.double() - gwant).abs().max().item() <= tol * (gwant.abs().max().item() + 1e-30)


def test_nf4_linear_compiles_and_passes_opcheck():
    data, qs = quantize(24, 128, torch.float32, True, "cpu", seed=7)
    w = NF4Weight.from_bnb(data, qs)
    x = torch.randn(2, 5, 128)
    b = torch.randn(24)
    xe = x.clone().requires_grad_()
    ye = ops.nf4_linear(xe, w, b)
    ye.square().sum().backward()
    xc = x.clone().requires_grad_()
    yc = torch.compile(lambda x: ops.nf4_linear(x, w, b), fullgraph=True)(xc)
    yc.square().sum().backward()
    assert torch.allclose(yc, ye, rtol=1e-6, atol=1e-6) and torch.allclose(xc.grad, xe.grad, rtol=1e-6, atol=1e-6)
    ts, meta = nf4.pack_base(w)
    torch.library.opcheck(torch.ops.minift.nf4_linear.default, (x.requires_grad_(), ts, meta, b))
    torch.library.opcheck(torch.ops.minift.nf4_linear_dx.default, (torch.randn(2, 5, 24), ts, meta))


def test_nf4_linear_bad_input():
    w = _weight()  # (4, 128)
    with pytest.raises(InputError, match=r"x: last dimension 64 does not match w.shape \(4, 128\)"):
        ops.nf4_linear(torch.randn(3, 64), w)
    with pytest.raises(InputError, match=r"x: expected one of .* got torch.float64"):
        ops.nf4_linear(torch.randn(3, 128, dtype=torch.float64), w)
    with pytest.raises(InputError, match=r"w\.code"):
        ops.nf4_linear(torch.randn(3, 128), _weight(code=torch.zeros(8)))


def test_opcheck():
    data, qs = quantize(4, 128, torch.float16, True, "cpu")
    ts, meta = nf4.pack_base(NF4Weight.from_bnb(data, qs))
    torch.library.opcheck(torch.ops.minift.dequantize_nf4.default, (ts, meta))


def _weight(**changes) -> NF4Weight:
    data, qs = quantize(4, 128, torch.float32, True, "cpu")
    w = NF4Weight.from_bnb(data, qs)
    for k, v in changes.items():
        setattr(w, k, v)
    return w


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(absmax=torch.zeros(3, dtype=torch.uint8)), "absmax"),
        (dict(data=torch.zeros(256, 1, dtype=torch.int8)), "data"),
        (dict(data=torch.zeros(100, 1, dtype=torch.uint8)), "data"),
        (dict(code=torch.zeros(8)), "code"),
        (dict(nested_code=None), "nested_absmax"),
        (dict(offset=torch.zeros(2)), "offset"),
        (dict(nested_absmax=torch.zeros(2)), "nested_absmax"),
        (dict(blocksize=48), "blocksize"),
        (dict(dtype=torch.int8), "dtype"),
        (dict(shape=torch.Size([4, 0])), "shape"),
    ],
)
def test_bad_metadata_names_the_field(changes, field):
    with pytest.raises(InputError, match=rf"w\.{field}"):
        ops.dequantize_nf4(_weight(**changes))


def test_non_nested_absmax_must_be_float32():
    data, qs = quantize(4, 128, torch.float32, False, "cpu")
    w = NF4Weight.from_bnb(data, qs)
    w.absmax = w.absmax.half()
    with pytest.raises(InputError, match=r"w\.absmax"):
        ops.dequantize_nf4(w)


def test_from_bnb_rejects_fp4():
    w = torch.randn(4, 128)
    data, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="fp4")
    with pytest.raises(QuantizationError, match="quant_type"):
        NF4Weight.from_bnb(data, qs)
