"""ops.gemv / gemv_cat / gemv_glu and ops.linear / linear_cat: decoding's 16-bit x @ W^T for one row
of x. Against a float64 reference (no worse than F.linear / the activation op in the same dtype)
over odd shapes, strided / expanded x, strided W, every tile path (masked N and K tails, concatenated
segments, gated pairs), unmerged LoRA adapters in the epilogue, the fallbacks, gradients, opcheck,
compile, the model's routing (only when decoding, only 16-bit Linears and adapters over them) and
greedy decoding unchanged with the fused projections."""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from op_checks import assert_no_worse
from ops_helpers import assert_compiled_matches_eager, make_x, upstream

import minift.ops as ops
from minift.errors import InputError
from minift.ops import reference as ref

gm = importlib.import_module("minift.ops.gemv")  # the module (minift.ops.gemv is the function)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CONFIGS = [None, dict(BLOCK_N=1, BLOCK_K=64), dict(BLOCK_N=16, BLOCK_K=128, num_warps=2), dict(BLOCK_N=4, BLOCK_K=512)]


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
    n=st.integers(1, 70),
    k=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    has_bias=st.booleans(),
    layout=st.sampled_from(["contiguous", "strided", "sliced", "expanded", "batched"]),
    mode=st.sampled_from(["single", "cat", "glu"]),
    w_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    cfg=st.sampled_from(CONFIGS),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(device, n, k, dtype, has_bias, layout, mode, w_layout, cfg, fused, seed):
    """fused: an RMSNorm in the prologue (cat, glu; Gemma's offset on odd n) or a residual in the
    epilogue (single), against the separate norm / add in float64."""
    gen = torch.Generator().manual_seed(seed)
    x = make_x(1, k, dtype, layout, device, gen)

    def weight(rows):
        if w_layout == "transposed":
            return torch.randn(k, rows, generator=gen).to(dtype).to(device).t()
        if w_layout == "sliced":
            return torch.randn(rows, k + 5, generator=gen).to(dtype).to(device)[:, 2:k + 2]
        return torch.randn(rows, k, generator=gen).to(dtype).to(device)

    rows = {"single": [n], "cat": [n, n + 3, 1 + n // 2], "glu": [n, n]}[mode]
    ws = [weight(r) for r in rows]
    bs = [torch.randn(r, generator=gen).to(dtype).to(device) for r in rows] if has_bias else None
    norm = (torch.randn(k, generator=gen).to(dtype).to(device), 1e-6, float(n % 2)) if fused and mode != "single" else None
    res = torch.randn(*x.shape[:-1], n, generator=gen).to(dtype).to(device) if fused and mode == "single" else None
    nkw = dict(norm_weight=norm[0], eps=norm[1], norm_offset=norm[2]) if norm else {}
    old = gm.CONFIG_OVERRIDE
    gm.CONFIG_OVERRIDE = cfg
    try:
        with spy() as launched, ops.backend("triton"):
            if mode == "single":
                y = ops.gemv(x, ws[0], bs[0] if bs else None, residual=res)
            elif mode == "cat":
                y = ops.gemv_cat(x, ws, bs, **nkw)
            else:
                y = ops.gemv_glu(x, ws[0], ws[1], "gelu_tanh" if n % 2 else "silu", bs, **nkw)
    finally:
        gm.CONFIG_OVERRIDE = old
    assert launched.call_count == (0 if layout == "batched" else 1)  # 2 rows: F.linear
    lin = lambda xx, w, b: F.linear(xx, w.to(xx.dtype), None if b is None else b.to(xx.dtype))  # noqa: E731
    x64, xin = x.double(), x
    if norm:  # the separate norm op's output (rounded to dtype) is what the projections see
        x64 = ref.rms_norm(x.double(), norm[0].double(), norm[1], norm[2])
        xin = ref.rms_norm(x, *norm)
    parts64 = [lin(x64, w, bs[i] if bs else None) for i, w in enumerate(ws)]
    parts = [ref.linear(xin, w, bs[i] if bs else None) for i, w in enumerate(ws)]
    if res is not None:
        parts64, parts = [parts64[0] + res.double()], [parts[0] + res]
    if mode == "glu":
        act = (lambda t: F.gelu(t, approximate="tanh")) if n % 2 else F.silu
        # the op's contract: each projection rounded to x's dtype, then act(gate) * up
        want64 = act(parts[0].double()) * parts[1].double()
        plain = (act(parts[0].float()) * parts[1].float()).to(dtype)
    else:
        want64, plain = torch.cat(parts64, -1), torch.cat(parts, -1)
    assert y.dtype == dtype and y.shape == want64.shape
    assert_no_worse(y, plain, want64, dtype, f"gemv {mode} {layout} {w_layout} {cfg}",
                    factor=max(1.0, (32 / y.numel()) ** 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_shapes(device):
    """Llama-3.2-1B-like K with the default tile rules (both BLOCK_N regimes)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, 2048, generator=gen).bfloat16().to(device)
    for n in (96, 4104):
        w = torch.randn(n, 2048, generator=gen).bfloat16().to(device)
        with spy() as launched:
            y = run(x, w)
        assert launched.call_count == 1
        assert_no_worse(y, ref.linear(x, w), x.double() @ w.double().T, torch.bfloat16, f"gemv n={n}")


def test_fallbacks_take_the_reference():
    """More rows than MAX_ROWS, float64, mixed dtypes and the torch backend run F.linear."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(10, 64, generator=gen)
    cases = [(torch.randn(gm.MAX_ROWS + 1, 64, generator=gen), w), (torch.randn(1, 64, dtype=torch.float64), w.double()),
             (torch.randn(1, 64, generator=gen).bfloat16(), w)]
    for x, wt in cases:
        with spy() as launched:
            y = run(x, wt)
        assert launched.call_count == 0
        assert torch.equal(y, ref.linear(x, wt))
    x = torch.randn(1, 64, generator=gen)
    with spy() as launched:
        assert torch.equal(run(x, w, backend="torch"), F.linear(x, w))
        assert torch.equal(ops.gemv(x, w), F.linear(x, w))  # auto on CPU: the reference
    assert launched.call_count == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["random", "sum", "expand"])
def test_backward_matches_float64(device, dtype, mode):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 1, 100, generator=gen).to(dtype).to(device).requires_grad_()
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
def test_cat_and_glu_backward_match_float64(device, act):
    gen = torch.Generator().manual_seed(13)
    dt = torch.float32
    x = torch.randn(1, 96, generator=gen).to(device).requires_grad_()
    ws = [torch.randn(n, 96, generator=gen).to(device).requires_grad_() for n in (24, 8, 8)]
    bs = [torch.randn(n, generator=gen).to(device).requires_grad_() for n in (24, 8, 8)]
    with ops.backend("triton"):
        y = ops.gemv_cat(x, ws, bs)
        z = ops.gemv_glu(x, ws[1], ws[2], act, bs[1:])
    g, h = torch.randn_like(y), torch.randn_like(z)
    got = torch.autograd.grad((y * g).sum() + (z * h).sum(), [x, *ws, *bs])
    l64 = [t.detach().double().requires_grad_() for t in (x, *ws, *bs)]
    x64, w64, b64 = l64[0], l64[1:4], l64[4:]
    y64 = torch.cat([F.linear(x64, w, b) for w, b in zip(w64, b64)], -1)
    f = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}[act]
    z64 = f(F.linear(x64, w64[1], b64[1])) * F.linear(x64, w64[2], b64[2])
    want = torch.autograd.grad((y64 * g.double()).sum() + (z64 * h.double()).sum(), l64)
    for a, e in zip(got, want):
        assert a.dtype == dt
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fused_norm_and_residual_backward_match_float64(device, offset):
    """Gradients through the prologue norm (x and its weight) and the epilogue residual."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(1, 96, generator=gen).to(device).requires_grad_()
    nw = torch.randn(96, generator=gen).to(device).requires_grad_()
    ws = [torch.randn(n, 96, generator=gen).to(device).requires_grad_() for n in (24, 8, 8)]
    r = torch.randn(1, 24, generator=gen).to(device).requires_grad_()
    kw = dict(norm_weight=nw, eps=1e-5, norm_offset=offset)
    with ops.backend("triton"):
        y = ops.gemv_cat(x, ws, **kw)
        z = ops.gemv_glu(x, ws[1], ws[2], "silu", **kw)
        o = ops.gemv(x, ws[0], residual=r)
    g, h, e = torch.randn_like(y), torch.randn_like(z), torch.randn_like(o)
    leaves = [x, nw, *ws, r]
    got = torch.autograd.grad((y * g).sum() + (z * h).sum() + (o * e).sum(), leaves)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, nw64, w64, r64 = l64[0], l64[1], l64[2:5], l64[5]
    xn = ref.rms_norm(x64, nw64, 1e-5, offset)
    y64 = torch.cat([F.linear(xn, w) for w in w64], -1)
    z64 = F.silu(F.linear(xn, w64[1])) * F.linear(xn, w64[2])
    o64 = F.linear(x64, w64[0]) + r64
    want = torch.autograd.grad((y64 * g.double()).sum() + (z64 * h.double()).sum() + (o64 * e.double()).sum(), l64)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-4)


def test_opcheck():
    x, w, b = torch.randn(1, 128, requires_grad=True), torch.randn(40, 128, requires_grad=True), torch.randn(40, requires_grad=True)
    w2 = torch.randn(40, 128, requires_grad=True)
    nw, r = torch.randn(128, requires_grad=True), torch.randn(1, 40, requires_grad=True)
    la, lb = torch.randn(4, 128, requires_grad=True), torch.randn(40, 4, requires_grad=True)
    no_lora = (None,) * 6 + (0.0,) * 3
    cat, glu = torch.ops.minift.gemv_cat.default, torch.ops.minift.gemv_glu.default
    with ops.backend("triton"):
        torch.library.opcheck(cat, (x, w, w2, None, b, b, None, None, 0.0, 0.0, None, *no_lora))
        torch.library.opcheck(cat, (x.detach(), w.detach(), None, None, None, None, None, None, 0.0, 0.0, None, *no_lora))
        torch.library.opcheck(cat, (x, w, None, None, b, None, None, nw, 1e-6, 1.0, None, *no_lora))
        torch.library.opcheck(cat, (x, w, None, None, None, None, None, None, 0.0, 0.0, r, *no_lora))
        torch.library.opcheck(cat, (x, w, w2, None, b, b, None, nw, 1e-6, 0.0, None, la, None, None, lb, None, None,
                                    2.0, 0.0, 0.0))
        torch.library.opcheck(glu, (x, w, w2, None, None, 0, None, 0.0, 0.0, None, None, None, None, 0.0, 0.0))
        torch.library.opcheck(glu, (x, w, w2, b, b, 1, nw, 1e-5, 0.0, la, la, lb, lb, 0.5, 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_fullgraph(device):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 64, generator=gen).to(device)
    w = torch.randn(24, 64, generator=gen).to(device)
    w2 = torch.randn(24, 64, generator=gen).to(device)
    nw = torch.randn(64, generator=gen).to(device)
    r = torch.randn(1, 24, generator=gen).to(device)
    f = lambda x, w, w2, nw, r: (ops.gemv_cat(x, [w, w2], norm_weight=nw).square().sum()  # noqa: E731
                                 + ops.gemv_glu(x, w, w2, norm_weight=nw, norm_offset=1.0).sum()
                                 + ops.gemv(x, w, residual=r).square().sum() + ops.gemv_cat(x, [w, w2]).sum())
    assert_compiled_matches_eager(f, (x, w, w2, nw, r), device)


def test_linear_takes_gemv_only_when_decoding(monkeypatch):
    """ops.linear / linear_cat (the model's Linear, q/k/v, LoRA's frozen base): the kernel for one CUDA
    row with no gradient wanted, F.linear otherwise (on CPU: under backend "triton", the interpreter)."""
    calls = []
    monkeypatch.setattr(gm, "_cat_call", lambda x, ws, bs: calls.append((tuple(x.shape), len(ws)))
                        or torch.cat([F.linear(x, w) for w in ws], -1))
    x, w = torch.randn(1, 1, 32), torch.randn(8, 32, requires_grad=True)
    with torch.no_grad():
        ops.linear(x, w)  # backend auto on CPU: F.linear
    with ops.backend("triton"):
        ops.linear(x, w)  # grad enabled: F.linear
        with torch.no_grad():
            ops.linear(x, w)
            ops.linear(torch.randn(2, 32), w)  # two rows: cuBLAS
            q, k = ops.linear_cat(x, [w, w[:3]], [None, None])
    assert calls == [((1, 1, 32), 1), ((1, 1, 32), 2)]
    assert q.shape == (1, 1, 8) and k.shape == (1, 1, 3)


def test_bad_input():
    with pytest.raises(InputError, match="w: expected a 2-d"):
        ops.gemv(torch.randn(2, 4), torch.randn(4))
    with pytest.raises(InputError, match="last dim 4 != weight 0's in_features 5"):
        ops.gemv(torch.randn(2, 4), torch.randn(3, 5))
    with pytest.raises(InputError, match="biases: expected one"):
        ops.gemv(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4))
    with pytest.raises(InputError, match="x: expected a floating-point"):
        ops.gemv(torch.ones(2, 4, dtype=torch.long), torch.randn(3, 4))
    with pytest.raises(InputError, match="weights: expected a list of 1 to 3"):
        ops.gemv_cat(torch.randn(1, 4), [torch.randn(3, 4)] * 4)
    with pytest.raises(InputError, match="activation='relu'"):
        ops.gemv_glu(torch.randn(1, 4), torch.randn(3, 4), torch.randn(3, 4), "relu")
    with pytest.raises(InputError, match="differ"):
        ops.gemv_glu(torch.randn(1, 4), torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(InputError, match=r"norm_weight: expected a \(4,\) tensor"):
        ops.gemv_cat(torch.randn(1, 4), [torch.randn(3, 4)], norm_weight=torch.randn(3))
    with pytest.raises(InputError, match=r"residual: expected a \(1, 3\) tensor"):
        ops.gemv(torch.randn(1, 4), torch.randn(3, 4), residual=torch.randn(1, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family, adapters", [("llama", False), ("gemma2", False), ("gemma3_text", False),
                                              ("llama", True), ("gemma3_text", True)])
def test_fused_decode_matches_unfused(device, family, adapters, tmp_path, monkeypatch):
    """Greedy generation with decode steps fused (forced on CPU with backend "triton": q/k/v with the
    pre-attention norm, gate/up with the activation and the pre-MLP norm, and for pre-norm
    layers o_proj / down_proj with the skip connection) gives the unfused tokens; with unmerged
    adapters (non-zero B; k_proj and up_proj without one) in the kernels' epilogues too."""
    import minift
    from minift.testing import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path, family)
    model, _ = minift.load(path, dtype=torch.float32, device=device)
    if adapters:
        minift.add_lora(model, r=4, alpha=8, seed=1, targets=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ids = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(0)).to(device)
    with ops.backend("torch"):
        plain = model.generate(ids, max_new_tokens=3, eos_token_id=[], compile=False)
    launched = []
    real = gm._launch
    monkeypatch.setattr(gm, "_launch", lambda *a, **k: launched.append(len(a[1])) or real(*a, **k))
    with ops.backend("triton"):
        fused = model.generate(ids, max_new_tokens=3, eos_token_id=[], compile=False)
    assert torch.equal(fused, plain)
    layers = model.config.num_hidden_layers
    assert launched.count(3) == 2 * layers and launched.count(2) == 2 * layers  # 2 decode steps
    assert launched.count(1) >= 2 * 2 * layers  # o_proj and down_proj (+ the LM head)


