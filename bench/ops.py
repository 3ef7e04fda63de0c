"""Per-op benchmark on a CUDA GPU: minift's Triton kernels vs torch eager (the reference), torch.compile
of the reference, and Liger Kernel where it has the op. Forward and forward+backward time (median,
triton.testing.do_bench), extra peak memory, and for memory-bound ops the achieved fraction of the
device-to-device copy bandwidth measured in the same run. Prints one JSON object per line.

Two times per cell: `ms` is the eager call as a user's loop sees it (Python dispatch and kernel
launches included, which dominate ops that move < 100 MB), `graph_ms` replays the same call from a
CUDA graph, so it is the GPU time alone; `bw` (fraction of copy bandwidth) is taken from graph_ms.
Peak memory: gradients are reset to None first; `peak_gib` is the extra memory over what was
allocated before the call, `grads_gib` the part of it that is the returned gradients themselves,
`extra_gib` the rest (workspace).

  python bench/ops.py [--ops rms_norm,linear_cross_entropy] [--quick]
  python bench/ops.py --backward          # the norm and activation backward ops alone (GPU time)
  python bench/ops.py --nf4-matmul        # decoding's NF4 matmul vs dequantize_nf4 + F.linear
  python bench/ops.py --nf4-sweep         # every candidate tile config of nf4_matmul on the key shapes
  python bench/ops.py --nf4-gemv-sweep    # the same for its one-row (decode at batch 1) kernel
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

DT = torch.bfloat16
N = 8192  # tokens


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    import triton.testing

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


_LEAVES: "weakref.WeakSet[torch.Tensor]" = weakref.WeakSet()


def measure(fn: Callable[[], object], backward: bool, graph: bool = True) -> dict:
    """ms / graph_ms (median) and peak / grads GiB for fn (+ its backward)."""
    import triton.testing

    def step():
        out = fn()
        if backward:
            t = out[0] if isinstance(out, tuple) else out
            t.backward(torch.ones_like(t) if t.dim() else None)

    step()
    for t in _LEAVES:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    grads = sum(t.grad.nbytes for t in _LEAVES if t.grad is not None) / 2**30
    cell = dict(ms=round(triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median"), 4),
                peak_gib=round(peak, 3))
    if backward:
        cell.update(grads_gib=round(grads, 3), extra_gib=round(peak - grads, 3))
    if not graph or cell["ms"] > 2.0:  # launch overhead is noise there, and graph pools cost memory
        return cell
    try:  # GPU time alone: the same call replayed from a CUDA graph
        cell["graph_ms"] = round(triton.testing.do_bench_cudagraph(step, rep=100, return_mode="median"), 4)
    except Exception as e:  # an op that cannot be captured still has its eager time
        cell["graph_ms"] = f"{type(e).__name__}: {str(e)[:120]}"
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return cell


_GEN: torch.Generator | None = None  # its own generator: a failed graph capture leaves the default one unusable


def leaf(*shape, scale=1.0, grad=True):
    global _GEN
    _GEN = _GEN or torch.Generator("cuda").manual_seed(0)
    t = (torch.randn(*shape, device="cuda", dtype=DT, generator=_GEN) * scale).requires_grad_(grad)
    if grad:
        _LEAVES.add(t)
    return t


def cases(quick: bool):
    import minift.ops as mo
    import minift.ops.reference as ref

    try:
        import liger_kernel.transformers.functional as lk
    except Exception:  # liger not installed: skip its column
        lk = None
    hiddens = [2048] if quick else [2048, 2560, 4096]
    for H in hiddens:
        x, w = leaf(N, H), leaf(H, scale=0.1)
        byt = {False: 2 * N * H * 2, True: (2 + 3) * N * H * 2}
        impls = {"minift": lambda: mo.rms_norm(x, w, 1e-6, 1.0), "eager": lambda: ref.rms_norm(x, w, 1e-6, 1.0),
                 "compiled": torch.compile(lambda: ref.rms_norm(x, w, 1e-6, 1.0))}
        if lk:
            impls["liger"] = lambda: lk.liger_rms_norm(x, w, 1e-6, 1.0, "gemma", False)
        yield "rms_norm", dict(N=N, H=H), impls, byt
        b = leaf(H, scale=0.1)
        impls = {"minift": lambda: mo.layer_norm(x, w, b, 1e-6), "eager": lambda: ref.layer_norm(x, w, b, 1e-6),
                 "compiled": torch.compile(lambda: ref.layer_norm(x, w, b, 1e-6))}
        if lk:
            impls["liger"] = lambda: lk.liger_layer_norm(x, w, b, 1e-6)
        yield "layer_norm", dict(N=N, H=H), impls, byt
    for name, (h, hk, d) in {"llama-1b": (32, 8, 64), "gemma-3-4b": (8, 4, 256)}.items():
        B, S = 4, N // 4
        q = leaf(B, S, h, d).transpose(1, 2)
        k = leaf(B, S, hk, d).transpose(1, 2)
        pos = torch.arange(S, device="cuda").expand(B, S)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
        emb = torch.cat([pos[..., None] * inv] * 2, -1)
        cos, sin = emb.cos(), emb.sin()
        qk = B * S * (h + hk) * d * 2
        byt = {False: 2 * qk + 2 * B * S * d * 4, True: 4 * qk + 4 * B * S * d * 4}
        impls = {"minift": lambda: mo.rope(q, k, cos, sin), "eager": lambda: ref.rope(q, k, cos, sin),
                 "compiled": torch.compile(lambda: ref.rope(q, k, cos, sin))}
        if lk:
            impls["liger"] = lambda: lk.liger_rope(q, k, cos.to(DT), sin.to(DT))
        yield "rope", dict(shape=name, B=B, S=S), impls, byt
    for I in ([8192] if quick else [8192, 10240, 14336]):
        g, u = leaf(N, I), leaf(N, I)
        byt = {False: 3 * N * I * 2, True: 3 * N * I * 2 + 5 * N * I * 2}
        impls = {"minift": lambda: mo.swiglu(g, u), "eager": lambda: ref.swiglu(g, u),
                 "compiled": torch.compile(lambda: ref.swiglu(g, u))}
        if lk:
            impls["liger"] = lambda: lk.liger_swiglu(g, u)
        yield "swiglu", dict(N=N, I=I), impls, byt
        impls = {"minift": lambda: mo.geglu(g, u, "tanh"), "eager": lambda: ref.geglu(g, u, "tanh"),
                 "compiled": torch.compile(lambda: ref.geglu(g, u, "tanh"))}
        if lk:
            impls["liger"] = lambda: lk.liger_geglu(g, u)
        yield "geglu", dict(N=N, I=I), impls, byt
    for V in ([128256] if quick else [128256, 262208]):
        logits = leaf(N, V, scale=2.0)
        labels = torch.randint(0, V, (N,), device="cuda", generator=_GEN)
        labels[::7] = -100
        byt = {False: N * V * 2, True: 3 * N * V * 2}
        impls = {"minift": lambda: mo.cross_entropy(logits, labels),
                 "eager": lambda: ref.cross_entropy(logits, labels),
                 "compiled": torch.compile(lambda: ref.cross_entropy(logits, labels))}
        if lk:
            impls["liger"] = lambda: lk.liger_cross_entropy(logits, labels)
        yield "cross_entropy", dict(N=N, V=V), impls, byt
        del logits
        for H in ([2048] if quick else [2048, 2560, 4096]):
            hid, W = leaf(N, H), leaf(V, H, scale=0.02)
            impls = {"minift": lambda: mo.linear_cross_entropy(hid, W, labels),
                     "eager": lambda: ref.linear_cross_entropy(hid, W, labels),
                     "compiled_chunked": torch.compile(lambda: ref.linear_cross_entropy_chunked(hid, W, labels))}
            if lk:
                impls["liger"] = lambda: lk.liger_fused_linear_cross_entropy(hid, W, labels)
            yield "linear_cross_entropy", dict(N=N, V=V, H=H, head="trainable"), impls, None
            W.requires_grad_(False)  # LoRA's case: a frozen lm_head, no grad_weight
            impls = {k: v for k, v in impls.items() if k != "compiled_chunked"}
            impls["compiled_chunked"] = torch.compile(lambda: ref.linear_cross_entropy_chunked(hid, W, labels))
            yield "linear_cross_entropy", dict(N=N, V=V, H=H, head="frozen"), impls, None
            del hid, W
    yield from lora_cases(quick)


def lora_cases(quick: bool):
    import bitsandbytes.functional as bnbf

    import minift.ops as mo
    import minift.ops.reference as ref

    for H, I in ([(2048, 8192)] if quick else [(2048, 8192), (2560, 10240), (4096, 14336)]):
        w = leaf(I, H, scale=0.02, grad=False)
        data, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        nf4 = mo.NF4Weight.from_bnb(data, qs)
        impls = {"minift": lambda: mo.dequantize_nf4(nf4), "eager": lambda: ref.dequantize_nf4(nf4),
                 "bitsandbytes": lambda: bnbf.dequantize_4bit(data, qs)}
        yield "dequantize_nf4", dict(H=H, I=I), impls, {False: I * H * 2.5, True: None}
        x = leaf(N, H)
        A = (torch.randn(16, H, device="cuda", generator=_GEN) * 0.01).requires_grad_(True)
        Bm = (torch.randn(I, 16, device="cuda", generator=_GEN) * 0.01).requires_grad_(True)
        _LEAVES.update((A, Bm))
        for base_name, base in (("bf16", w), ("nf4", nf4)):
            impls = {"minift": lambda base=base: mo.lora_linear(x, base, A, Bm, 2.0),
                     "eager": lambda base=base: ref.lora_linear(x, base, A, Bm, 2.0)}
            impls["compiled"] = torch.compile(impls["eager"])
            yield "lora_linear", dict(N=N, H=H, I=I, r=16, base=base_name), impls, None


def glu_backward(bw: float) -> None:
    """The swiglu / geglu backward op alone (reads dy, gate, up; writes dgate, dup), CUDA-graph GPU
    time, 8192 tokens; `add` moves the same five tensors' bytes as two torch.add calls."""
    import triton.testing

    import minift.ops.activations as ma

    for i in (8192, 14336):
        dy, g, u = (torch.randn(N, i, device="cuda", dtype=DT) for _ in range(3))
        nbytes = 5 * N * i * dy.element_size()
        row = dict(kind="glu_backward", intermediate=i, tokens=N)
        runs = {"add": lambda: (torch.add(dy, g), torch.add(u, u))}
        for act in ("silu", "gelu_tanh", "gelu"):
            runs[act] = lambda act=act: ma._glu_bwd_impl(dy, g, u, act)
        for name, fn in runs.items():
            us = triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3
            row[name] = dict(us=round(us, 1), bw_frac=round(nbytes / (us * 1e-6) / bw, 3))
        print(json.dumps(row), flush=True)


