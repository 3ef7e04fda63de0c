"""Property tests of the SwiGLU / GeGLU Triton kernels (CPU runs them under the interpreter).

The output and both gradients are checked against a float64 evaluation with `assert_no_worse`,
for odd and block-straddling widths, |gate| up to ~20, chunked (strided) gate/up views and
expanded (stride-0) upstream gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from op_checks import assert_no_worse
from ops_helpers import assert_compiled_matches_eager, upstream

import minift.ops as ops
from minift.errors import InputError
from minift.ops._backend import use_triton

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WIDTHS = [1, 7, 63, 64, 65, 129, 1000, 1025]
ACTS = ["swiglu", "geglu_tanh", "geglu_none"]


def op(act: str):
    if act == "swiglu":
        return ops.swiglu
    return lambda g, u: ops.geglu(g, u, act.removeprefix("geglu_"))


def op64(act: str):
    """The reference formulas in float64 (minift.ops.reference computes in float32 even for doubles)."""
    if act == "swiglu":
        return lambda g, u: F.silu(g) * u
    return lambda g, u: F.gelu(g, approximate=act.removeprefix("geglu_")) * u


@st.composite
def glu_case(draw, device: str) -> dict:
    big = device == "cuda"
    return dict(
        act=draw(st.sampled_from(ACTS)),
        width=draw(st.sampled_from(WIDTHS + ([4096, 14336] if big else [])) | st.integers(1, 300)),
        lead=draw(st.sampled_from([(), (1,), (3,), (2, 5)] + ([(3, 129), (517,)] if big else []))),
        dtype=draw(st.sampled_from(DTYPES)),
        gate_scale=draw(st.sampled_from([1.0, 5.0, 20.0])),
        up_scale=10.0 ** draw(st.floats(-2, 2)),
        layout=draw(st.sampled_from(["contiguous", "chunked", "transposed"])),
        grad=draw(st.sampled_from(["sum", "random", "expand"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_pair(c: dict, gen: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up as separate tensors, as chunks of one fused projection, or as transposed views."""
    shape, dtype = (*c["lead"], c["width"]), c["dtype"]
    scale = torch.tensor([c["gate_scale"], c["up_scale"]], dtype=torch.float64)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen, dtype=torch.float64, device=gen.device)

    if c["layout"] == "chunked":
        fused = torch.cat([rand(*shape) * scale[0], rand(*shape) * scale[1]], dim=-1).to(device, dtype)
        return fused.chunk(2, dim=-1)
    if c["layout"] == "transposed" and len(shape) >= 2:
        pair = [(rand(*shape[::-1]) * s).to(device, dtype).permute(*range(len(shape) - 1, -1, -1)) for s in scale]
        return pair[0], pair[1]
    return (rand(*shape) * scale[0]).to(device, dtype), (rand(*shape) * scale[1]).to(device, dtype)


def run(fn, gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> list:
    g, u = (t.detach().to(dtype).requires_grad_() for t in (gate, up))
    y = fn(g, u)
    y.backward(grad.to(dtype))
    return [y.detach(), g.grad, u.grad]


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_glu_matches_reference(device: str, data) -> None:
    c = data.draw(glu_case(device))
    gen = torch.Generator(device).manual_seed(c["seed"])  # data made on the device
    gate, up = make_pair(c, gen, device)
    grad = upstream(gate, c["grad"], gen)
    dtype, act = c["dtype"], c["act"]
    with ops.backend("triton"):
        assert use_triton(gate), "the Triton path must be taken"
        kernel = run(op(act), gate, up, grad, dtype)
    with ops.backend("torch"):
        torch_out = run(op(act), gate, up, grad, dtype)
    ref64 = run(op64(act), gate, up, grad, torch.float64)
    for name, k, t, r in zip(["y", "dgate", "dup"], kernel, torch_out, ref64):
        assert_no_worse(k, t, r, dtype, f"{act} {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_glu_compile_fullgraph(device: str) -> None:
    """torch.compile traces the custom ops (forward and backward) without graph breaks."""
    x = torch.randn(3, 5, 2 * 65, device=device)
    w = torch.randn(65, device=device)

    def f(x, w):
        g, u = x.chunk(2, dim=-1)
        h = ops.swiglu(g, u) + ops.geglu(g * 2, u, "tanh") + ops.geglu(g, u * w, "none")
        return h.square().sum()

    assert_compiled_matches_eager(f, (x, w), device)


def test_glu_rejects_bad_inputs() -> None:
    g = torch.randn(2, 8)
    with pytest.raises(InputError, match="gate .* and up"):
        ops.swiglu(g, torch.randn(2, 7))
    with pytest.raises(InputError, match="gate .* and up"):
        ops.geglu(g, torch.randn(8))
    with pytest.raises(InputError, match="approximate"):
        ops.geglu(g, g, "erf")
    with pytest.raises(InputError, match="up must be a floating"):
        ops.swiglu(g, torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(InputError, match="gate must be a floating"):
        ops.geglu(torch.ones(2, 8, dtype=torch.int64), g)
