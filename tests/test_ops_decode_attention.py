"""Property tests of the one-launch decode attention (CPU runs it under Triton's interpreter).

The output and the two cache writes are checked against a float64 evaluation with
`assert_no_worse`, over GQA groups, odd head sizes, caches split over several programs, masks with
holes (padding, windows), soft-capping and q/k norms, for q/k/v in the strided layouts the q/k/v
projection's split produces."""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from op_checks import assert_no_worse

import minift.ops as ops
from minift.errors import InputError
from minift.ops import reference as ref

kernel = importlib.import_module("minift.ops.decode_attention")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def attention64(q, k, v, k_cache, v_cache, cos, sin, mask, slot, scale, softcap, q_norm, k_norm, eps, offset):
    """The op's meaning in float64 on copies of the caches: (output, keys, values)."""
    q, k, v = q.double(), k.double(), v.double()
    if q_norm is not None:
        def norm(x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w.double())
        q, k = norm(q, q_norm), norm(k, k_norm)
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    q, k = q * c + ref.rotate_half(q) * s, k * c + ref.rotate_half(k) * s
    keys, values = k_cache.double().clone(), v_cache.double().clone()
    keys[:, :, int(slot)] = k[:, :, 0]
    values[:, :, int(slot)] = v[:, :, 0]
    rep = q.shape[1] // keys.shape[1]
    scores = q @ keys.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return probs @ values.repeat_interleave(rep, 1), keys, values