def norm_backward(bw: float) -> None:
    """The rms_norm / layer_norm backward ops alone (what autograd runs), CUDA-graph GPU time, at
    8192 rows (65536 of 256): without weight grads (LoRA's frozen norms), with them, and for
    layer_norm also under torch.use_deterministic_algorithms (partial rows, no atomics; timed without
    the NaN fill of new tensors that mode also turns on, which costs a write of dx). Bandwidth counts
    x, dy and dx; `add` is a torch.add moving the same bytes with no maths."""
    import triton.testing

    from minift.ops.layer_norm import _layer_norm_bwd_impl
    from minift.ops.rms_norm import _rms_norm_bwd_impl

    for h in (1152, 2048, 2560, 3584, 4096, 256):
        m = 65536 if h == 256 else N
        x, dy = (torch.randn(m, h, device="cuda", dtype=DT) for _ in range(2))
        w = torch.randn(h, device="cuda", dtype=DT)
        nbytes = 3 * m * h * x.element_size()
        runs = {"add": lambda: torch.add(x, dy, out=torch.empty_like(x))}
        for wg in (False, True):
            suffix = "_dw" if wg else ""
            runs[f"rms_norm{suffix}"] = lambda wg=wg: _rms_norm_bwd_impl(dy, x, w, 1e-6, 1.0, wg)
            runs[f"layer_norm{suffix}"] = lambda wg=wg: _layer_norm_bwd_impl(dy, x, w, 1e-6, wg)
        row = dict(kind="norm_backward", hidden=h, rows=m)
        fill = torch.utils.deterministic.fill_uninitialized_memory
        for name, fn in list(runs.items()) + [("layer_norm_dw_deterministic", runs["layer_norm_dw"])]:
            previous = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(name.endswith("deterministic"), warn_only=True)
            # deterministic mode also NaN-fills every torch.empty (dx here): time the kernels alone
            torch.utils.deterministic.fill_uninitialized_memory = False
            try:
                us = triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3
            finally:
                torch.use_deterministic_algorithms(previous)
                torch.utils.deterministic.fill_uninitialized_memory = fill
            row[name] = dict(us=round(us, 1), bw_frac=round(nbytes / (us * 1e-6) / bw, 3))
        print(json.dumps(row), flush=True)


