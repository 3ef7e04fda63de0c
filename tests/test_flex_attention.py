"""The flex attention path (BlockMask + softcap score_mod) against the boolean-mask SDPA / eager
path: the mask_mod itself, the attention product with its gradients, and whole models.

On CPU flex runs uncompiled (PyTorch's dense reference; compiled CPU flex has no backward and
takes ~30 s to build): that checks the mask and score semantics. The gpu tests run the compiled
Triton kernels in bf16 at realistic shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as fa

import minift
from minift.arch import attention as A
from minift.arch import flex
from minift.arch.attention import attention, build_mask, make_mask, packed_segments, set_attention_backend
from minift.testing import write_tiny_checkpoint, write_tiny_gemma3_vision

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # "flex_attention called without torch.compile"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(autouse=True)
def _reset_backend():
    # Uncompiled flex still goes through dynamo; after many shapes it turns dynamic and then
    # fails to trace a softcap score_mod on CPU. Compiled flex keeps one cache entry per mask
    # kind and shape, 8 at most. So every test starts from a clean cache.
    torch._dynamo.reset()
    yield
    set_attention_backend("auto")


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """PyTorch refuses flex backward on CPU up front, though its uncompiled reference implements
    it; let the tests through to compare gradients."""
    monkeypatch.setattr(fa, "_validate_device", lambda *a: None, raising=False)


def mask_inputs(b: int, s: int, case: str, device: str = "cpu", seed: int = 0) -> tuple[dict, float | None]:
    """build_mask keyword arguments (and a softcap) for one named case."""
    g = torch.Generator().manual_seed(seed)
    kw: dict = {}
    softcap = None
    parts = case.split("+")
    if "right" in parts or "left" in parts:
        am = torch.ones(b, s, dtype=torch.long)
        for i in range(1, b):  # row 0 unpadded, the others padded by different amounts
            n = int(torch.randint(1, s // 2, (1,), generator=g))
            if "right" in parts:
                am[i, s - n:] = 0
            else:
                am[i, :n] = 0
        kw["attention_mask"] = am.to(device)
    if "segments" in parts:
        rows = []
        for _ in range(b):
            lens, left = [], s
            while left > 0:
                n = min(left, int(torch.randint(1, max(2, s // 3), (1,), generator=g)))
                lens.append(n)
                left -= n
            rows.append(torch.cat([torch.arange(n) for n in lens]))
        kw["segments"] = packed_segments(torch.stack(rows)).to(device)
    if "groups" in parts:
        grp = torch.full((b, s), -1)
        for i in range(b):
            start, gid = int(torch.randint(0, 4, (1,), generator=g)), 0
            while start < s - 2:
                n = int(torch.randint(2, max(3, s // 3), (1,), generator=g))
                grp[i, start:start + n] = gid
                gid += 1
                start += n + int(torch.randint(1, 5, (1,), generator=g))
        kw["bidirectional_groups"] = grp.to(device)
    for p in parts:
        if p.startswith("window"):
            kw["sliding_window"] = int(p[6:])
        if p.startswith("softcap"):
            softcap = float(p[7:])
    return kw, softcap


CASES = [
    "right", "left", "segments", "window7", "groups", "groups+window5", "left+groups+window5",
    "softcap5", "right+window6+softcap5", "left+window4", "segments+window5", "right+groups",
]


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("case", CASES)
def test_mask_mod_equals_build_mask(case, seed):
    """The mask_mod, evaluated densely, is build_mask's mask exactly (empty rows included)."""
    b, s = 3, 29 + seed
    kw, _ = mask_inputs(b, s, case, seed=seed)
    want = build_mask(b, s, torch.device("cpu"), **kw)
    bm = flex.block_mask(b, s, torch.device("cpu"), **kw)
    got = fa.create_mask(bm.mask_mod, b, 1, s, s, device="cpu")
    if want is None:  # plain causal (softcap only)
        want = torch.ones(s, s, dtype=torch.bool).tril().expand(b, 1, s, s)
    assert torch.equal(got, want)


