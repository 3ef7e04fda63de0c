"""Fused LoRA linear and LoRA MLP: forward and gradients against a float64 reference, no worse
than plain PyTorch in the same dtype; 16-bit and NF4 bases; compile; input errors."""

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import bitsandbytes.functional as bnbF
from hypothesis import given
from hypothesis import strategies as st

import minift.ops as ops
from minift.errors import InputError
from minift.ops import lora, nf4
from minift.ops import reference as ref
from minift.ops.nf4 import NF4Weight

from op_checks import assert_no_worse


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RANKS = [1, 7, 16]
ACTS = ["swiglu", "geglu_tanh", "geglu"]


def make_base(out: int, inn: int, dtype, quant: bool, device, gen):
    w = (torch.randn(out, inn, generator=gen) / inn**0.5).to(dtype).to(device)
    if not quant:
        return w
    data, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=bool(out % 128))
    return NF4Weight.from_bnb(data, qs)


def dense64(base) -> torch.Tensor:
    return (base if isinstance(base, torch.Tensor) else ref.dequantize_nf4(base)).double()


def make_adapter(out: int, inn: int, r: int, device, gen):
    a = (torch.randn(r, inn, generator=gen) / inn**0.5).to(device).requires_grad_()
    b = (torch.randn(out, r, generator=gen) * 0.2).to(device).requires_grad_()
    return a, b


def make_x(lead: tuple, inn: int, dtype, layout: str, device, gen) -> torch.Tensor:
    """2-D or 3-D x; 'strided' builds it as a transposed view (last dim not contiguous)."""
    if layout == "strided":
        x = torch.randn(inn, *lead, generator=gen).to(dtype).to(device).movedim(0, -1)
        assert not x.is_contiguous() or inn == 1 or x.numel() == inn
    else:
        x = torch.randn(*lead, inn, generator=gen).to(dtype).to(device)
    return x.requires_grad_()


def make_grad(shape: tuple, dtype, device, gen) -> torch.Tensor:
    """A non-contiguous upstream gradient of `shape`."""
    g = torch.randn(*reversed(shape), generator=gen).to(dtype).to(device).permute(*reversed(range(len(shape))))
    assert g.shape == shape and (len(shape) == 1 or not g.is_contiguous() or 1 in shape)
    return g


def check(kernel, torch_out, ref64, dtype, what):
    """assert_no_worse with the extra tolerance widened for outputs of a few elements: there one
    intermediate rounding, amplified by cancellation, decides which of two equally exact paths
    lands closer (kernel and PyTorch round in different places), so it grows as 1/sqrt(numel)."""
    assert_no_worse(kernel, torch_out, ref64, dtype, what, factor=max(1.0, (32 / max(ref64.numel(), 1)) ** 0.5))


def leaves64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def spy(name, module):
    return mock.patch.object(module, name, wraps=getattr(module, name))


# ---- lora_linear ----------------------------------------------------------------------------------


