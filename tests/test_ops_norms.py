"""Property tests of the RMSNorm / LayerNorm Triton kernels (CPU runs them under the interpreter).

Each example checks the forward and every gradient against a float64 reference with the
`assert_no_worse` criterion: the kernel may not be less accurate than plain PyTorch in that dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import minift.ops as ops
from minift.errors import InputError
from minift.ops._backend import use_triton

from op_checks import EXTRA_TOL, assert_no_worse
from ops_helpers import assert_compiled_matches_eager, upstream

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [1, 7, 63, 64, 65, 129, 1000]


@st.composite
def norm_case(draw, device: str) -> dict:
    big = device == "cuda"
    hidden = draw(st.sampled_from(HIDDEN + ([1152, 2560, 4096, 5120, 8192] if big else [])) | st.integers(1, 300))
    lead = draw(st.sampled_from([(1,), (3,), (2, 5), (17,)] + ([(4, 333), (1000,)] if big else [])))
    return dict(
        hidden=hidden,
        lead=lead,
        dtype=draw(st.sampled_from(DTYPES)),
        scale=10.0 ** draw(st.floats(-3, 3)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        grad=draw(st.sampled_from(["sum", "random", "expand"])),
        frozen=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_x(shape: tuple, scale: float, layout: str, gen: torch.Generator, device: str, dtype: torch.dtype
           ) -> torch.Tensor:
    """Random values in `dtype`, laid out contiguous, as a transposed view, or with last-dim stride 2."""

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(size, generator=gen, dtype=torch.float64, device=gen.device) * scale).to(device, dtype)

    if layout == "transposed" and len(shape) >= 2:
        return rand(shape[-1], *shape[:-1]).movedim(0, -1)
    if layout == "strided":
        return rand(*shape[:-1], 2 * shape[-1])[..., ::2]
    return rand(*shape)


def run(fn, inputs: list, grad: torch.Tensor, dtype: torch.dtype, frozen: bool = False) -> list:
    """[y, dx, dparams...]; frozen params (LoRA) take no gradient, so their entries are None."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(i == 0 or not frozen)
              for i, t in enumerate(inputs)]
    y = fn(*leaves)
    y.backward(grad.to(dtype) if dtype == torch.float64 else grad)
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


def weight_grad_factor(xhat: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> float:
    """Tolerance factor for a weight gradient sum_rows(dy * xhat) whose terms cancel.

    Any fp32 reduction can be off by about rows * 2^-24 * sum|terms|. When the terms cancel (a
    one-element row normalises to +-1, so dweight is a sum of signs) that bound exceeds EXTRA_TOL
    and neither torch nor the kernel resolves the sum, so the allowance grows with its condition.
    """
    terms = (grad.double() * xhat).reshape(-1, xhat.shape[-1])
    total = terms.sum(0).norm().item()
    cond = terms.abs().sum(0).norm().item() / total if total > 0 else float("inf")
    return max(1.0, cond * (terms.shape[0] + 2) * 2.0**-24 / EXTRA_TOL[dtype])


def _case_inputs(c: dict, device: str, with_bias: bool):
    gen = torch.Generator(device).manual_seed(c["seed"])  # data made on the device
    dtype, n = c["dtype"], c["hidden"]
    x = make_x((*c["lead"], n), c["scale"], c["layout"], gen, device, dtype)
    w = (1.0 + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64, device=gen.device)).to(device, dtype)
    b = torch.randn(n, generator=gen, dtype=torch.float64, device=gen.device).to(device, dtype) if with_bias else None
    return gen, x, w, b


