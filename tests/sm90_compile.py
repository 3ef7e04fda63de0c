"""Compile every Triton kernel launch the ops make for an H100 (sm_90), on a machine without a GPU.

CI runs the kernels under TRITON_INTERPRET=1, which executes them in NumPy: it never runs
Triton's compiler, so a kernel that only the compiler rejects (a loop-carried value changing
type, an unsupported construct, a register-hungry tile that ptxas refuses) would pass CI and
fail on the first GPU. This script closes that gap in two processes:

  record:  under the interpreter, drive every public op (forward and backward, 16- and 32-bit,
           narrow and wide rows, NF4 bases, softcap, all reductions) and record each launch's
           kernel, argument types, constexprs and launch options, specialised as Triton's JIT
           does on a GPU (an int argument equal to 1 becomes a constant; pointers and ints that
           are multiples of 16 are marked so), since that changes vectorisation and registers;
  compile: without the interpreter, compile each recorded launch with triton.compile for
           GPUTarget("cuda", 90, 32), through ptxas to a cubin, and read its register spills
           (cuobjdump's per-thread stack): a spilling launch config is a performance cliff.

  python tests/sm90_compile.py record OUT.json ;  python tests/sm90_compile.py compile OUT.json
"""

from __future__ import annotations

import json
import os
import sys

_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32",
           "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg")


def _arg_type(v) -> str | None:
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(v, TensorDescriptor):  # a host-side TMA descriptor: element type and box shape
        return f"tensordesc<{_DTYPES[str(v.base.dtype).replace('torch.', '')]}[{','.join(map(str, v.block_shape))}]>"
    if isinstance(v, torch.Tensor):
        return "*" + _DTYPES[str(v.dtype).replace("torch.", "")]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i64" if abs(v) >= 2**31 else "i32"
    if isinstance(v, float):
        return "fp32"
    return None