@st.composite
def case(draw, device: str) -> dict:
    big = device == "cuda"
    kv_heads = draw(st.sampled_from([1, 2, 3] + ([8] if big else [])))
    return dict(
        batch=draw(st.integers(1, 3)),
        kv_heads=kv_heads,
        rep=draw(st.sampled_from([1, 2, 3, 4] + ([8] if big else []))),
        head_dim=2 * draw(st.sampled_from([1, 4, 5, 8, 12, 32] + ([64, 128] if big else []))),
        slots=draw(st.sampled_from([1, 5, 16, 37, 130] + ([777, 4100] if big else []))),
        dtype=draw(st.sampled_from(DTYPES)),
        softcap=draw(st.sampled_from([None, None, 2.0, 50.0])),
        qk_norm=draw(st.booleans()),
        layout=draw(st.sampled_from(["projected", "contiguous"])),
        table=draw(st.sampled_from(["b1", "rows"])),
        split=draw(st.sampled_from([None, 1, 2])),  # MAX_SPLITS (None: fill the SMs)
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(c: dict, device: str) -> dict:
    g = torch.Generator().manual_seed(c["seed"])
    b, hk, d, n, dt = c["batch"], c["kv_heads"], c["head_dim"], c["slots"], c["dtype"]
    hq = hk * c["rep"]

    def rand(*size, scale=1.0):
        return (torch.randn(size, generator=g, dtype=torch.float64) * scale).to(device, dt)

    if c["layout"] == "projected":  # views of one (b, 1, (hq + 2 hk) d) q/k/v row, as after gemv_cat
        qkv = rand(b, 1, (hq + 2 * hk) * d)
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        q, k, v = (t.view(b, 1, -1, d).transpose(1, 2) for t in (q, k, v))
    else:
        q, k, v = rand(b, hq, 1, d), rand(b, hk, 1, d), rand(b, hk, 1, d)
    pos = torch.randint(0, 4096, (1 if c["table"] == "b1" else b, 1, 1), generator=g).double()
    freqs = pos * (1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    emb = torch.cat((freqs, freqs), -1)
    slot = int(torch.randint(0, n, (), generator=g))
    mask = torch.rand(b, 1, 1, n, generator=g) < 0.7
    mask[..., slot] = True  # the new token always sees itself
    return dict(q=q, k=k, v=v, k_cache=rand(b, hk, n, d), v_cache=rand(b, hk, n, d),
                cos=emb.cos().float().to(device), sin=emb.sin().float().to(device), mask=mask.to(device),
                slot=torch.tensor([slot], device=device),
                q_norm=rand(d, scale=0.3) if c["qk_norm"] else None, k_norm=rand(d, scale=0.3) if c["qk_norm"] else None)


def call(inputs: dict, c: dict, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = dict(inputs, k_cache=inputs["k_cache"].clone(), v_cache=inputs["v_cache"].clone())
    offset = 1.0 if c["qk_norm"] else 0.0
    with ops.backend(backend), torch.no_grad():
        out = ops.decode_attention(x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["cos"], x["sin"], x["mask"],
                                   x["slot"], 0.125, c["softcap"], q_norm=x["q_norm"], k_norm=x["k_norm"], eps=1e-6,
                                   norm_offset=offset)
    return out, x["k_cache"], x["v_cache"]


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_decode_attention_matches_reference(device: str, data) -> None:
    c = data.draw(case(device))
    with max_splits(c["split"]):
        check_case(c, device)


@contextlib.contextmanager
def max_splits(n: int | None) -> Iterator[None]:
    old, kernel.MAX_SPLITS = kernel.MAX_SPLITS, n
    try:
        yield
    finally:
        kernel.MAX_SPLITS = old


def check_case(c: dict, device: str) -> None:
    inputs = make_inputs(c, device)
    with torch.no_grad():
        assert kernel.takes_decode_attention(inputs["q"], inputs["k"], inputs["k_cache"]) is (device == "cuda")
    with ops.backend("triton"), torch.no_grad():
        assert kernel.takes_decode_attention(inputs["q"], inputs["k"], inputs["k_cache"]), "the kernel must be taken"
    got = call(inputs, c, "triton")
    torch_out = call(inputs, c, "torch")
    want = attention64(*(inputs[n] for n in ("q", "k", "v", "k_cache", "v_cache", "cos", "sin", "mask", "slot")),
                       0.125, c["softcap"], inputs["q_norm"], inputs["k_norm"], 1e-6, 1.0 if c["qk_norm"] else 0.0)
    for name, g, t, w in zip(["output", "keys", "values"], got, torch_out, want):
        assert_no_worse(g, t, w, c["dtype"], f"decode_attention {name}")
    # the kernel writes exactly the new slot: every other cache entry is untouched
    untouched = torch.ones(c["slots"], dtype=torch.bool)
    untouched[int(inputs["slot"])] = False
    assert torch.equal(got[1][:, :, untouched], inputs["k_cache"][:, :, untouched])
    assert torch.equal(got[2][:, :, untouched], inputs["v_cache"][:, :, untouched])
    assert torch.equal(got[2], torch_out[2])  # values are stored, not computed


def test_caches_split_over_programs(monkeypatch) -> None:
    """The slots are split over enough programs to fill the SMs, each a tile or more, in one launch;
    the last program of each group combines: the result of one program a group up to float32
    summation order, bit-identical call to call, the ticket counters back at zero."""
    from minift.ops import _backend

    cpu = torch.device("cpu")
    assert kernel._splits(8, 768, 64, cpu) == 12  # Llama-1B, batch 1, 768 slots: 96 programs of one tile
    assert kernel._splits(64, 768, 64, cpu) == 3  # batch 8: 192 programs
    assert kernel._splits(8, 40, 64, cpu) == 1
    c = dict(batch=2, kv_heads=2, rep=3, head_dim=16, slots=300, dtype=torch.float32, softcap=None, qk_norm=False,
             layout="contiguous", table="b1", seed=3)
    inputs = make_inputs(c, "cpu")
    with max_splits(1):
        whole = call(inputs, c, "triton")
    grids = []
    launcher = kernel._decode_attention_kernel
    monkeypatch.setattr(kernel, "_decode_attention_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: grids.append(grid) or launcher[grid]})())
    split, again = call(inputs, c, "triton"), call(inputs, c, "triton")
    assert grids[0] == (4, 5), grids  # 300 slots in tiles of 64
    for a, b, e in zip(whole, split, again):
        torch.testing.assert_close(a, b)
        assert torch.equal(b, e)
    assert int(_backend._TICKETS[cpu].abs().sum()) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_compiles_with_the_cache_written_in_place(device: str) -> None:
    """torch.compile(fullgraph=True) traces the op; the caches it writes are the caller's buffers."""
    c = dict(batch=2, kv_heads=2, rep=2, head_dim=8, slots=9, dtype=torch.float32, softcap=None, qk_norm=True,
             layout="projected", table="rows", seed=1)
    inputs = make_inputs(c, device)
    want = call(inputs, c, "triton")
    kc, vc = inputs["k_cache"].clone(), inputs["v_cache"].clone()

    def f(q, k, v, cos, sin, mask, slot, qn, kn):
        return ops.decode_attention(q * 1, k, v, kc, vc, cos, sin, mask, slot, 0.125, q_norm=qn, k_norm=kn,
                                    norm_offset=1.0)

    torch._dynamo.reset()
    with ops.backend("triton"), torch.no_grad():
        out = torch.compile(f, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")(
            *(inputs[n] for n in ("q", "k", "v", "cos", "sin", "mask", "slot", "q_norm", "k_norm")))
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(kc, want[1])
    torch.testing.assert_close(vc, want[2])


def test_decode_attention_rejects_bad_inputs() -> None:
    b, hq, hk, d, n = 2, 4, 2, 8, 6
    q, k, v = torch.randn(b, hq, 1, d), torch.randn(b, hk, 1, d), torch.randn(b, hk, 1, d)
    kc, vc = torch.zeros(b, hk, n, d), torch.zeros(b, hk, n, d)
    cos = sin = torch.randn(1, 1, d)
    mask, slot = torch.ones(b, 1, 1, n, dtype=torch.bool), torch.tensor([0])

    def run(**kw):
        a = dict(q=q, k=k, v=v, k_cache=kc, v_cache=vc, cos=cos, sin=sin, mask=mask, slot=slot, scale=1.0)
        a.update(kw)
        with torch.no_grad():
            return ops.decode_attention(**a)

    run()
    with pytest.raises(InputError, match=r"q must be \(batch, heads, 1, head_dim\)"):
        run(q=torch.randn(b, hq, 2, d))
    with pytest.raises(InputError, match="not a multiple"):
        run(q=torch.randn(b, 3, 1, d))
    with pytest.raises(InputError, match="k must be"):
        run(k=torch.randn(b, 1, 1, d))
    with pytest.raises(InputError, match="v_cache"):
        run(v_cache=torch.zeros(b, hk, n + 1, d))
    with pytest.raises(InputError, match="cos must be"):
        run(cos=torch.randn(3, 1, d))
    with pytest.raises(InputError, match="mask must be a bool"):
        run(mask=torch.ones(b, 1, 1, n))
    with pytest.raises(InputError, match="slot must be one int64"):
        run(slot=torch.tensor([0, 1]))
    with pytest.raises(InputError, match="both q_norm and k_norm"):
        run(q_norm=torch.ones(d))
    with pytest.raises(InputError, match="q_norm must be"):
        run(q_norm=torch.ones(d + 1), k_norm=torch.ones(d + 1))
    with pytest.raises(InputError, match="even"):
        run(q=torch.randn(b, hq, 1, 7), k=torch.randn(b, hk, 1, 7), v=torch.randn(b, hk, 1, 7),
            k_cache=torch.zeros(b, hk, n, 7), v_cache=torch.zeros(b, hk, n, 7), cos=torch.randn(1, 1, 7),
            sin=torch.randn(1, 1, 7))