def _adapters(gen, ranks, ws, k, device, a_dtype=torch.float32):
    """(A, B, scaling) per weight, None where the rank is 0 (a projection without an adapter). The
    adapter's term is kept well below the base's (as trained adapters are), so the sum does not
    cancel: a cancelling sum would magnify the interpreter's truncating bf16 casts."""
    return [None if r == 0 else (torch.randn(r, k, generator=gen).to(a_dtype).to(device),
                                 torch.randn(w.shape[0], r, generator=gen).to(a_dtype).to(device) * 0.02, 0.5 + r / 4)
            for r, w in zip(ranks, ws)]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=min(settings.default.max_examples, 40))
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 200),
    dtype=st.sampled_from(DTYPES),
    mode=st.sampled_from(["single", "cat", "glu"]),
    ranks=st.lists(st.sampled_from([0, 1, 3, 8, 16]), min_size=3, max_size=3),
    fused=st.booleans(),
    has_bias=st.booleans(),
    a_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    cfg=st.sampled_from(CONFIGS),
    seed=st.integers(0, 2**16),
)
def test_lora_epilogue_matches_reference(device, n, k, dtype, mode, ranks, fused, has_bias, a_dtype, cfg, seed):
    """Unmerged adapters in the GEMVs (A x' in a small launch, scaling * B (A x') in the epilogue, some
    projections without one): no worse than the torch path against float64, with the norm prologue
    or the residual epilogue, biases, odd ranks, bf16 adapters."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, k, generator=gen).to(dtype).to(device)
    rows = {"single": [n], "cat": [n, n + 3, 1 + n // 2], "glu": [n, n]}[mode]
    ws = [torch.randn(r, k, generator=gen).to(dtype).to(device) for r in rows]
    lora = _adapters(gen, ranks[:len(ws)], ws, k, device, a_dtype)
    bs = [torch.randn(r, generator=gen).to(dtype).to(device) for r in rows] if has_bias else None
    nw = torch.randn(k, generator=gen).to(dtype).to(device)
    res = torch.randn(1, 1, n, generator=gen).to(dtype).to(device) if fused and mode == "single" else None
    nkw = dict(norm_weight=nw, eps=1e-6, norm_offset=1.0) if fused and mode != "single" else {}

    def call(backend):
        old = gm.CONFIG_OVERRIDE
        gm.CONFIG_OVERRIDE = cfg
        try:
            with ops.backend(backend):
                if mode == "single":
                    return ops.gemv(x, ws[0], bs[0] if bs else None, residual=res, low_rank=lora[0])
                if mode == "cat":
                    return ops.gemv_cat(x, ws, bs, low_rank=lora, **nkw)
                return ops.gemv_glu(x, ws[0], ws[1], "silu", bs, low_rank=lora, **nkw)
        finally:
            gm.CONFIG_OVERRIDE = old

    with spy() as launched:
        y = call("triton")
    assert launched.call_count == 1
    plain = call("torch")
    x64 = ref.rms_norm(x.double(), nw.double(), 1e-6, 1.0) if nkw else x.double()
    parts = []
    for i, w in enumerate(ws):
        p = x64 @ w.double().T + (bs[i].double() if bs else 0)
        if lora[i] is not None:
            a, b, sc = lora[i]
            p = p + sc * (x64 @ a.double().T) @ b.double().T
        parts.append(p)
    if mode == "glu":
        want64 = F.silu(parts[0]) * parts[1]
    else:
        want64 = torch.cat(parts, -1) + (res.double() if res is not None else 0)
    assert y.shape == want64.shape and y.dtype == dtype
    # factor: on the CPU interpreter each of the adapter's extra 16-bit roundings truncates
    assert_no_worse(y, plain, want64, dtype, f"lora gemv {mode} {ranks} {cfg}",
                    factor=max(1.0, (32 / y.numel()) ** 0.5) * (1 if dtype == torch.float32 or device != "cpu" else 4))


@pytest.mark.parametrize("mode", ["single", "cat", "glu"])
def test_lora_gradients(mode):
    """The ops' backward with adapters (x, W, bias, residual, A and B) against finite differences in
    float64; with the norm prologue and the gated activation (whose references compute in float32),
    against autograd through the reference norm, plain matmuls and the activation."""
    gen = torch.Generator().manual_seed(11)
    k, n = 7, 5
    d = dict(dtype=torch.float64)
    count = {"single": 1, "cat": 3, "glu": 2}[mode]
    x = torch.randn(2, k, generator=gen, **d).requires_grad_()
    ws = [torch.randn(n + (i if mode == "cat" else 0), k, generator=gen, **d).requires_grad_() for i in range(count)]
    lora = [None if r == 0 else (torch.randn(r, k, generator=gen, **d).requires_grad_(),
                                 torch.randn(w.shape[0], r, generator=gen, **d).requires_grad_(), 1.5)
            for r, w in zip([2, 0, 3][:count], ws)]
    bs = [torch.randn(w.shape[0], generator=gen, **d).requires_grad_() for w in ws]
    nw = torch.randn(k, generator=gen, **d).requires_grad_()
    res = torch.randn(2, n, generator=gen, **d).requires_grad_()
    flat = [t for spec in lora if spec is not None for t in spec[:2]]

    def unpack(tensors):
        it = iter(tensors[2 * count + 2:])
        lo = [None if spec is None else (next(it), next(it), spec[2]) for spec in lora]
        return list(tensors[:count]), list(tensors[count:2 * count]), tensors[2 * count], tensors[2 * count + 1], lo

    def op(x, *tensors, norm=False):
        wl, bl, nwt, rt, lo = unpack(tensors)
        nkw = dict(norm_weight=nwt, eps=1e-6, norm_offset=1.0) if norm else {}
        if mode == "single":
            return ops.gemv(x, wl[0], bl[0], residual=rt, low_rank=lo[0])
        if mode == "cat":
            return ops.gemv_cat(x, wl, bl, low_rank=lo, **nkw)
        return ops.gemv_glu(x, wl[0], wl[1], "gelu_tanh", bl, low_rank=lo, **nkw)

    def plain(x, *tensors):
        wl, bl, nwt, rt, lo = unpack(tensors)
        xn = ref.rms_norm(x, nwt, 1e-6, 1.0)
        parts = [xn @ w.T + b + (0 if spec is None else spec[2] * (xn @ spec[0].T) @ spec[1].T)
                 for w, b, spec in zip(wl, bl, lo)]
        if mode == "cat":
            return torch.cat(parts, -1)
        return F.gelu(parts[0], approximate="tanh") * parts[1]

    inputs = (x, *ws, *bs, nw, res, *flat)
    with ops.backend("torch"):
        if mode != "glu":  # (the gated activation's reference computes in float32)
            torch.autograd.gradcheck(op, inputs)
        if mode != "single":
            y = op(*inputs, norm=True)
            go = torch.randn(y.shape, generator=gen, **d)
            got = torch.autograd.grad(y, inputs, go, allow_unused=True)
            want = torch.autograd.grad(plain(*inputs), inputs, go, allow_unused=True)
            for i, (g1, g2) in enumerate(zip(got, want)):
                if g2 is None:
                    assert g1 is None or not g1.abs().any(), i
                else:
                    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


def test_lora_input_errors():
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    for bad in [(torch.randn(2, 9), torch.randn(4, 2), 1.0), (torch.randn(2, 8), torch.randn(4, 3), 1.0),
                (torch.randn(2, 8), torch.randn(4, 2), "1"), (torch.randn(2, 8),)]:
        with pytest.raises(InputError, match=r"low_rank\[0\]"):
            ops.gemv(x, w, low_rank=bad)
    with pytest.raises(InputError, match="low_rank: expected a list of 2"):
        ops.gemv_glu(x, w, w, low_rank=[None])