@st.composite
def linear_cases(draw):
    quant = draw(st.booleans())
    if quant:
        inn, out = 64 * draw(st.integers(1, 2)), 64 * draw(st.integers(1, 3))
    else:
        inn, out = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    layout = draw(st.sampled_from(["2d", "3d", "strided"]))
    lead = (draw(st.integers(1, 17)),) if layout == "2d" else (draw(st.integers(1, 3)), draw(st.integers(1, 6)))
    return dict(
        quant=quant, inn=inn, out=out, layout=layout, lead=lead, r=draw(st.sampled_from(RANKS)),
        dtype=draw(st.sampled_from(DTYPES)), bias=draw(st.booleans()), scale=draw(st.floats(0.1, 4.0)),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("device", DEVICES)
@given(case=linear_cases())
def test_lora_linear_matches_reference(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, scale = case["dtype"], case["scale"]
    base = make_base(case["out"], case["inn"], dtype, case["quant"], device, gen)
    a, b = make_adapter(case["out"], case["inn"], case["r"], device, gen)
    bias = (torch.randn(case["out"], generator=gen)).to(dtype).to(device) if case["bias"] else None
    x = make_x(case["lead"], case["inn"], dtype, case["layout"], device, gen)
    gy = make_grad((*case["lead"], case["out"]), dtype, device, gen)

    spied = spy("_dequant_triton", nf4) if case["quant"] else contextlib.nullcontext()
    with ops.backend("triton"), spied as s:
        y = ops.lora_linear(x, base, a, b, scale, bias)
        got = torch.autograd.grad(y, (x, a, b), gy)
    if case["quant"]:
        assert s.call_count == 2  # forward and backward each dequantise; nothing cached

    want = ref.lora_linear(x, base, a, b, scale, bias)
    torch_grads = torch.autograd.grad(want, (x, a, b), gy)

    x64, a64, b64 = leaves64(x, a, b)
    y64 = ref.lora_linear(x64, dense64(base), a64, b64, scale, None if bias is None else bias.double())
    grads64 = torch.autograd.grad(y64, (x64, a64, b64), gy.double())

    assert y.dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    check(y, want, y64, dtype, "y")
    for what, k, t, r in zip(("dx", "dA", "dB"), got, torch_grads, grads64):
        check(k, t, r, dtype, what)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_without_x_grad(device):
    gen = torch.Generator().manual_seed(0)
    base = make_base(64, 128, torch.bfloat16, True, device, gen)
    a, b = make_adapter(64, 128, 4, device, gen)
    x = torch.randn(5, 128, generator=gen).to(torch.bfloat16).to(device)
    with ops.backend("triton"), spy("_dequant_triton", nf4) as s:
        y = ops.lora_linear(x, base, a, b, 2.0)
        da, db = torch.autograd.grad(y.float().sum(), (a, b))
    assert s.call_count == 1  # no dx wanted: the backward skips dequantising the base
    ra, rb = torch.autograd.grad(ref.lora_linear(x, base, a, b, 2.0).float().sum(), (a, b))
    torch.testing.assert_close(da, ra, rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(db, rb, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_mlp_without_x_grad(device):
    gen = torch.Generator().manual_seed(0)
    projs = [(make_base(o, i, torch.float32, q, device, gen), *make_adapter(o, i, 4, device, gen))
             for (o, i), q in (((128, 64), True), ((128, 64), False), ((64, 128), True))]
    params = [t for p in projs for t in p[1:]]
    x = torch.randn(5, 64, generator=gen).to(device)
    with ops.backend("triton"):
        got = torch.autograd.grad(ops.lora_mlp(x, *projs, activation="geglu").sum(), params)
    want = torch.autograd.grad(ref.lora_mlp(x, *projs, activation="geglu").sum(), params)
    for k, r in zip(got, want):
        torch.testing.assert_close(k, r, rtol=1e-4, atol=1e-5)


# ---- lora_mlp -------------------------------------------------------------------------------------


@st.composite
def mlp_cases(draw):
    quant = draw(st.booleans())
    if quant:
        hid, inter = 64, 64 * draw(st.integers(1, 2))
        nf4_on = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    else:
        hid, inter = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        nf4_on = (False, False, False)
    layout = draw(st.sampled_from(["2d", "3d", "strided"]))
    lead = (draw(st.integers(1, 13)),) if layout == "2d" else (draw(st.integers(1, 3)), draw(st.integers(1, 5)))
    scale = draw(st.one_of(st.floats(0.1, 4.0), st.tuples(*[st.floats(0.1, 4.0)] * 3)))
    return dict(
        hid=hid, inter=inter, nf4=nf4_on, layout=layout, lead=lead, scale=scale,
        adapters=draw(st.tuples(st.booleans(), st.booleans(), st.booleans())),
        ranks=draw(st.tuples(*[st.sampled_from(RANKS)] * 3)),
        dtype=draw(st.sampled_from(DTYPES)), act=draw(st.sampled_from(ACTS)), seed=draw(st.integers(0, 2**16)),
    )


def mlp64(x, projs, act, scale):
    """The MLP in float64 with the dequantised weights (no float32 detour in the activation)."""
    sg, su, sd = scale if isinstance(scale, tuple) else (scale,) * 3

    def proj(t, p, s):
        w, a, b = p
        y = t @ w.t()
        return y if a is None else y + s * (t @ a.t()) @ b.t()

    e, g = proj(x, projs[0], sg), proj(x, projs[1], su)
    act_e = F.silu(e) if act == "swiglu" else F.gelu(e, approximate="tanh" if act == "geglu_tanh" else "none")
    return proj(act_e * g, projs[2], sd)


# tl.sigmoid is 1 / (1 + exp(-x)): exp overflows to inf for very negative x, giving the right 0;
# only the interpreter's numpy says so.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
@given(case=mlp_cases())
def test_lora_mlp_matches_reference(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, hid, inter = case["dtype"], case["hid"], case["inter"]
    dims = ((inter, hid), (inter, hid), (hid, inter))
    projs = []
    for (out, inn), q, has, r in zip(dims, case["nf4"], case["adapters"], case["ranks"]):
        base = make_base(out, inn, dtype, q, device, gen)
        projs.append((base, *(make_adapter(out, inn, r, device, gen) if has else (None, None))))
    params = [t for p in projs for t in p[1:] if t is not None]
    x = make_x(case["lead"], hid, dtype, case["layout"], device, gen)
    gy = make_grad((*case["lead"], hid), dtype, device, gen)

    with ops.backend("triton"), spy("_act_fwd_triton", lora) as f, spy("_act_bwd_triton", lora) as bwd:
        y = ops.lora_mlp(x, *projs, activation=case["act"], scale=case["scale"])
        got = torch.autograd.grad(y, (x, *params), gy)
    assert f.call_count == 1 and bwd.call_count == 1

    want = ref.lora_mlp(x, *projs, activation=case["act"], scale=case["scale"])
    torch_grads = torch.autograd.grad(want, (x, *params), gy)

    x64, *p64 = leaves64(x, *params)
    it = iter(p64)
    projs64 = [(dense64(p[0]), *((next(it), next(it)) if p[1] is not None else (None, None))) for p in projs]
    y64 = mlp64(x64, projs64, case["act"], case["scale"])
    grads64 = torch.autograd.grad(y64, (x64, *[t for t in p64]), gy.double())

    assert y.dtype == dtype and all(g.dtype == torch.float32 for g in got[1:])
    check(y, want, y64, dtype, "y")
    for i, (k, t, r) in enumerate(zip(got, torch_grads, grads64)):
        check(k, t, r, dtype, "dx" if i == 0 else f"param {i - 1}")


def test_lora_mlp_saves_no_weights():
    """Only x, e, g, the adapters and the (frozen, un-copied) bases are kept for the backward."""
    gen = torch.Generator().manual_seed(1)
    projs = [(make_base(o, i, torch.bfloat16, True, "cpu", gen), *make_adapter(o, i, 4, "cpu", gen))
             for o, i in ((128, 64), (128, 64), (64, 128))]
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16).requires_grad_()
    y = ops.lora_mlp(x, *projs)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    big = [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() >= 64 * 128]
    assert big == [], f"dense weights saved: {big}"
    assert {tuple(t.shape) for t in saved if t.dtype == torch.bfloat16} == {(3, 64), (3, 128)}


# ---- torch.compile --------------------------------------------------------------------------------


def _compiled_vs_eager(fn, inputs, gy):
    with ops.backend("triton"):
        eager = fn(*inputs)
        ge = torch.autograd.grad(eager, inputs, gy)
        compiled = torch.compile(fn, fullgraph=True)(*inputs)
        gc = torch.autograd.grad(compiled, inputs, gy)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for c, e in zip(gc, ge):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


def test_compile_lora_linear():
    gen = torch.Generator().manual_seed(2)
    base = make_base(128, 64, torch.bfloat16, True, "cpu", gen)
    a, b = make_adapter(128, 64, 7, "cpu", gen)
    x = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16).requires_grad_()
    gy = torch.randn(2, 3, 128, generator=gen).to(torch.bfloat16)
    _compiled_vs_eager(lambda x, a, b: ops.lora_linear(x, base, a, b, 0.5), (x, a, b), gy)


def test_compile_lora_mlp():
    gen = torch.Generator().manual_seed(3)
    gate = (make_base(128, 64, torch.bfloat16, True, "cpu", gen), *make_adapter(128, 64, 4, "cpu", gen))
    up = (make_base(128, 64, torch.bfloat16, False, "cpu", gen), None, None)
    down = (make_base(64, 128, torch.bfloat16, True, "cpu", gen), *make_adapter(64, 128, 4, "cpu", gen))
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16).requires_grad_()
    gy = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    fn = lambda x, ga, gb, da, db: ops.lora_mlp(x, (gate[0], ga, gb), up, (down[0], da, db), "geglu_tanh", (1.0, 1.0, 2.0))  # noqa: E731
    _compiled_vs_eager(fn, (x, gate[1], gate[2], down[1], down[2]), gy)


def test_opcheck_lora_ops():
    gen = torch.Generator().manual_seed(4)
    base = make_base(64, 64, torch.float32, True, "cpu", gen)
    a, b = make_adapter(64, 64, 3, "cpu", gen)
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    ts, meta = nf4.pack_base(base)
    torch.library.opcheck(torch.ops.minift.lora_linear.default, (x, ts, meta, a, b, 0.5, None))
    w = make_base(64, 64, torch.float32, False, "cpu", gen)
    torch.library.opcheck(
        torch.ops.minift.lora_mlp.default,
        (x, ts, meta, a, b, [w], [], None, None, [w], [], a, b, [1.0, 1.0, 0.5], 0),
    )


# ---- input errors ---------------------------------------------------------------------------------


def _linear_args(**kw):
    gen = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(3, 10, generator=gen), base=torch.randn(6, 10, generator=gen),
                lora_a=torch.randn(4, 10, generator=gen), lora_b=torch.randn(6, 4, generator=gen), scale=1.0)
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(lora_a=torch.randn(4, 9)), "lora_a"),
        (dict(lora_b=torch.randn(6, 3)), "lora_b"),
        (dict(lora_b=torch.randn(5, 4)), "lora_b"),
        (dict(x=torch.randn(3, 9), lora_a=torch.randn(4, 9)), "base"),
        (dict(base=torch.randn(6, 10).half()), "base"),
        (dict(base=torch.randn(6, 10, requires_grad=True)), "base"),
        (dict(bias=torch.randn(5)), "bias"),
        (dict(x=torch.randn(3, 10).long()), "x"),
    ],
)
def test_lora_linear_bad_input(kw, name):
    with pytest.raises(InputError, match=rf"^{name}\b"):
        ops.lora_linear(**_linear_args(**kw))