# ---- nf4_matmul: decoding's 4-bit matmul ----------------------------------------------------------

HBM_TB_S = {"H200": 4.8, "H100": 3.35}  # nominal HBM bandwidth by device-name fragment (the target's basis)


def _nf4_projections(name: str) -> dict:
    """(out_features, in_features) of a decoder layer's seven projections, from bench/common.py's shapes."""
    from common import SHAPES

    c = SHAPES[name]
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    return dict(q_proj=(q, h), k_proj=(kv, h), v_proj=(kv, h), o_proj=(h, q), gate_proj=(i, h), up_proj=(i, h),
                down_proj=(h, i))


def _nf4_weights(n: int, k: int, min_bytes: float = 256e6):
    """Enough distinct NF4 weights of (n, k) that cycling through them defeats the L2 cache
    (>= 256 MB of packed bytes, the H200's L2 is 50 MB): a single weight would be timed from L2."""
    import importlib

    import bitsandbytes.functional as bnbf

    import minift.ops as mo

    g = torch.Generator("cuda").manual_seed(n * 7 + k)
    w = torch.randn(n, k, device="cuda", dtype=DT, generator=g) * 0.02
    data, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    base = mo.NF4Weight.from_bnb(data, qs)
    nbytes = importlib.import_module("minift.ops.nf4_matmul").bytes_read(base)
    copies = max(1, min(1024, int(-(-min_bytes // nbytes))))
    ws = [base] + [mo.NF4Weight(base.data.clone(), base.absmax.clone(), base.code.clone(), base.shape, base.dtype,
                                base.blocksize, base.nested_absmax.clone(), base.nested_code.clone(),
                                base.nested_blocksize, base.offset.clone()) for _ in range(copies - 1)]
    del w
    bnb_ws = [(data if i == 0 else data.clone(), qs) for i in range(len(ws))]  # bitsandbytes' own form
    return ws, nbytes, bnb_ws


def _time_each(fn, ws) -> dict:
    """Per-call time of fn(w) for w cycling through ws: eager (host overhead included) and from a CUDA
    graph (GPU time), both medians, in microseconds."""
    import triton.testing

    def all_():
        for w in ws:
            fn(w)

    eager = triton.testing.do_bench(all_, warmup=10, rep=100, return_mode="median") * 1e3 / len(ws)
    graph = triton.testing.do_bench_cudagraph(all_, rep=100, return_mode="median") * 1e3 / len(ws)
    return dict(us=round(eager, 2), graph_us=round(graph, 2))


def nf4_matmul_bench(bw: float, sweep: bool = False, rows: tuple[int, ...] = (1, 4, 8, 16),
                     gemv_sweep: bool = False) -> None:
    """ops.nf4_matmul on each projection of Llama-3.2-1B, Llama-3.1-8B and Gemma-3-4B at M = 1, 4, 8,
    16 rows (bf16), beside dequantize_nf4 + F.linear (what Linear4bit ran before). `gb_s` counts the
    bytes the op must read (packed weight + absmax + nested statistics) over the CUDA-graph time;
    `hbm_frac` is that over the device's nominal HBM bandwidth (the target: >= 0.70 at M = 1 on the
    4096 x 14336 weights), `copy_frac` over the copy bandwidth measured in this run. One row per case,
    then a per-layer total; at M = 1 also the tensor-core kernel (what one row took before the
    one-row kernel) and bitsandbytes' gemv_4bit. `sweep` / `gemv_sweep`: instead, every candidate
    tile config of the tensor-core / one-row kernel on the key shapes."""
    import importlib

    import torch.nn.functional as F

    import minift.ops as mo

    nm = importlib.import_module("minift.ops.nf4_matmul")
    name = torch.cuda.get_device_name()
    nominal = next((v for k, v in HBM_TB_S.items() if k in name), None)
    if sweep:
        return _nf4_sweep(nm, bw, nominal)
    if gemv_sweep:
        return _nf4_gemv_sweep(nm, bw, nominal)
    for model in ("llama-3.2-1b", "llama-3.1-8b", "gemma-3-4b"):
        totals: dict[int, dict] = {}
        for proj, (n, k) in _nf4_projections(model).items():
            ws, nbytes, bnb_ws = _nf4_weights(n, k)
            for m in rows:
                x = torch.randn(m, k, device="cuda", dtype=DT)
                with torch.no_grad():
                    got = mo.nf4_matmul(x, ws[0])
                    want = F.linear(x, mo.dequantize_nf4(ws[0]))
                    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                    t = _time_each(lambda w: mo.nf4_matmul(x, w), ws)
                    d = _time_each(lambda w: F.linear(x, mo.dequantize_nf4(w)), ws)
                gbs = nbytes / (t["graph_us"] * 1e-6) / 1e9
                row = dict(kind="nf4_matmul", model=model, proj=proj, N=n, K=k, M=m, bytes=nbytes,
                           config=nm._config(m, n, k, x.device, x.dtype), nf4_matmul=dict(**t, gb_s=round(gbs, 1)),
                           dequant_linear=d, graph_speedup=round(d["graph_us"] / t["graph_us"], 2),
                           copy_frac=round(gbs * 1e9 / bw, 3), rel_err_vs_dequant_linear=float(f"{err:.2e}"))
                if nominal:
                    row["hbm_frac"] = round(gbs / (nominal * 1e3), 3)
                if m == 1:  # the one-row kernel's tiles; the tensor-core kernel on the same row (before it)
                    row["gemv_config"] = nm._gemv_config(n, k)
                    nm.GEMV_ROWS = 0
                    try:
                        with torch.no_grad():
                            tc = _time_each(lambda w: mo.nf4_matmul(x, w), ws)
                    finally:
                        nm.GEMV_ROWS = 1
                    row["tensor_core_kernel"] = dict(**tc, gb_s=round(nbytes / (tc["graph_us"] * 1e-6) / 1e9, 1))
                if m == 1:  # bitsandbytes' CUDA GEMV for one row (what transformers' 4-bit decode runs)
                    import bitsandbytes.functional as bnbf

                    with torch.no_grad():
                        b = _time_each(lambda dq: bnbf.gemv_4bit(x, dq[0].t(), state=dq[1]), bnb_ws)
                    row["bnb_gemv_4bit"] = dict(**b, gb_s=round(nbytes / (b["graph_us"] * 1e-6) / 1e9, 1))
                print(json.dumps(row), flush=True)
                tot = totals.setdefault(m, dict(nf4_matmul_us=0.0, dequant_linear_us=0.0, bytes=0))
                tot["nf4_matmul_us"] += t["graph_us"]
                tot["dequant_linear_us"] += d["graph_us"]
                tot["bytes"] += nbytes
            del ws
            torch.cuda.empty_cache()
        for m, tot in totals.items():
            print(json.dumps(dict(kind="nf4_matmul_layer", model=model, M=m,
                                  nf4_matmul_us=round(tot["nf4_matmul_us"], 1),
                                  dequant_linear_us=round(tot["dequant_linear_us"], 1),
                                  speedup=round(tot["dequant_linear_us"] / tot["nf4_matmul_us"], 2),
                                  gb_s=round(tot["bytes"] / (tot["nf4_matmul_us"] * 1e-6) / 1e9, 1))), flush=True)


def _nf4_gemv_sweep(nm, bw: float, nominal: float | None) -> None:
    """The one-row kernel's candidate tiles (nf4_matmul.GEMV_CONFIG_OVERRIDE) on the decode shapes:
    a row per (shape, config), then the best per shape beside the rules' choice."""
    import minift.ops as mo

    cands = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw) for bn in (1, 2, 4, 8) for bk in (1024, 2048) for nw in (4, 8)
             if bn * bk // (32 * nw) >= 8]
    for n, k in ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (4096, 14336), (14336, 4096)):
        ws, nbytes, bnb_ws = _nf4_weights(n, k)
        x = torch.randn(1, k, device="cuda", dtype=DT)
        import bitsandbytes.functional as bnbf

        with torch.no_grad():  # the peer on the same weights: bitsandbytes' CUDA GEMV
            b = _time_each(lambda dq: bnbf.gemv_4bit(x, dq[0].t(), state=dq[1]), bnb_ws)
        print(json.dumps(dict(kind="nf4_gemv_sweep_bnb", N=n, K=k, graph_us=b["graph_us"],
                              gb_s=round(nbytes / (b["graph_us"] * 1e-6) / 1e9, 1))), flush=True)
        best = None
        for cfg in cands:
            nm.GEMV_CONFIG_OVERRIDE = cfg
            try:
                with torch.no_grad():
                    t = _time_each(lambda w: mo.nf4_matmul(x, w), ws)
            except Exception as e:  # a config that does not compile or fit
                print(json.dumps(dict(kind="nf4_gemv_sweep", N=n, K=k, config=cfg,
                                      error=f"{type(e).__name__}: {str(e)[:160]}")), flush=True)
                continue
            finally:
                nm.GEMV_CONFIG_OVERRIDE = None
            gbs = nbytes / (t["graph_us"] * 1e-6) / 1e9
            row = dict(kind="nf4_gemv_sweep", N=n, K=k, config=cfg, graph_us=t["graph_us"], gb_s=round(gbs, 1),
                       copy_frac=round(gbs * 1e9 / bw, 3))
            if nominal:
                row["hbm_frac"] = round(gbs / (nominal * 1e3), 3)
            print(json.dumps(row), flush=True)
            if best is None or t["graph_us"] < best["graph_us"]:
                best = row
        print(json.dumps(dict(kind="nf4_gemv_sweep_best", N=n, K=k, best=best, rules=nm._gemv_config(n, k))), flush=True)
        del ws
        torch.cuda.empty_cache()


def _nf4_sweep(nm, bw: float, nominal: float | None) -> None:
    """Each candidate config (nf4_matmul.CONFIG_OVERRIDE) on the shapes the rules matter most for;
    one row per (shape, config) with its CUDA-graph time, then the best per shape: the data to
    re-choose `_config`'s rules from."""
    import minift.ops as mo

    cands = []
    for bn, nw in ((64, 4), (128, 8), (128, 4)):
        for ks in (128, 256, 512):
            for ns in (2, 3, 4):
                cands.append(dict(BLOCK_N=bn, S=1, KS=ks, num_warps=nw, num_stages=ns))
    for bn, s, nw in ((16, 4, 4), (16, 8, 8), (32, 4, 4), (32, 2, 4)):
        cands.append(dict(BLOCK_N=bn, S=s, KS=256, num_warps=nw, num_stages=3))
    shapes = [(4096, 14336), (14336, 4096), (2048, 2048), (8192, 2048), (1024, 4096), (10240, 2560)]
    for n, k in shapes:
        ws, nbytes, _ = _nf4_weights(n, k)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=DT)
            best = None
            for cand in cands:
                iters = -(-k // (cand["S"] * cand["KS"]))
                for split in sorted({1, 2, 4, 8, 16, nm._config(m, n, k, x.device, x.dtype)["SPLIT"]}):
                    if split > iters:
                        continue
                    cfg = dict(cand, SPLIT=split)
                    nm.CONFIG_OVERRIDE = cfg
                    try:
                        with torch.no_grad():
                            t = _time_each(lambda w: mo.nf4_matmul(x, w), ws)
                    except Exception as e:  # a config that does not compile or fit
                        print(json.dumps(dict(kind="nf4_sweep", N=n, K=k, M=m, config=cfg,
                                              error=f"{type(e).__name__}: {str(e)[:160]}")), flush=True)
                        continue
                    finally:
                        nm.CONFIG_OVERRIDE = None
                    gbs = nbytes / (t["graph_us"] * 1e-6) / 1e9
                    row = dict(kind="nf4_sweep", N=n, K=k, M=m, config=cfg, graph_us=t["graph_us"],
                               gb_s=round(gbs, 1), copy_frac=round(gbs * 1e9 / bw, 3))
                    if nominal:
                        row["hbm_frac"] = round(gbs / (nominal * 1e3), 3)
                    print(json.dumps(row), flush=True)
                    if best is None or t["graph_us"] < best["graph_us"]:
                        best = row
            rules = nm._config(m, n, k, x.device, x.dtype)
            print(json.dumps(dict(kind="nf4_sweep_best", N=n, K=k, M=m, best=best, rules=rules)), flush=True)
        del ws
        torch.cuda.empty_cache()


# ---- gemv: decoding's 16-bit matmul -------------------------------------------------------------


def _dense_weights(n: int, k: int, min_bytes: float = 256e6) -> list[torch.Tensor]:
    """Distinct bf16 (n, k) weights totalling >= 256 MB, so cycling through them is timed from HBM."""
    copies = max(1, min(1024, int(-(-min_bytes // (n * k * 2)))))
    g = torch.Generator("cuda").manual_seed(n * 7 + k)
    base = torch.randn(n, k, device="cuda", dtype=DT, generator=g) * 0.02
    return [base] + [base.clone() for _ in range(copies - 1)]


def _graph_us(fn, ws) -> float:
    import triton.testing

    def all_():
        for w in ws:
            fn(w)

    return triton.testing.do_bench_cudagraph(all_, rep=40, return_mode="median") * 1e3 / len(ws)


def _gemv_shapes() -> list[tuple[str, int, int]]:
    from common import SHAPES

    out = []
    for model in ("llama-3.2-1b", "gemma-3-4b", "llama-3.1-8b"):
        p = _nf4_projections(model)
        c = SHAPES[model]
        q, kv, h, i = p["q_proj"][0], p["k_proj"][0], c["hidden_size"], c["intermediate_size"]
        out += [(f"{model}:{name}", n, k) for name, (n, k) in p.items() if name not in ("v_proj", "up_proj")]
        out += [(f"{model}:qkv_concat", q + 2 * kv, h), (f"{model}:gate_up_concat", 2 * i, h),
                (f"{model}:lm_head", c["vocab_size"], h)]
    return out


def gemv_bench(bw: float, sweep: bool = False) -> None:
    """ops.gemv vs F.linear (cuBLAS) on every projection of Llama-3.2-1B, Gemma-3-4B and Llama-3.1-8B
    (and q/k/v, gate/up concatenated, and the LM head) at M = 1, 2, 4, 8, 16 bf16 rows: CUDA-graph
    time per call with the weights cycled out of L2, `hbm_frac` = weight bytes / time / nominal HBM.
    `sweep`: every candidate tile config on the key shapes (the data for gemv._config's rules)."""
    import importlib

    import torch.nn.functional as F

    import minift.ops as mo

    gm = importlib.import_module("minift.ops.gemv")
    name = torch.cuda.get_device_name()
    nominal = next((v for k, v in HBM_TB_S.items() if k in name), 4.8)
    frac = lambda nbytes, us: round(nbytes / (us * 1e-6) / (nominal * 1e12), 3)  # noqa: E731
    if sweep:
        shapes = [("q", 2048, 2048), ("gate", 8192, 2048), ("down", 2048, 8192), ("kv", 512, 2048)]
        cands = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw) for bn in (1, 2, 4, 8, 16)
                 for bk in (512, 1024, 2048) for nw in (4, 8) if 1024 <= bn * bk <= 16384]
        for label, n, k in shapes:
            ws = _dense_weights(n, k)
            for m in (1, 8):
                x = torch.randn(m, k, device="cuda", dtype=DT)
                best = None
                for cand in cands:
                    if m * cand["BLOCK_N"] * cand["BLOCK_K"] > 65536:
                        continue
                    gm.CONFIG_OVERRIDE = cand
                    try:
                        with torch.no_grad():
                            us = _graph_us(lambda w: mo.gemv(x, w), ws)
                    except Exception as e:
                        print(json.dumps(dict(kind="gemv_sweep", N=n, K=k, M=m, config=cand,
                                              error=f"{type(e).__name__}: {str(e)[:120]}")), flush=True)
                        continue
                    finally:
                        gm.CONFIG_OVERRIDE = None
                    row = dict(kind="gemv_sweep", shape=label, N=n, K=k, M=m, config=cand, graph_us=round(us, 2),
                               hbm_frac=frac(n * k * 2, us))
                    print(json.dumps(row), flush=True)
                    if best is None or us < best["graph_us"]:
                        best = row
                with torch.no_grad():
                    cub = _graph_us(lambda w: F.linear(x, w), ws)
                print(json.dumps(dict(kind="gemv_sweep_best", shape=label, N=n, K=k, M=m, best=best,
                                      rules=gm._config(m, n, k), cublas_us=round(cub, 2),
                                      cublas_hbm_frac=frac(n * k * 2, cub))), flush=True)
            del ws
            torch.cuda.empty_cache()
        return
    for label, n, k in _gemv_shapes():
        ws = _dense_weights(n, k)
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=DT)
            with torch.no_grad():
                err = ((mo.gemv(x, ws[0]).float() - F.linear(x, ws[0]).float()).norm()
                       / F.linear(x, ws[0]).float().norm()).item()
                ours = _graph_us(lambda w: mo.gemv(x, w), ws)
                cub = _graph_us(lambda w: F.linear(x, w), ws)
            print(json.dumps(dict(kind="gemv", shape=label, N=n, K=k, M=m, config=gm._config(m, n, k),
                                  gemv_us=round(ours, 2), cublas_us=round(cub, 2), speedup=round(cub / ours, 2),
                                  gemv_hbm_frac=frac(n * k * 2, ours), cublas_hbm_frac=frac(n * k * 2, cub),
                                  rel_err_vs_cublas=float(f"{err:.2e}"))), flush=True)
        del ws
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default=None, help="comma list of op names (default: all)")
    ap.add_argument("--quick", action="store_true", help="one shape per op")
    ap.add_argument("--backward", action="store_true", help="only the norm and activation backward ops")
    ap.add_argument("--nf4-matmul", action="store_true", help="only nf4_matmul vs dequantize_nf4 + F.linear")
    ap.add_argument("--nf4-sweep", action="store_true", help="nf4_matmul's candidate tile configs")
    ap.add_argument("--nf4-gemv-sweep", action="store_true", help="nf4_matmul's one-row kernel's tile configs")
    ap.add_argument("--nf4-rows", default="1,4,8,16", help="--nf4-matmul's row counts of x")
    ap.add_argument("--gemv", action="store_true", help="only gemv vs F.linear (cuBLAS) at decoding's row counts")
    ap.add_argument("--gemv-sweep", action="store_true", help="gemv's candidate tile configs")
    a = ap.parse_args()
    from common import environment

    env = environment()
    bw = copy_bandwidth()
    print(json.dumps(dict(kind="copy_bandwidth", tb_s=round(bw / 1e12, 3), **env)), flush=True)
    if a.backward:
        norm_backward(bw)
        return glu_backward(bw)
    if a.nf4_matmul or a.nf4_sweep or a.nf4_gemv_sweep:
        return nf4_matmul_bench(bw, sweep=a.nf4_sweep, rows=tuple(int(r) for r in a.nf4_rows.split(",")),
                                gemv_sweep=a.nf4_gemv_sweep)
    if a.gemv or a.gemv_sweep:
        return gemv_bench(bw, sweep=a.gemv_sweep)
    wanted = set(a.ops.split(",")) if a.ops else None
    for op, shape, impls, byt in cases(a.quick):
        if wanted and op not in wanted:
            continue
        for backward in (False, True):
            if backward and op == "dequantize_nf4":
                continue
            row = dict(kind="op", op=op, **shape, pass_="fwd+bwd" if backward else "fwd")
            for impl, fn in impls.items():
                try:
                    # Liger's losses sync with the host: a failed capture would poison the CUDA RNG state.
                    cell = measure(fn, backward, graph=not (impl == "liger" and "cross_entropy" in op))
                except Exception as e:  # an impl lacking a case must not hide the others
                    row[impl] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
                    continue
                t = cell["graph_ms"] if isinstance(cell.get("graph_ms"), float) else cell["ms"]
                if byt and byt.get(backward):
                    cell["bw_frac"] = round(byt[backward] / (t * 1e-3) / bw, 3)
                row[impl] = cell
            if "minift" in row and "ms" in row["minift"]:
                for impl in impls:
                    if impl != "minift" and "ms" in row.get(impl, {}):
                        row[f"speedup_vs_{impl}"] = round(row[impl]["ms"] / row["minift"]["ms"], 3)
                        gm, gi = row["minift"].get("graph_ms"), row[impl].get("graph_ms")
                        if isinstance(gm, float) and isinstance(gi, float):
                            row[f"graph_speedup_vs_{impl}"] = round(gi / gm, 3)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