def test_empty_rows_left_padding_and_window():
    valid = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert flex.empty_rows(valid, None, None, None).tolist() == [[True, True] + [False] * 6]
    # with a window of 2, padded queries two past the last real token no longer reach it
    assert flex.empty_rows(valid, None, None, 2).tolist() == [[True, True, False, False, False, False, True, True]]


def qkv(b, h, hk, s, d, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, n, s, d, generator=g, device=device, dtype=dtype).requires_grad_(True) for n in (h, hk, hk)]


def run_backend(backend, tensors, b, s, kw, scale, softcap):
    """Output and (q, k, v) gradients of attention under `backend`."""
    set_attention_backend(backend)
    q, k, v = tensors
    mask = make_mask(b, s, q.device, softcap=softcap, **kw)
    if backend == "flex":
        assert A.is_block_mask(mask)
    out = attention(q, k, v, mask, scale, softcap)
    w = torch.linspace(-1, 1, out.numel(), device=q.device, dtype=torch.float32).view(out.shape)
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    return [out.detach(), *grads]


@pytest.mark.parametrize(
    "case, heads",
    [(c, (4, 2)) for c in CASES] + [(c, (2, 2)) for c in ("left+groups+window5", "right+window6+softcap5")],
    ids=[f"{c}-gqa" for c in CASES] + ["left+groups+window5-mha", "right+window6+softcap5-mha"],
)
def test_flex_matches_sdpa_cpu(cpu_flex_backward, case, heads):
    b, s, d = 2, 37, 16
    kw, softcap = mask_inputs(b, s, case, seed=1)
    tensors = qkv(b, *heads, s, d)
    ref = run_backend("sdpa", tensors, b, s, kw, 0.3, softcap)
    got = run_backend("flex", tensors, b, s, kw, 0.3, softcap)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel(x, y) <= 1e-5, name


def test_make_mask_dispatch():
    dev = torch.device("cpu")
    am = torch.ones(2, 8, dtype=torch.long)
    assert make_mask(2, 8, dev) is None
    assert make_mask(2, 8, dev, sliding_window=8) is None  # window not shorter than the sequence
    assert isinstance(make_mask(2, 8, dev, attention_mask=am), torch.Tensor)  # auto on CPU: dense
    assert make_mask(2, 8, dev, softcap=50.0) is None  # the eager soft-capping path builds its own
    # auto on CUDA: flex for 16-bit activations, the dense mask for fp32 (flex had no fp32 config)
    assert A.uses_flex("cuda", torch.bfloat16) == A.uses_flex("cuda") == flex.AVAILABLE
    assert not A.uses_flex("cuda", torch.float32) and not A.uses_flex("cpu", torch.bfloat16)
    set_attention_backend("flex")
    assert A.uses_flex("cuda", torch.float32)
    assert make_mask(2, 8, dev) is None  # plain causal keeps SDPA's flash path
    assert A.is_block_mask(make_mask(2, 8, dev, softcap=50.0))
    assert A.is_block_mask(make_mask(2, 8, dev, attention_mask=am))
    set_attention_backend("sdpa")
    assert isinstance(make_mask(2, 8, dev, attention_mask=am), torch.Tensor)
    with pytest.raises(ValueError, match="attention backend"):
        set_attention_backend("flash")


def test_mask_spec_and_backend_error():
    """One MaskSpec clips the window for every builder; a bad backend is a ConfigError."""
    assert A.MaskSpec.of(8, sliding_window=8).plain and A.MaskSpec.of(8, sliding_window=9).window is None
    assert A.MaskSpec.of(8, sliding_window=7).window == 7 and not A.MaskSpec.of(8, sliding_window=7).plain
    with pytest.raises(TypeError, match="sliding_windo"):
        build_mask(1, 8, torch.device("cpu"), sliding_windo=3)
    with pytest.raises(minift.errors.ConfigError, match=r"set_attention_backend: backend='flash'"):
        set_attention_backend("flash")


