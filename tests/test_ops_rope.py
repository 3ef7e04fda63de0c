"""Property tests of the RoPE Triton kernel (CPU runs it under the interpreter).

q'/k' and both gradients are checked against a float64 evaluation with `assert_no_worse`, for
per-row position ids (packed sequences), GQA head counts, transposed / strided q and k, and
gradients that arrive as expanded (stride-0) tensors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from op_checks import assert_no_worse
from ops_helpers import assert_compiled_matches_eager, upstream

import minift.ops as ops
from minift.errors import InputError
from minift.ops import reference as ref
from minift.ops._backend import use_triton

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rope64(q, k, cos, sin):
    """reference.rope's formula in float64 (the reference itself computes in float32 even for doubles)."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + ref.rotate_half(q) * s, k * c + ref.rotate_half(k) * s


@st.composite
def rope_case(draw, device: str) -> dict:
    big = device == "cuda"
    heads = draw(st.integers(1, 40 if big else 5))
    return dict(
        batch=draw(st.integers(1, 4 if big else 3)),
        seq=draw(st.sampled_from([1, 7, 33, 64] + ([257, 1000] if big else []))),
        heads=heads,
        kv_heads=draw(st.sampled_from(sorted({1, heads, max(1, heads // 2)}))),
        head_dim=2 * draw(st.sampled_from([1, 3, 32, 65] + ([64, 128] if big else [])) | st.integers(1, 40)),
        dtype=draw(st.sampled_from(DTYPES)),
        scale=10.0 ** draw(st.floats(-1, 2)),
        q_layout=draw(st.sampled_from(["bshd", "contiguous", "strided"])),
        k_layout=draw(st.sampled_from(["bshd", "contiguous"])),
        table=draw(st.sampled_from(["positions", "positions_b1", "random"])),
        grad=draw(st.sampled_from(["sum", "random", "expand"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_qk(b: int, h: int, s: int, d: int, layout: str, c: dict, gen: torch.Generator, device: str) -> torch.Tensor:
    """(b, h, s, d) in the layouts models produce: a transposed projection view, contiguous, or a slice."""

    def rand(*size: int) -> torch.Tensor:
        x = torch.randn(size, generator=gen, dtype=torch.float64, device=gen.device)
        return (x * c["scale"]).to(device, c["dtype"])

    if layout == "bshd":
        return rand(b, s, h * d).view(b, s, h, d).transpose(1, 2)
    if layout == "strided":
        return rand(b, h, s, d + 4)[..., 2 : d + 2]
    return rand(b, h, s, d)


def make_table(c: dict, gen: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin from random per-row position ids (as transformers builds them), or arbitrary values."""
    b, s, d = c["batch"], c["seq"], c["head_dim"]
    if c["table"] == "random":
        cos, sin = torch.randn(2, b, s, d, generator=gen, dtype=torch.float64, device=gen.device)
    else:
        rows = 1 if c["table"] == "positions_b1" else b
        pos = torch.randint(0, 8192, (rows, s), generator=gen, device=gen.device).double()
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
        freqs = pos[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
    return cos.to(device, c["dtype"]), sin.to(device, c["dtype"])


def run(fn, q, k, cos, sin, gq, gk, dtype: torch.dtype) -> list:
    q, k = (t.detach().to(dtype).requires_grad_() for t in (q, k))
    qo, ko = fn(q, k, cos.to(dtype), sin.to(dtype))
    torch.autograd.backward([qo, ko], [gq.to(dtype), gk.to(dtype)])
    return [qo.detach(), ko.detach(), q.grad, k.grad]


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_rope_matches_reference(device: str, data) -> None:
    c = data.draw(rope_case(device))
    gen = torch.Generator(device).manual_seed(c["seed"])  # data made on the device
    b, s, d, dtype = c["batch"], c["seq"], c["head_dim"], c["dtype"]
    q = make_qk(b, c["heads"], s, d, c["q_layout"], c, gen, device)
    k = make_qk(b, c["kv_heads"], s, d, c["k_layout"], c, gen, device)
    cos, sin = make_table(c, gen, device)
    gq, gk = upstream(q, c["grad"], gen), upstream(k, c["grad"], gen)
    with ops.backend("triton"):
        assert use_triton(q), "the Triton path must be taken"
        kernel = run(ops.rope, q, k, cos, sin, gq, gk, dtype)
    with ops.backend("torch"):
        torch_out = run(ops.rope, q, k, cos, sin, gq, gk, dtype)
    ref64 = run(rope64, q, k, cos, sin, gq, gk, torch.float64)
    if c["q_layout"] != "strided":  # dense inputs keep their memory layout (no hidden transpose copy)
        assert kernel[0].stride() == q.stride()
    for name, kk, t, r in zip(["rope q'", "rope k'", "rope dq", "rope dk"], kernel, torch_out, ref64):
        assert_no_worse(kk, t, r, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_compile_fullgraph(device: str) -> None:
    """torch.compile traces the custom op (forward and backward) without graph breaks."""
    b, s, h, hk, d = 2, 5, 4, 2, 8
    q = torch.randn(b, s, h * d, device=device)
    k = torch.randn(b, hk, s, d, device=device)
    cos, sin = torch.randn(2, b, s, d, device=device)

    def f(q, k):
        qo, ko = ops.rope(q.view(b, s, h, d).transpose(1, 2), k * 2, cos, sin)
        return qo.square().sum() + (ko * 3).sum()

    assert_compiled_matches_eager(f, (q, k), device)


def test_rope_rejects_bad_inputs() -> None:
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos = sin = torch.randn(2, 5, 8)
    with pytest.raises(InputError, match="k's head_dim"):
        ops.rope(q, torch.randn(2, 2, 5, 6), cos, sin)
    with pytest.raises(InputError, match="cos"):
        ops.rope(q, k, torch.randn(3, 5, 8), sin)
    with pytest.raises(InputError, match="sin"):
        ops.rope(q, k, cos, torch.randn(2, 6, 8))
    with pytest.raises(InputError, match="batch"):
        ops.rope(q, torch.randn(1, 2, 5, 8), cos, sin)
    with pytest.raises(InputError, match="even"):
        ops.rope(torch.randn(2, 4, 5, 7), torch.randn(2, 2, 5, 7), torch.randn(2, 5, 7), torch.randn(2, 5, 7))
    with pytest.raises(InputError, match="q must be a floating"):
        ops.rope(q.long(), k, cos, sin)
    with pytest.raises(InputError, match=r"\(batch, heads, seq, head_dim\)"):
        ops.rope(q[0], k, cos, sin)
