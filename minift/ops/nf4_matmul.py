"""`nf4_matmul(x, w, bias)`: x @ W^T (+ bias) for an NF4 weight, for decoding (few rows of x).

Dequantising the whole weight to 16 bits and running a GEMM moves ~4.5 bytes a weight (0.5 read,
2 written, 2 read again); this kernel reads the packed bytes and the block statistics once
(~0.52 bytes a weight) and dequantises in registers.

Arithmetic: every weight is `code[nibble] * absmax[block]` in float32 (a nested absmax is
`nested_code[q] * nested_absmax[q_block]`, then `+ offset`: two roundings, FMA contraction off as in
the dequant kernel), rounded to w.dtype and then to x's dtype, exactly `dequantize_nf4(w).to(x.dtype)`
(tested bit for bit); the products accumulate in float32 on the tensor cores (bf16 / fp16 x) or in
float32 FMAs (fp32 x, `input_precision="ieee"`). The result is `x @ dequantize_nf4(w).to(x.dtype).T`
up to float32 summation order.

Kernel (one program: BLOCK_N rows of W x up to BLOCK_M rows of x x one K range):
  * x is padded to BLOCK_M = 16 rows (32 above 16) and W is the dot's left operand ("swap AB"): the
    MMA's narrow side is x's rows, so M = 1 and M = 16 cost the same. With BLOCK_N = 64 and 4 warps
    the dot is a Hopper wgmma (A from registers via ldmatrix).
  * The bytes are read as a (BLOCK_N, KS / 64, 32) tile: a 32-byte chunk of a row is one absmax block
    (blocksize 64), so the (nested) scale is computed once a chunk and broadcast; 16-byte vector
    loads, `evict_first` (each byte is read once), pipelined by Triton (cp.async, num_stages).
  * code[nibble] is a warp shuffle on CUDA: lane j holds code[j & 15] and `shfl.sync.idx` within
    16-lane segments (which reads only the index's low 4 bits) fetches it, so 8 nibbles take 7
    shifts and 8 shuffles; a select tree takes 15 selects a value, a table load a scattered load with
    a 64-bit address. Then one FMUL by the scale, one rounding (F2FP packs two), the high nibble (the
    earlier k) joined before the low one, the dot. The interpreter loads code[nibble] (same values).
  * Split K: a grid of (N tiles, M tiles, SPLIT). Each program sums its share of the K iterations;
    with SPLIT > 1 it stores a float32 partial and takes a ticket (an atomic counter per tile, after
    a CTA barrier); the tile's last program adds the partials in split order (deterministic, the
    same bits every call), adds the bias, writes the output and resets the counter. One launch, no
    zero-fill, no second pass. The counters are a per-device int32 buffer made on first use (never
    while a CUDA graph is captured: such a call runs SPLIT = 1); two calls on concurrent streams
    must not share it.
  * S > 1 (an alternative kept for the sweep): the K range is also split across warps inside the
    program, as a batched dot (mma.sync); it measured ~30% more instructions a weight than wgmma.

One row (decoding at batch 1, `GEMV_ROWS`): padding x to 16 rows wastes nothing on a memory-bound
op, but the tensor-core kernel measured 6-12% of the H200's HBM rate at M = 1 (bench/RESULTS.md):
64-row tiles leave few programs, each a long serial chain of loads, shuffles and MMAs, plus the
split-K tail. `_nf4_gemv_kernel` is the 16-bit GEMV's shape instead (`ops.gemv`, 65-87% of HBM):
many small programs (2-4 rows of W, all of K, 16 packed bytes a thread an iteration), each weight
dequantised exactly as above and multiplied by x in float32 FMAs, summed in registers, no split,
no atomics. `_gemv_config` holds its tiles, `GEMV_CONFIG_OVERRIDE` replaces them
(`bench/ops.py --nf4-gemv-sweep`). Alone it reaches 16-35% of an H100's HBM rate (the sweep, small
to large weights); the whole NF4 decode step ran at 18% of the roofline. Its SASS for sm_90 says why: each thread reads
16 packed bytes a program and keeps a float32 accumulator per weight (~3 registers a weight), so
~12 KB are in flight an SM whatever the tile; and joining the two nibbles' values into one
(BLOCK_N, BLOCK_K) tile changes register layout through shared memory (18-20 barriers a program).
A streaming variant (a few long programs an SM, the next two steps' bytes loaded ahead, ~30 KB in
flight an SM) measured 1.5-2.3x slower than this kernel at every shape of the H100 sweep (seventeenth
session, bench/RESULTS.md) and was deleted: its byte repacking and per-step layout change cost more
than its deeper prefetch won. bitsandbytes' `gemv_4bit` on the same weights took 1.4-3.5x this
kernel's time.

Tile rules (`_config`): BLOCK_N = 64, S = 1, KS = 256 weights an iteration (128 bytes, one 128-byte
line, of each row), 4 warps, 3 stages; SPLIT = the largest split that keeps the grid within one wave
of 2 programs an SM (the tile's occupancy), at most 16 and leaving >= 2 iterations a split
(Llama-3.1-8B's down_proj, 4096 x 14336 at M = 1 on 132 SMs: 64 tiles x SPLIT 4). SASS of that loop for sm_90 (compiled here without a GPU, as tests/sm90_compile.py does)
has ~5.0 instructions a weight (1 FMUL, 1 SHFL, 0.9 shift, 0.5 F2FP, ~1.6 loads, staging and MMA),
156 registers, 76 KB of shared memory (2 programs an SM): an H200 issues ~33e12 thread-instructions
a second, room for ~3.4 TB/s of packed bytes, 70% of its HBM, if issue were perfect. These rules are
estimates from instruction counts, not measurements: `python bench/ops.py --nf4-matmul` measures,
`--nf4-sweep` times every candidate (`CONFIG_OVERRIDE`) so the rules can be re-chosen from one run.

K must be a multiple of the blocksize (every block then lies within one row). Other K, more than
MAX_ROWS rows of x, float64, and non-CUDA tensors under backend "auto" take dequantise (the Triton
dequant kernel on CUDA) + F.linear instead; on CPU that is `reference.nf4_matmul`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from . import reference as ref
from ._backend import HAS_TRITON, INTERPRET, Op, ticket_counters, use_triton
from .gemv import LoraSpec, _check_lora, _lora_backward, _with_lora, _low_rank_inputs
from .nf4 import _DTYPES, NF4Weight, base_weight, bf16_bits, out_arg, pack_base, unpack_nf4

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .gemv import _lora_up
    from .nf4 import store_cast

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_M = 16  # x rows a program takes at least: the MMA's smallest side; x is padded up to it
# Beyond this many rows of x the op dequantises and runs a GEMM: the kernel dequantises W again for
# every 32 rows of x, and from a few dozen rows on cuBLAS on a dequantised weight wins.
MAX_ROWS = 64
# Rows of x the one-row kernel takes (0: the tensor-core kernel takes them too, for the bench).
GEMV_ROWS = 1
_KS = 256  # weights a K slice covers per iteration (128 bytes of a row)

if HAS_TRITON:
    _INTERP = tl.constexpr(INTERPRET)

    @triton.jit
    def _lane_code(code_ptr):
        """code[laneid & 15], a per-lane scalar: the table the shuffles read (a scalar so no layout
        conversion can move it to another lane)."""
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
        return tl.load(code_ptr + (lane & 15))

    @triton.jit
    def _lookup_shfl(b, creg):
        """(code[b >> 4], code[b & 15]) for uint8 `b`, 4 bytes an asm block: shuffles within 16-lane
        segments read only the index's low 4 bits, so each nibble needs just a shift."""
        return tl.inline_asm_elementwise(
            """
            {
            .reg .b32 t<7>;
            shr.b32 t0, $8, 4;
            shr.b32 t1, $8, 8;
            shr.b32 t2, $8, 12;
            shr.b32 t3, $8, 16;
            shr.b32 t4, $8, 20;
            shr.b32 t5, $8, 24;
            shr.b32 t6, $8, 28;
            shfl.sync.idx.b32 $0, $9, t0, 0x101f, -1;
            shfl.sync.idx.b32 $4, $9, $8, 0x101f, -1;
            shfl.sync.idx.b32 $1, $9, t2, 0x101f, -1;
            shfl.sync.idx.b32 $5, $9, t1, 0x101f, -1;
            shfl.sync.idx.b32 $2, $9, t4, 0x101f, -1;
            shfl.sync.idx.b32 $6, $9, t3, 0x101f, -1;
            shfl.sync.idx.b32 $3, $9, t6, 0x101f, -1;
            shfl.sync.idx.b32 $7, $9, t5, 0x101f, -1;
            }
            """,
            "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r", [b, creg], dtype=(tl.float32, tl.float32), is_pure=True, pack=4)

    @triton.jit
    def _rne_bf16(v):
        """float32 -> the nearest-even bfloat16 value, still float32 (the interpreter's cast truncates)."""
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        r = tl.where(v != v, 0x7FC00000, r)
        return r.to(tl.float32, bitcast=True)

    @triton.jit
    def _round_to(v, DT: tl.constexpr, RNE_BY_HAND: tl.constexpr):
        """float32 v rounded to DT (kept as float32 when RNE_BY_HAND, else returned in DT)."""
        if DT == tl.float32:
            return v
        elif RNE_BY_HAND:
            if DT == tl.bfloat16:
                return _rne_bf16(v)
            else:
                return v.to(DT).to(tl.float32)
        else:
            return v.to(DT)

    @triton.jit
    def _block_scale(absmax_ptr, ncode_ptr, nabsmax_ptr, off, bidx, mask, NBS: tl.constexpr,
                     NESTED: tl.constexpr, MASKED: tl.constexpr):
        """The float32 scale of each absmax block `bidx`: absmax itself, or nested `code[q] * absmax2 + off`.

        Masked blocks get scale 0, so their weights are 0 whatever their bytes hold.
        """
        if MASKED:
            if NESTED:
                q = tl.load(absmax_ptr + bidx, mask=mask, other=0).to(tl.int32)
                s = tl.load(ncode_ptr + q) * tl.load(nabsmax_ptr + bidx // NBS, mask=mask, other=0.0) + off
            else:
                s = tl.load(absmax_ptr + bidx, mask=mask, other=0.0)
            s = tl.where(mask, s, 0.0)
        else:
            if NESTED:
                q = tl.load(absmax_ptr + bidx).to(tl.int32)
                s = tl.load(ncode_ptr + q) * tl.load(nabsmax_ptr + bidx // NBS) + off
            else:
                s = tl.load(absmax_ptr + bidx)
        return s

    @triton.jit
    def _nf4_matmul_kernel(
        x_ptr, data_ptr, absmax_ptr, code_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, bias_ptr, out_ptr,
        part_ptr, ticket_ptr, M, N, K, half_k, blocks_per_row, sxm, sxk,
        BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
        W_DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
        S: tl.constexpr, KS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, BF16_BITS: tl.constexpr,
    ):
        GW: tl.constexpr = 64 if BS >= 64 else BS  # weights sharing one scale within a slice
        GB: tl.constexpr = GW // 2                  # their bytes
        NG: tl.constexpr = KS // GW                 # scale groups a slice
        BK: tl.constexpr = S * KS                   # weights an iteration
        # w.dtype (nf4's dtype ids: 0 float32, 1 bfloat16, 2 float16: plain ints, JSON-recordable) and x's
        WD: tl.constexpr = tl.float32 if W_DT == 0 else (tl.bfloat16 if W_DT == 1 else tl.float16)
        XD: tl.constexpr = x_ptr.dtype.element_ty
        # Under the interpreter (a module constant, not an argument, so tests/sm90_compile.py's recorded
        # launches compile the GPU form): code[nibble] by a table load instead of the PTX shuffle,
        # round-to-nearest-even by hand (its float32 -> bfloat16 cast truncates), float32 dots.
        SHFL: tl.constexpr = not _INTERP
        RNE_BY_HAND: tl.constexpr = _INTERP
        IEEE: tl.constexpr = _INTERP or XD == tl.float32
        # the dot's input dtype: x's; float32 under the interpreter, whose bfloat16 is raw uint16 bits
        # that its matmul would multiply as integers (the values are x's dtype's either way)
        DD: tl.constexpr = tl.float32 if RNE_BY_HAND else XD
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        rows = tl.where(rmask, rows, 0).to(tl.int64)  # rows past N read row 0; their results are dropped
        mrow = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = mrow < M
        sp = tl.arange(0, S)
        g = tl.arange(0, NG)
        i = tl.arange(0, GB)
        kk = tl.arange(0, KS)
        row_byte = rows * half_k
        row_blk = rows * blocks_per_row
        x_row = x_ptr + mrow.to(tl.int64) * sxm
        off, creg = _nf4_constants(offset_ptr, code_ptr, NESTED, SHFL)
        if S == 1:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((S, BLOCK_N, BLOCK_M), dtype=tl.float32)
        n_it = tl.cdiv(K, BK)
        per_split = tl.cdiv(n_it, SPLIT)
        it_end = tl.minimum(pid_s * per_split + per_split, n_it)
        for it in range(pid_s * per_split, it_end):
            k0 = it * BK
            kg = k0 + sp[:, None] * KS + g[None, :] * GW  # (S, NG): first k of each scale group
            gmask = kg < K
            bidx = row_blk[None, :, None] + (kg // BS)[:, None, :]  # (S, BLOCK_N, NG)
            s = _block_scale(absmax_ptr, ncode_ptr, nabsmax_ptr, off, bidx, gmask[:, None, :], NBS, NESTED,
                             not EVEN_K)  # groups past K: weights 0 (x is 0 there too)
            byte = row_byte[None, :, None, None] + (kg // 2)[:, None, :, None] + i[None, None, None, :]
            if EVEN_K:
                b = tl.load(data_ptr + byte, eviction_policy="evict_first")
            else:
                b = tl.load(data_ptr + byte, mask=gmask[:, None, :, None], other=0, eviction_policy="evict_first")
            if SHFL:
                hi, lo = _lookup_shfl(b, creg)
            else:
                hi = tl.load(code_ptr + (b >> 4).to(tl.int32))
                lo = tl.load(code_ptr + (b & 15).to(tl.int32))
            sc = s[:, :, :, None]
            hi = _round_to(_round_to(hi * sc, WD, RNE_BY_HAND).to(tl.float32), XD, RNE_BY_HAND).to(DD)
            lo = _round_to(_round_to(lo * sc, WD, RNE_BY_HAND).to(tl.float32), XD, RNE_BY_HAND).to(DD)
            w = tl.reshape(tl.join(hi, lo), (S, BLOCK_N, KS))  # high nibble first: the earlier k
            xk = k0 + sp[:, None, None] * KS + kk[None, :, None]  # (S, KS, 1)
            xp = x_row[None, None, :] + xk * sxk
            if EVEN_K:
                xx = tl.load(xp, mask=mmask[None, None, :], other=0.0)
            else:
                xx = tl.load(xp, mask=mmask[None, None, :] & (xk < K), other=0.0)
            xx = xx.to(DD)
            if S == 1:
                if IEEE:
                    acc = tl.dot(tl.reshape(w, (BLOCK_N, KS)), tl.reshape(xx, (KS, BLOCK_M)), acc,
                                 input_precision="ieee")
                else:
                    acc = tl.dot(tl.reshape(w, (BLOCK_N, KS)), tl.reshape(xx, (KS, BLOCK_M)), acc)
            else:
                if IEEE:
                    acc = tl.dot(w, xx, acc, input_precision="ieee")
                else:
                    acc = tl.dot(w, xx, acc)
        if S == 1:
            y = acc
        else:
            y = tl.sum(acc, axis=0)  # (BLOCK_N, BLOCK_M)
        tile_mask = rmask[:, None] & mmask[None, :]
        offs = mrow.to(tl.int64)[None, :] * N + rows[:, None]
        if HAS_BIAS:  # rounded to x's dtype first, as F.linear's bias is
            bias = _round_to(tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32), XD, RNE_BY_HAND)
            bias = bias.to(tl.float32)[:, None]
        if SPLIT == 1:
            if HAS_BIAS:
                y += bias
            store_cast(out_ptr, offs, y, tile_mask, BF16_BITS)
        else:
            # Split K: every program stores its float32 partial; the last of a tile's SPLIT programs
            # (a ticket counter, reset by it) adds them in split order (deterministic) and writes out.
            mn = M * N
            tl.store(part_ptr + pid_s * mn + offs, y, mask=tile_mask)
            tl.debug_barrier()  # the CTA's partial stores come before its ticket
            tile = pid_n * tl.num_programs(1) + pid_m
            ticket = tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLIT - 1:
                y = tl.load(part_ptr + offs, mask=tile_mask, other=0.0, cache_modifier=".cg")
                for sidx in tl.static_range(1, SPLIT):
                    y += tl.load(part_ptr + sidx * mn + offs, mask=tile_mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    y += bias
                store_cast(out_ptr, offs, y, tile_mask, BF16_BITS)
                tl.atomic_xchg(ticket_ptr + tile, 0)  # ready for the next call


    @triton.jit
    def _nf4_constants(offset_ptr, code_ptr, NESTED: tl.constexpr, SHFL: tl.constexpr):
        """An NF4 kernel's per-program constants: the nested statistics' offset (0 without) and
        this lane's code value for the shuffle lookup (0 under the interpreter, which loads
        code[nibble] instead)."""
        if NESTED:
            off = tl.load(offset_ptr)
        else:
            off = 0.0
        if SHFL:
            creg = _lane_code(code_ptr)
        else:
            creg = 0.0
        return off, creg

    @triton.jit
    def _nibble_weights(b, s, code_ptr, creg, WD: tl.constexpr, XD: tl.constexpr, SHFL: tl.constexpr,
                        RNE_BY_HAND: tl.constexpr):
        """The float32 weights of packed bytes `b` (..., NG, GB) with block scales `s` (..., NG): the
        high nibbles' (the earlier k) and the low nibbles', each code[nibble] * scale rounded to
        w.dtype and then to x's dtype, as dequantize_nf4(w).to(x.dtype)."""
        if SHFL:
            hi, lo = _lookup_shfl(b, creg)
        else:
            hi = tl.load(code_ptr + (b >> 4).to(tl.int32))
            lo = tl.load(code_ptr + (b & 15).to(tl.int32))
        sc = s[:, :, None]
        hi = _round_to(_round_to(hi * sc, WD, RNE_BY_HAND).to(tl.float32), XD, RNE_BY_HAND).to(tl.float32)
        lo = _round_to(_round_to(lo * sc, WD, RNE_BY_HAND).to(tl.float32), XD, RNE_BY_HAND).to(tl.float32)
        return hi, lo

    @triton.jit
    def _store_rows(y, rows, mask, bias_ptr, lb_ptr, xa_ptr, rank, ls, out_ptr, HAS_BIAS: tl.constexpr,
                    LORA: tl.constexpr, R: tl.constexpr, XD: tl.constexpr, RNE_BY_HAND: tl.constexpr,
                    BF16_BITS: tl.constexpr):
        """A one-row kernel's epilogue for the float32 sums `y` of `rows` (written where `mask`): the
        bias rounded to x's dtype first, as F.linear's is; an adapter's round(base) + round(scaling *
        B (A x)) as the LoRA layer adds it; the store rounded once more."""
        if HAS_BIAS:
            y += _round_to(tl.load(bias_ptr + rows, mask=mask, other=0.0).to(tl.float32), XD, RNE_BY_HAND).to(tl.float32)
        if LORA:
            up = _lora_up(lb_ptr, rows, mask, xa_ptr, 0, rank, R, XD)
            y = _round_to(y, XD, RNE_BY_HAND).to(tl.float32) + _round_to(ls * up, XD, RNE_BY_HAND).to(tl.float32)
        store_cast(out_ptr, rows, y, mask, BF16_BITS)

    @triton.jit
    def _nf4_gemv_kernel(
        x_ptr, data_ptr, absmax_ptr, code_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, bias_ptr, out_ptr,
        N, K, half_k, blocks_per_row, xa_ptr, lb_ptr, rank, ls,
        BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, W_DT: tl.constexpr,
        LORA: tl.constexpr, R: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, BF16_BITS: tl.constexpr,
    ):
        """One row of x: BLOCK_N rows of W a program, all of K, float32 FMAs on the CUDA cores (module
        docstring, "One row"). LORA: an unmerged adapter's `ls * B (A x)` added in the epilogue, A x
        (`xa_ptr`, rank values) from `gemv._lora_down_kernel`, rounded as the LoRA layer rounds."""
        GW: tl.constexpr = 64 if BS >= 64 else BS
        GB: tl.constexpr = GW // 2
        NG: tl.constexpr = BLOCK_K // GW
        WD: tl.constexpr = tl.float32 if W_DT == 0 else (tl.bfloat16 if W_DT == 1 else tl.float16)
        XD: tl.constexpr = x_ptr.dtype.element_ty
        SHFL: tl.constexpr = not _INTERP
        RNE_BY_HAND: tl.constexpr = _INTERP
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        rows = tl.where(rmask, rows, 0).to(tl.int64)  # rows past N read row 0; their results are dropped
        g = tl.arange(0, NG)
        i = tl.arange(0, GB)
        kk = tl.arange(0, BLOCK_K)
        row_byte = rows * half_k
        row_blk = rows * blocks_per_row
        off, creg = _nf4_constants(offset_ptr, code_ptr, NESTED, SHFL)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kg = k0 + g * GW  # (NG,): first k of each scale group
            bidx = row_blk[:, None] + (kg // BS)[None, :]  # (BLOCK_N, NG)
            byte = row_byte[:, None, None] + (kg // 2)[None, :, None] + i[None, None, :]
            gm = (kg < K)[None, :]
            s = _block_scale(absmax_ptr, ncode_ptr, nabsmax_ptr, off, bidx, gm, NBS, NESTED,
                             not EVEN_K)  # groups past K: weights 0 (x is 0 there too)
            if EVEN_K:
                b = tl.load(data_ptr + byte, eviction_policy="evict_first")
                xx = tl.load(x_ptr + k0 + kk)
            else:
                b = tl.load(data_ptr + byte, mask=gm[:, :, None], other=0, eviction_policy="evict_first")
                xx = tl.load(x_ptr + k0 + kk, mask=(k0 + kk) < K, other=0.0)
            hi, lo = _nibble_weights(b, s, code_ptr, creg, WD, XD, SHFL, RNE_BY_HAND)
            w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))  # high nibble first: the earlier k
            # an explicit FMA: the launch turns contraction off (the nested scale rounds twice)
            acc = tl.fma(w, xx.to(tl.float32)[None, :], acc)
        _store_rows(tl.sum(acc, axis=1), rows, rmask, bias_ptr, lb_ptr, xa_ptr, rank, ls, out_ptr, HAS_BIAS, LORA, R, XD,
                    RNE_BY_HAND, BF16_BITS)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: an H200's count, so CPU runs take the tiles a GPU would
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _block_m(m: int, dtype: torch.dtype) -> int:
    """x rows a program takes: 16 (the MMA's smallest side) up to 32 (64 spills registers); float32
    x (float32 FMAs, not the tensor cores) always 16."""
    return BLOCK_M if dtype == torch.float32 else min(32, max(BLOCK_M, triton.next_power_of_2(m)))


def _config(m: int, n: int, k: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tiles, warps and K split for an (m, k) x (n, k)^T problem in x dtype `dtype` (the rules: module
    docstring). `CONFIG_OVERRIDE` (a dict of some of the keys) replaces them: the bench sweep's hook."""
    sms = _sm_count(device)
    # float32 x: half-width slices (its FMA dot holds a (BLOCK_N, KS, BLOCK_M) product: KS = 256 spills)
    cfg = dict(BLOCK_N=64, S=1, KS=_KS // 2 if dtype == torch.float32 else _KS, num_warps=4, num_stages=3)
    tiles = triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(m, _block_m(m, dtype))
    iters = triton.cdiv(k, cfg["S"] * cfg["KS"])
    # Split K to fill one wave of 2 programs an SM (the default tile's occupancy: 76 KB of shared
    # memory each) but not past it (a partial second wave would cost a whole one), each split keeping
    # >= 2 iterations of work.
    cfg["SPLIT"] = max(1, min(2 * sms // tiles, iters // 2, 16))
    if CONFIG_OVERRIDE:
        cfg.update(CONFIG_OVERRIDE)
    return cfg


CONFIG_OVERRIDE: dict | None = None  # e.g. dict(BLOCK_N=16, S=4, num_warps=4, SPLIT=1)

def _kernel_ok(x: torch.Tensor, meta: list[int]) -> bool:
    """Whether the Triton kernel takes this call (else the dequantise + F.linear path)."""
    if not use_triton(x) or x.dtype not in _FLOATS or len(meta) != 5:
        return False
    m = x.numel() // max(1, x.shape[-1])
    return meta[4] % meta[0] == 0 and 0 < m <= MAX_ROWS


def _gemv_config(n: int, k: int) -> dict:
    """The one-row kernel's tiles, from the H100 sweep (`bench/ops.py --nf4-gemv-sweep`, seventeenth
    session; each shape within 5% of its best of 15 tile choices, the earlier rules up to 22% off):
    4 rows a program and 1024 weights of K an iteration (512 packed bytes a row), 2048 where K is
    long (fewer loop trips) or N small (2 rows a program then, so the grid still fills 132 SMs
    twice), 4 warps. `GEMV_CONFIG_OVERRIDE` replaces them (the sweep's hook)."""
    small_n = n < 1024
    bn = 2 if small_n else 4
    bk = 2048 if (small_n or k > 4096) else 1024
    bk = max(256, min(bk, triton.next_power_of_2(k)))
    cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=1)
    if GEMV_CONFIG_OVERRIDE:
        cfg.update(GEMV_CONFIG_OVERRIDE)
    return cfg


GEMV_CONFIG_OVERRIDE: dict | None = None  # e.g. dict(BLOCK_N=2, BLOCK_K=2048, num_warps=8)


def _launch_gemv(x2: torch.Tensor, data, absmax, code, nabsmax, ncode, offset, meta: list[int], nested: bool,
                 bias: torch.Tensor | None, out: torch.Tensor, lora: LoraSpec | None = None) -> None:
    n, k = meta[3], meta[4]
    cfg = _gemv_config(n, k)
    # A x first (one small launch), as the 16-bit GEMVs do
    low = _low_rank_inputs(x2.view(k), None if lora is None else [lora], x2, 0.0, 0.0, False)
    ranks, lbs, scales, xa = low if low is not None else ([0], [x2], [0.0], x2)
    _nf4_gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x2, data, absmax, code, nabsmax, ncode, offset, bias if bias is not None else code, out_arg(out),
        n, k, k // 2, k // meta[0], xa, lbs[0], ranks[0], scales[0],
        BS=meta[0], NBS=meta[1] or 1, NESTED=nested, HAS_BIAS=bias is not None, W_DT=meta[2],
        LORA=low is not None, R=triton.next_power_of_2(max(1, ranks[0])),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], EVEN_K=k % cfg["BLOCK_K"] == 0, BF16_BITS=bf16_bits(out),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        enable_fp_fusion=False,  # nested `code * absmax + offset` rounds twice, as bitsandbytes does
    )


def _launch(x: torch.Tensor, ts: list[torch.Tensor], meta: list[int], bias: torch.Tensor | None,
            lora: LoraSpec | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) by one of the kernels; `lora` (A, B, scaling) is added in the one-row kernel's
    epilogue, after the tensor-core kernel as the LoRA layer adds it."""
    blocksize, nested_bs = meta[0], meta[1]
    n, k = meta[3], meta[4]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    nested = len(ts) == 6
    c = lambda t: t if t.is_contiguous() else t.contiguous()  # noqa: E731
    data, absmax, code = c(ts[0]), c(ts[1]), c(ts[2])
    nabsmax, ncode, offset = (c(t) for t in ts[3:]) if nested else (code, code, code)
    if m <= GEMV_ROWS:
        _launch_gemv(c(x2), data, absmax, code, nabsmax, ncode, offset, meta, nested, bias, out, lora)
        return out.view(*x.shape[:-1], n)
    cfg = _config(m, n, k, x.device, x.dtype)
    bm = _block_m(m, x.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, bm), cfg["SPLIT"])
    tickets = ticket_counters(x.device, grid[0] * grid[1]) if cfg["SPLIT"] > 1 else None
    if cfg["SPLIT"] > 1 and tickets is None:
        cfg["SPLIT"], grid = 1, grid[:2] + (1,)
    part = torch.empty((cfg["SPLIT"], m, n), dtype=torch.float32, device=x.device) if cfg["SPLIT"] > 1 else out
    _nf4_matmul_kernel[grid](
        x2, data, absmax, code, nabsmax, ncode, offset, bias if bias is not None else code, out_arg(out),
        part, tickets if tickets is not None else code, m, n, k, k // 2, k // blocksize, x2.stride(0), x2.stride(1),
        BS=blocksize, NBS=nested_bs or 1, NESTED=nested, HAS_BIAS=bias is not None,
        W_DT=meta[2], BLOCK_N=cfg["BLOCK_N"], BLOCK_M=bm,
        S=cfg["S"], KS=cfg["KS"], SPLIT=cfg["SPLIT"], EVEN_K=k % (cfg["S"] * cfg["KS"]) == 0, BF16_BITS=bf16_bits(out),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        enable_fp_fusion=False,  # nested `code * absmax + offset` rounds twice, as bitsandbytes does
    )
    out = out.view(*x.shape[:-1], n)
    return out if lora is None else _with_lora(x, out, *lora)


# ---- the op: forward, backward (dx = grad @ W), registration ----------------------------------


def _nf4_matmul_impl(x: torch.Tensor, w: list[torch.Tensor], meta: list[int], bias: torch.Tensor | None,
                     la: torch.Tensor | None, lb: torch.Tensor | None, ls: float) -> torch.Tensor:
    lora = None if la is None else (la, lb, ls)
    if _kernel_ok(x, meta):
        return _launch(x, w, meta, bias, lora)
    if not use_triton(x):
        out = ref.nf4_matmul(x, unpack_nf4(w, meta), bias)
    else:  # CUDA, but a shape the kernel does not take: the dequant kernel + cuBLAS
        out = F.linear(x, base_weight(w, meta, x.dtype), None if bias is None else bias.to(x.dtype))
    return out if lora is None else _with_lora(x, out, *lora)


def _nf4_matmul_fake(x, w, meta, bias, la, lb, ls):
    return x.new_empty((*x.shape[:-1], meta[3]))


def _nf4_matmul_bwd_impl(grad: torch.Tensor, w: list[torch.Tensor], meta: list[int], x_dtype_id: int) -> torch.Tensor:
    """dx = grad @ W, W dequantised to x's dtype (fresh, never saved)."""
    dt = _DTYPES[x_dtype_id] if x_dtype_id < len(_DTYPES) else torch.float64
    g = grad.to(dt)
    return (g.reshape(-1, g.shape[-1]) @ base_weight(w, meta, dt)).view(*g.shape[:-1], meta[4])


def _nf4_matmul_bwd_fake(grad, w, meta, x_dtype_id):
    dt = _DTYPES[x_dtype_id] if x_dtype_id < len(_DTYPES) else torch.float64
    return grad.new_empty((*grad.shape[:-1], meta[4]), dtype=dt)


_nf4_matmul_bwd_op = Op("nf4_matmul_backward", _nf4_matmul_bwd_impl, _nf4_matmul_bwd_fake)

_X_DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def _nf4_matmul_setup(ctx, inputs, output):
    x, w, meta, bias, la, lb, ls = inputs
    # the packed weight, never a dense copy; x only for an adapter's gradients
    ctx.save_for_backward(x if la is not None else None, la, lb, *w)
    ctx.meta, ctx.x_dtype_id, ctx.n_w = meta, _X_DTYPE_IDS[x.dtype], len(w)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.ls, ctx.n_lora = ls, 1  # (_lora_backward's index of B: A's + n_lora)


def _nf4_matmul_backward(ctx, grad):
    x, la, lb, *w = ctx.saved_tensors
    dx = _nf4_matmul_bwd_op(grad, w, ctx.meta, ctx.x_dtype_id) if ctx.needs_input_grad[0] else None
    dla = dlb = None
    if la is not None:
        dl, dla, dlb = _lora_backward(ctx, grad, x.reshape(-1, x.shape[-1]), la, lb, ctx.ls, 4)
        if dx is not None:
            dx = (dx.to(dl.dtype) + dl.view(dx.shape)).to(dx.dtype)
    db = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        db = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, [None] * ctx.n_w, None, db, dla, dlb, None


_nf4_matmul_op = Op("nf4_matmul", _nf4_matmul_impl, _nf4_matmul_fake, _nf4_matmul_setup, _nf4_matmul_backward)


def nf4_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, *,
               low_rank: LoraSpec | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for an NF4 weight W of shape (N, K): x (..., K) -> (..., N) in x's dtype.

    Equals `x @ dequantize_nf4(w).to(x.dtype).T (+ bias)` up to float32 accumulation order, reading the
    packed weight once (a decoding kernel: for many rows of x, dequantise + F.linear is faster and is
    what the op does past MAX_ROWS rows). `low_rank` = (A, B, scaling): an unmerged LoRA adapter, added
    as the LoRA layer adds it (`+ scaling * B (A x)`, A and B cast to x's dtype, each step rounded); for
    one row of x inside the GEMV's epilogue (a QLoRA model decoding right after training: two launches
    a projection instead of ~6). Gradients flow to x (grad @ W, W dequantised again), bias, A and B;
    W is frozen."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (*_FLOATS, torch.float64) or x.dim() < 1:
        raise InputError(f"x: expected a floating-point tensor with at least 1 dim, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(w, NF4Weight):
        raise InputError(f"w: expected NF4Weight, got {type(w).__name__}")
    w.validate("w")
    if len(w.shape) != 2:
        raise InputError(f"w.shape: must be (out_features, in_features), got {tuple(w.shape)}")
    n, k = int(w.shape[0]), int(w.shape[1])
    if x.shape[-1] != k:
        raise InputError(f"x: last dim {x.shape[-1]} != w's in_features {k}")
    if w.device != x.device:
        raise InputError(f"w: is on {w.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,) or bias.device != x.device \
                or not bias.is_floating_point():
            raise InputError(f"bias: expected a float tensor of shape ({n},) on {x.device}, got "
                             f"{getattr(bias, 'shape', bias)!r}")
    lora = _check_lora(x, [w], None if low_rank is None else [low_rank], "nf4_matmul")
    la, lb, ls = lora[0] if lora is not None else (None, None, 0.0)
    ts, meta = pack_base(w)
    return _nf4_matmul_op(x, ts, meta, bias, la, lb, float(ls))


def bytes_read(w: NF4Weight) -> int:
    """Bytes of the packed weight and its statistics: what one call must read (the bench's GB/s)."""
    ts, _ = pack_base(w)
    return sum(t.numel() * t.element_size() for t in ts)