def _drive() -> None:
    """Every op, forward and backward, in the shapes and dtypes that select different kernels."""
    import torch

    import minift.ops as ops
    from minift.ops.nf4 import NF4Weight

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32, grad=True):
        return (torch.randn(*shape, generator=g) * 0.5).to(dtype).requires_grad_(grad)

    def back(out):
        """Backward from contiguous random gradients, as in training: the launch then specialises
        like it (unit strides; an expanded sum() gradient would have stride 0)."""
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(list(outs), [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs])

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for rows, hidden in ((5, 37), (3, 2048), (3, 2560), (2, 4096), (67, 16), (9, 256), (3, 1152), (2, 3584)):
            for wgrad in (True, False):
                x, w, b = rnd(rows, hidden, dtype=dt), rnd(hidden, dtype=dt, grad=wgrad), rnd(hidden, dtype=dt, grad=wgrad)
                back(ops.rms_norm(x, w, 1e-6, 1.0))
                back(ops.layer_norm(x, w, b, 1e-6))
            back(ops.layer_norm(rnd(rows, hidden, dtype=dt), rnd(hidden, dtype=dt), None, 1e-6))
        # Llama-1B/3B, Llama-8B/Mistral, Gemma-3 (head_dim 256) head layouts; odd ones
        for heads, d, s in (((4, 2), 16, 5), ((2, 1), 256, 5), ((32, 8), 64, 40), ((32, 8), 128, 40),
                            ((8, 4), 256, 40), ((16, 8), 256, 40)):
            q = rnd(2, s, heads[0], d, dtype=dt).transpose(1, 2)
            k = rnd(2, s, heads[1], d, dtype=dt).transpose(1, 2)
            cos, sin = torch.randn(1, s, d, generator=g), torch.randn(1, s, d, generator=g)
            back(ops.rope(q, k, cos, sin))
        for act in ("swiglu", "geglu"):
            gate, up = rnd(7, 33, dtype=dt), rnd(7, 33, dtype=dt)
            back(ops.swiglu(gate, up) if act == "swiglu" else ops.geglu(gate, up, "tanh"))
            back(ops.geglu(rnd(7, 33, dtype=dt), rnd(7, 33, dtype=dt), "none"))
        labels = torch.tensor([3, -100, 0, 299, 7], dtype=torch.long)
        for cap in (None, 30.0):
            back(ops.cross_entropy(rnd(5, 300, dtype=dt), labels, softcap=cap))
            h, wv = rnd(5, 16, dtype=dt), rnd(300, 16, dtype=dt)
            for red in ("mean", "none"):
                back(ops.linear_cross_entropy(h, wv, labels, softcap=cap, reduction=red, chunk_size=2))
    import bitsandbytes.functional as bnbf

    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for nested in (True, False):
            wt = torch.randn(96, 64, generator=g).to(dt)
            data, qs = bnbf.quantize_4bit(wt, blocksize=64, quant_type="nf4", compress_statistics=nested)
            nf4 = NF4Weight.from_bnb(data, qs)
            ops.dequantize_nf4(nf4)
            x = rnd(3, 64, dtype=dt)
            a, bm = rnd(4, 64), rnd(96, 4)
            back(ops.lora_linear(x, nf4, a, bm, 2.0))
            back(ops.lora_linear(rnd(3, 64, dtype=dt), wt, rnd(4, 64), rnd(96, 4), 2.0))
            down = torch.randn(64, 96, generator=g).to(dt)
            for act in ("swiglu", "geglu", "geglu_tanh"):
                projs = ((nf4, rnd(4, 64), rnd(96, 4)), (wt, None, None), (down, rnd(4, 96), rnd(64, 4)))
                back(ops.lora_mlp(rnd(3, 64, dtype=dt), *projs, activation=act))
    # Decoding's kernels (one row of x, no gradient): the GEMVs with and without the fused norm,
    # residual, bias and low-rank (LoRA) epilogue, even and ragged K / N; the NF4 GEMV at one row
    # (its own kernel) and 20 rows (split K). Small shapes: the interpreter runs every program.
    with torch.no_grad():
        for dt in (torch.bfloat16, torch.float32):
            for n, k in ((96, 64), (100, 200), (32, 2560)):  # small, ragged, BLOCK_K 2048 with a tail
                x, ws = rnd(1, k, dtype=dt), [rnd(n, k, dtype=dt), rnd(n // 2, k, dtype=dt), rnd(n // 2, k, dtype=dt)]
                nw = rnd(k, dtype=dt)
                ops.gemv(x, ws[0], residual=rnd(1, n, dtype=dt))
                ops.gemv(x, ws[0], rnd(n, dtype=dt))
                ops.gemv_cat(x, ws, norm_weight=nw, eps=1e-6, norm_offset=1.0)
                ops.gemv_cat(x, ws, [rnd(w.shape[0], dtype=dt) for w in ws])
                for act in ("silu", "gelu_tanh"):
                    ops.gemv_glu(x, ws[1], ws[2], act, norm_weight=nw)
                ops.gemv_glu(x, ws[1], ws[2], "silu")
                lora = [(rnd(r, k, grad=False), rnd(w.shape[0], r, grad=False), 2.0) for r, w in zip((16, 1, 3), ws)]
                ops.gemv_cat(x, ws, low_rank=lora, norm_weight=nw)
                ops.gemv(x, ws[0], residual=rnd(1, n, dtype=dt), low_rank=lora[0])
                ops.gemv_glu(x, ws[1], ws[2], "silu", low_rank=[lora[1], None], norm_weight=nw)
            ops.gemv(rnd(1, 64, dtype=dt), rnd(4160, 64, dtype=dt))  # 8 rows a program
            ops.gemv(rnd(1, 2048, dtype=dt), rnd(16, 2048, dtype=dt))  # all of K in one even tile
            for nested in (True, False):
                for n, k in ((128, 2048), (96, 320)):  # split K 4 at 20 rows; 1
                    data, qs = bnbf.quantize_4bit(torch.randn(n, k, generator=g).to(dt), blocksize=64,
                                                  quant_type="nf4", compress_statistics=nested)
                    nf4 = NF4Weight.from_bnb(data, qs)
                    for rows in (1, 20):
                        ops.nf4_matmul(rnd(rows, k, dtype=dt), nf4, None if nested else rnd(n, dtype=dt))
                    ops.nf4_matmul(rnd(1, k, dtype=dt), nf4, low_rank=(rnd(5, k, grad=False), rnd(n, 5, grad=False), 2.0))
        # One-launch decode attention: Llama-1B / 8B and Gemma-3 (head_dim 256, q/k norms) groups,
        # soft-capping, one program a head and a cache split over programs (with the combine launch).
        for dt in (torch.bfloat16, torch.float32):
            for hq, hk, d, slots, norm, cap in ((32, 8, 64, 40, False, None), (32, 8, 128, 3000, False, None),
                                                (8, 4, 256, 40, True, None), (8, 4, 256, 40, False, 50.0)):
                q, k, v = rnd(1, hq, 1, d, dtype=dt), rnd(1, hk, 1, d, dtype=dt), rnd(1, hk, 1, d, dtype=dt)
                kc, vc = rnd(1, hk, slots, d, dtype=dt, grad=False), rnd(1, hk, slots, d, dtype=dt, grad=False)
                mask = torch.ones(1, 1, 1, slots, dtype=torch.bool)
                nw = dict(q_norm=rnd(d, dtype=dt), k_norm=rnd(d, dtype=dt)) if norm else {}
                ops.decode_attention(q, k, v, kc, vc, torch.randn(1, 1, d), torch.randn(1, 1, d), mask,
                                     torch.tensor([slots // 2]), 0.125, cap, **nw)


def record(path: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import inspect

    import triton.runtime.interpreter as interp

    import minift.ops as ops

    seen: dict[str, list] = {}
    original = interp.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(params, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        types, consts, div16 = {}, {}, []
        for name, p in params.items():
            v = bound.get(name, p.default)
            if "constexpr" in str(p.annotation) or (type(v) is int and v == 1):
                types[name], consts[name] = "constexpr", v
            else:
                types[name] = _arg_type(v)
                if (type(v) is int and v % 16 == 0) or (hasattr(v, "data_ptr") and v.data_ptr() % 16 == 0):
                    div16.append(name)
        opts = {k: v for k, v in kwargs.items() if k in _OPTIONS}
        specs = [(types, consts)]
        if consts.get("BF16_BITS"):  # the interpreter's int16 stand-in for bf16 outputs: compile the GPU's form
            specs.append(({k: "*bf16" if t == "*i16" else t for k, t in types.items()}, dict(consts, BF16_BITS=False)))
        for t, c in specs:
            entry = [self.fn.__module__, self.fn.__name__, t, c, opts, div16]
            seen[json.dumps(entry, sort_keys=True)] = entry
        return None  # the launch signature is all that is needed: skip the interpreted run

    interp.InterpretedFunction.run = run
    with ops.backend("triton"):
        _drive()
    with open(path, "w") as f:
        json.dump(list(seen.values()), f)


def _stack_bytes(cubin: bytes) -> int | None:
    """Per-thread stack (register spills) of a cubin, from the cuobjdump Triton bundles; None if absent."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"STACK:(\d+)", out)
    return int(m.group(1)) if m else None


def _compile_one(entry: list) -> tuple[str | None, str | None, int]:
    """(error, spill report, spilled bytes a thread) for one recorded launch."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, types, consts, opts, div16 = entry
    fn = getattr(importlib.import_module(module), name)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    try:
        k = triton.compile(ASTSource(fn, types, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options=opts)
    except Exception as e:  # report every failure, not just the first
        return f"{name} {consts} {opts}: {type(e).__name__}: {str(e)[:400]}", None, 0
    stack = _stack_bytes(k.asm["cubin"])
    return None, (f"{name} {consts} {opts}: {stack} bytes of stack a thread" if stack else None), stack or 0


# Register spills beyond this many bytes a thread fail: an NF4 dequant config spilling 5400 ran 10x
# slower on an H100, while the fastest configs measured there spill up to 224 (Gemma RoPE, head_dim
# 256, 0.88 of copy bandwidth) and 112 (layer_norm's weight-gradient backward at 2048 wide).
MAX_SPILL = 256


def compile_all(path: str) -> int:
    """Exit status 1 if a launch does not compile or spills more than MAX_SPILL bytes a thread."""
    from concurrent.futures import ProcessPoolExecutor

    entries = json.load(open(path))
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(_compile_one, entries))
    errors = [e for e, _, _ in results if e]
    spills = [(s, n) for _, s, n in results if s]
    print(f"compiled {len(entries) - len(errors)} of {len(entries)} kernel launches for sm_90, {len(spills)} spill")
    for e in errors:
        print("FAILED", e)
    for s, n in spills:
        print("SPILLS" if n > MAX_SPILL else "spills (tolerated)", s)
    return 1 if errors or any(n > MAX_SPILL for _, n in spills) else 0


if __name__ == "__main__":
    cmd, out = sys.argv[1], sys.argv[2]
    if cmd == "record":
        record(out)
    else:
        sys.exit(compile_all(out))