def model_logits(model, ids, **kw):
    out = {}
    for backend in ("sdpa", "flex"):
        set_attention_backend(backend)
        with torch.no_grad():
            out[backend] = model(ids, **kw).logits
    return out["flex"], out["sdpa"]


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "mistral"])
def test_model_logits_flex_vs_sdpa(tmp_path, family):
    model, _ = minift.load(write_tiny_checkpoint(tmp_path, family))
    b, s = 2, 19  # sliding window 5 < s
    ids = torch.randint(3, model.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    for side in ("right", "left"):
        am = torch.ones(b, s, dtype=torch.long)
        am[1, -6:] = 0 if side == "right" else 1
        if side == "left":
            am[1, :6] = 0
        got, want = model_logits(model, ids, attention_mask=am)
        assert rel(got, want) <= 1e-5, side
    pos = torch.cat([torch.arange(8), torch.arange(11)]).expand(b, s)  # packed, no padding
    got, want = model_logits(model, ids, position_ids=pos)
    assert rel(got, want) <= 1e-5


def test_gemma3_vision_image_groups_flex_vs_sdpa(tmp_path):
    """Image tokens attend both ways, under a sliding window (8) shorter than an image (16)."""
    import numpy as np
    from PIL import Image

    model, processor = minift.load(write_tiny_gemma3_vision(tmp_path))
    rng = np.random.default_rng(0)
    imgs = [[Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8"))] for _ in range(2)]
    batch = processor(text=["a <start_of_image> b", "the <start_of_image> quick brown fox"], images=imgs,
                      return_tensors="pt", padding=True)
    out = {}
    for backend in ("sdpa", "flex"):
        set_attention_backend(backend)
        with torch.no_grad():
            out[backend] = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                 batch["token_type_ids"]).logits
    assert rel(out["flex"], out["sdpa"]) <= 1e-5


def test_model_loss_and_grads_flex_vs_sdpa(tmp_path, cpu_flex_backward):
    """Training: Gemma 2 (soft-capping, sliding layers) with right padding, fused loss."""
    model, _ = minift.load(write_tiny_checkpoint(tmp_path, "gemma2"), full_finetuning=True)
    model.train()
    b, s = 2, 13
    ids = torch.randint(3, model.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, -4:] = 0
    labels = ids.masked_fill(am == 0, -100)
    res = {}
    for backend in ("sdpa", "flex"):
        set_attention_backend(backend)
        model.zero_grad()
        loss = model(ids, attention_mask=am, labels=labels).loss
        loss.backward()
        res[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert rel(res["flex"][0], res["sdpa"][0]) <= 1e-6
    for n, g in res["sdpa"][1].items():
        assert rel(res["flex"][1][n], g) <= 1e-5, n


# ---- CUDA: compiled flex kernels, bf16, realistic shapes -------------------------------------

GPU_CASES = [
    "right", "left", "segments", "window256", "groups", "groups+window256", "left+groups+window256",
    "softcap50", "right+window256+softcap50", "segments+window256",
]
GPU_HEADS = {64: (32, 8), 256: (8, 4)}  # Llama 3.2 1B, Gemma 2/3


def gpu_errors(case, d, seed=0):
    """Relative errors of flex-bf16 and sdpa-bf16 against an fp32 boolean-mask reference."""
    b, s = 2, 1024
    kw, softcap = mask_inputs(b, s, case, device="cuda", seed=seed)
    h, hk = GPU_HEADS[d]
    t32 = qkv(b, h, hk, s, d, device="cuda", seed=seed)
    t16 = [t.detach().bfloat16().requires_grad_(True) for t in t32]
    scale = d**-0.5
    ref = run_backend("sdpa", t32, b, s, kw, scale, softcap)
    sdpa = run_backend("sdpa", t16, b, s, kw, scale, softcap)
    got = run_backend("flex", t16, b, s, kw, scale, softcap)
    return [(rel(g, r), rel(x, r)) for g, x, r in zip(got, sdpa, ref)]


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("case", GPU_CASES)
def test_flex_matches_sdpa_cuda(case, d):
    for name, (e_flex, e_sdpa) in zip(("out", "dq", "dk", "dv"), gpu_errors(case, d)):
        assert e_flex <= 2 * e_sdpa + 2e-3, (name, e_flex, e_sdpa)


@pytest.mark.gpu
def test_small_smem_kernel_options_cuda():
    """The fwd_/bwd_-prefixed options used on GPUs with little shared memory compile and agree."""
    flex.set_kernel_options(256, flex.SMALL_SMEM_OPTIONS)
    try:
        for name, (e_flex, e_sdpa) in zip(("out", "dq", "dk", "dv"), gpu_errors("left+window256+softcap50", 256)):
            assert e_flex <= 2 * e_sdpa + 2e-3, (name, e_flex, e_sdpa)
    finally:
        flex.set_kernel_options(256, None)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "mistral"])
def test_model_flex_vs_sdpa_cuda(tmp_path, family):
    """Whole model on CUDA: bf16 with the auto backend (flex) and with sdpa, against fp32 sdpa;
    and neither the block mask nor the forward syncs with the host."""
    path = write_tiny_checkpoint(tmp_path, family, sliding_window=256)
    b, s = 2, 1024
    ids = torch.randint(3, 200, (b, s), generator=torch.Generator().manual_seed(0)).cuda()
    am = torch.ones_like(ids)
    am[1, -300:] = 0
    real = am.bool()
    logits = {}
    for dtype, backend in ((torch.float32, "sdpa"), (torch.bfloat16, "sdpa"), (torch.bfloat16, "auto")):
        model, _ = minift.load(path, dtype=dtype, device="cuda")
        set_attention_backend(backend)
        with torch.no_grad():
            logits[dtype, backend] = model(ids, attention_mask=am).logits.float()[real]
    ref = logits[torch.float32, "sdpa"]
    e_flex, e_sdpa = rel(logits[torch.bfloat16, "auto"], ref), rel(logits[torch.bfloat16, "sdpa"], ref)
    assert e_flex <= 2 * e_sdpa + 2e-3, (e_flex, e_sdpa)

    cfg = model.config
    with torch.no_grad():  # everything compiled already: now nothing may sync
        torch.cuda.set_sync_debug_mode("error")
        try:
            mask = make_mask(b, s, ids.device, attention_mask=am, sliding_window=cfg.sliding_window,
                             softcap=cfg.attn_logit_softcapping)
            assert A.is_block_mask(mask)
            model(ids, attention_mask=am)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_compiled_decoder_layer_with_block_mask_cuda(tmp_path):
    """torch.compile(fullgraph) of a decoder layer taking a BlockMask matches the eager layer."""
    model, _ = minift.load(write_tiny_checkpoint(tmp_path, "gemma2"), dtype=torch.bfloat16, device="cuda",
                           full_finetuning=True)
    model.train()
    layer = model.model.layers[0]
    b, s = 2, 512
    am = torch.ones(b, s, dtype=torch.long, device="cuda")
    am[1, :100] = 0
    mask = make_mask(b, s, torch.device("cuda"), attention_mask=am, sliding_window=model.config.sliding_window,
                     softcap=model.config.attn_logit_softcapping)
    assert A.is_block_mask(mask)
    x = torch.randn(b, s, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(s, device="cuda").expand(b, s)
    cos, sin = model.model.rotary[layer.layer_type](pos)

    def run(fn):
        xi = x.clone().requires_grad_(True)
        out = fn(xi, cos, sin, mask)
        out.float().square().mean().backward()
        return out.detach(), xi.grad

    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=True, dynamic=False))
    for e, c in zip(eager, compiled):
        assert rel(c, e) <= 2e-2