def test_lora_linear_bad_nf4_metadata():
    gen = torch.Generator().manual_seed(0)
    base = make_base(64, 64, torch.float32, True, "cpu", gen)
    base.absmax = base.absmax[:-1]
    with pytest.raises(InputError, match=r"^base\.absmax"):
        ops.lora_linear(torch.randn(2, 64), base, torch.randn(2, 64), torch.randn(64, 2), 1.0)


@pytest.mark.parametrize("which, name", [("up", "up.base"), ("down", "down.base"), ("gate_a", "gate.lora_a"),
                                         ("down_b", "down.lora_b"), ("act", "activation"), ("half", "up.lora_a")])
def test_lora_mlp_bad_input(which, name):
    r = lambda *s: torch.randn(*s)  # noqa: E731
    gate, up, down = (r(12, 8), r(2, 8), r(12, 2)), (r(12, 8), None, None), (r(8, 12), r(3, 12), r(8, 3))
    act = "swiglu"
    if which == "up":
        up = (r(11, 8), None, None)
    elif which == "down":
        down = (r(8, 11), None, None)
    elif which == "gate_a":
        gate = (r(12, 8), r(2, 7), r(12, 2))
    elif which == "down_b":
        down = (r(8, 12), r(3, 12), r(8, 2))
    elif which == "act":
        act = "relu"
    else:
        up = (r(12, 8), r(2, 8), None)
    with pytest.raises(InputError, match=rf"^{name}"):
        ops.lora_mlp(r(2, 8), gate, up, down, act)