def rms_norm64(x, w, eps, offset):
    """reference.rms_norm's formula in float64 (the reference itself computes in float32 even for doubles)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)


def layer_norm64(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def compare(fn, fn64, xhat64, inputs: list, names: list, gen: torch.Generator, c: dict) -> None:
    """Kernel (forced Triton) vs the reference in `dtype`, both judged against a float64 evaluation."""
    mode, dtype, frozen = c["grad"], c["dtype"], c["frozen"]
    grad = upstream(inputs[0], mode, gen)
    wfactor = weight_grad_factor(xhat64(inputs[0].double()), grad, dtype)
    with ops.backend("triton"):
        assert use_triton(inputs[0]), "the Triton path must be taken"
        kernel = run(fn, inputs, grad, dtype, frozen)
    with ops.backend("torch"):
        torch_out = run(fn, inputs, grad, dtype, frozen)
    ref64 = run(fn64, inputs, grad, torch.float64, frozen)
    for name, k, t, r in zip(names, kernel, torch_out, ref64):
        assert (k is None) == (r is None), f"{name}: gradient presence differs from the reference"
        if r is not None:
            assert_no_worse(k, t, r, dtype, name, factor=wfactor if name.endswith("dweight") else 1.0)


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_rms_norm_matches_reference(device: str, data) -> None:
    c = data.draw(norm_case(device))
    offset = data.draw(st.sampled_from([0.0, 1.0]))
    eps = data.draw(st.sampled_from([1e-6, 1e-5]))
    gen, x, w, _ = _case_inputs(c, device, with_bias=False)
    fn = lambda a, b: ops.rms_norm(a, b, eps, offset)  # noqa: E731
    fn64 = lambda a, b: rms_norm64(a, b, eps, offset)  # noqa: E731
    xhat64 = lambda a: rms_norm64(a, 1.0, eps, 0.0)  # noqa: E731
    compare(fn, fn64, xhat64, [x, w], ["rms_norm y", "rms_norm dx", "rms_norm dweight"], gen, c)


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_layer_norm_matches_reference(device: str, data) -> None:
    c = data.draw(norm_case(device))
    with_bias = data.draw(st.booleans())
    eps = data.draw(st.sampled_from([1e-6, 1e-5]))
    gen, x, w, b = _case_inputs(c, device, with_bias)
    fn = lambda a, ww, bb: ops.layer_norm(a, ww, bb, eps)  # noqa: E731
    names = ["layer_norm y", "layer_norm dx", "layer_norm dweight", "layer_norm dbias"]
    fn64 = lambda a, ww, bb: layer_norm64(a, ww, bb, eps)  # noqa: E731
    xhat64 = lambda a: layer_norm64(a, None, None, eps)  # noqa: E731
    compare(fn, fn64, xhat64, [x, w, b], names, gen, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hidden", [40, 1152, 2048, 2560])
@pytest.mark.parametrize("deterministic", [False, True])
def test_norm_weight_grad_paths(device: str, hidden: int, deterministic: bool) -> None:
    """Each weight-gradient backward: TMA boxes (rows that are not a power of two wide, contiguous;
    1152 boxes 128-wide sub-rows, 40 eight-wide ones) or the pointer kernel, layer_norm's sums by
    fp32 atomics (wide rows) or by partial rows (always under torch.use_deterministic_algorithms,
    which must then give bit-identical results run to run)."""
    from minift.ops import _norm_common

    c = dict(hidden=hidden, lead=(3,) if device == "cpu" else (4, 333), dtype=torch.bfloat16, scale=1.0,
             layout="contiguous", grad="random", frozen=False, seed=hidden)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        gen, x, w, b = _case_inputs(c, device, with_bias=True)
        x2 = x.reshape(-1, hidden)
        if device == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
            assert (_norm_common._tma_plan(x2, x2, hidden) is not None) == (hidden & (hidden - 1) != 0)
        assert _norm_common._use_atomics(True, hidden) == (hidden >= 2048 and not deterministic)
        assert not _norm_common._use_atomics(False, hidden)
        fn = lambda a, ww, bb: ops.layer_norm(a, ww, bb, 1e-5)  # noqa: E731
        compare(fn, lambda a, ww, bb: layer_norm64(a, ww, bb, 1e-5), lambda a: layer_norm64(a, None, None, 1e-5),
                [x, w, b], ["layer_norm y", "layer_norm dx", "layer_norm dweight", "layer_norm dbias"], gen, c)
        compare(lambda a, ww: ops.rms_norm(a, ww, 1e-6, 1.0), lambda a, ww: rms_norm64(a, ww, 1e-6, 1.0),
                lambda a: rms_norm64(a, 1.0, 1e-6, 0.0), [x, w], ["rms_norm y", "rms_norm dx", "rms_norm dweight"], gen, c)
        if deterministic:
            grads = []
            for _ in range(2):
                leaves = [t.detach().requires_grad_() for t in (x, w, b)]
                with ops.backend("triton"):
                    ops.layer_norm(*leaves, 1e-5).backward(torch.ones_like(x))
                grads.append([t.grad for t in leaves])
            for g1, g2 in zip(*grads):
                assert torch.equal(g1, g2), "deterministic mode must repeat bit for bit"
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("device", DEVICES)
def test_norms_compile_fullgraph(device: str) -> None:
    """torch.compile traces the custom ops (forward and backward) without graph breaks."""
    x = torch.randn(3, 5, 65, device=device)
    w = torch.randn(65, device=device)
    b = torch.randn(65, device=device)

    def f(x, w, b):
        h = ops.rms_norm(x, w, 1e-6, 1.0)
        return ops.layer_norm(h * 2, w, b, 1e-5).square().sum()

    assert_compiled_matches_eager(f, (x, w, b), device)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_of_one_element_has_zero_input_grad(device: str) -> None:
    """Over a single element y = bias, so dx is exactly 0 (an H100 run once left the product's
    FMA rounding error there, amplified by 1/sqrt(eps))."""
    x = torch.randn(37, 1, device=device, requires_grad=True)
    w, b = torch.randn(1, device=device), torch.randn(1, device=device)
    with ops.backend("triton"):
        (dx,) = torch.autograd.grad(ops.layer_norm(x, w, b, 1e-6), x, torch.randn(37, 1, device=device))
    assert (dx == 0).all()


def test_norms_reject_bad_inputs() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(InputError, match="weight"):
        ops.rms_norm(x, torch.randn(7))
    with pytest.raises(InputError, match="bias"):
        ops.layer_norm(x, torch.randn(8), torch.randn(9))
    with pytest.raises(InputError, match="x must be a floating"):
        ops.rms_norm(torch.ones(2, 8, dtype=torch.int64), torch.randn(8))
    with pytest.raises(InputError, match="weight must be a floating"):
        ops.layer_norm(x, torch.ones(8, dtype=torch.int32), None)
    with pytest.raises(InputError, match="scalar"):
        ops.rms_norm(torch.tensor(1.0), torch.randn(1))
