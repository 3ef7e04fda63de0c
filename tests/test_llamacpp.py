"""Exported GGUFs run in llama.cpp (through llama-cpp-python): logits, greedy decoding, the
tokenizer and the Gemma 3 vision projector agree with minift's. Opt-in: `pytest -m llamacpp`.

Installing llama-cpp-python (PyPI ships it as source only; pip builds llama.cpp with cmake + a C++
compiler, several minutes on 2 cores, and keeps the wheel in its cache, ~/.cache/pip/wheels, so a
second install of the same version reuses it):

    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF" \\
        pip install "llama-cpp-python==0.3.36" diskcache

(or `pip wheel --no-deps -w wheels/ llama-cpp-python==0.3.36` once, then `pip install wheels/*.whl`).
The mtmd library (multimodal projectors) is built with it.

References. f32 files are compared with minift's float32 model; f16 / q8_0 files with minift run on
the very weights the file holds (its 2-D weights rounded to f16, or quantised to Q8_0 and back),
so what is measured is llama.cpp computing the same function. llama.cpp's CPU GELU goes through an
f16 lookup table, so Gemma 2/3 (whose post-FFN norms rescale the MLP output) agree to ~3e-4, not
1e-7 as Llama does. The KV cache is f32 (llama.cpp's default f16 cache alone costs ~1e-3). q8_0
also quantises the activations of each matmul to 8 bits in llama.cpp, hence its looser bound.
"""

from __future__ import annotations

import ctypes
import math
import os

import gguf
import numpy as np
import pytest
import torch

import minift
from minift.export.gguf import quantize, save_gguf
from minift.lora.layers import LoraLinear
from minift.testing import write_tiny_checkpoint, write_tiny_gemma3_vision

pytestmark = [pytest.mark.llamacpp,
              pytest.mark.filterwarnings("ignore:save_gguf. llama.cpp's llama architecture has no sliding-window")]

Q = gguf.GGMLQuantizationType
FAMILIES = ["llama", "mistral", "gemma", "gemma2", "gemma3_text"]
PROMPT = "The quick brown fox jumps over the lazy dog. What is the capital of France?"
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello  world\n\n  x  ", "café ünïcode 日本語 🙂 tabs\tand\r\nCRLF", "   leading spaces", "trailing   ",
    "I've been 'told he's there, 'RE you sure? 3.14 333333 ------======= !!!???",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "\n", "",
]
TOL = {"f32": 1e-3, "f16": 1e-3, "q8_0": 3e-2}


@pytest.fixture(scope="module")
def llama_cpp():
    import llama_cpp  # opt-in tests: a missing llama-cpp-python fails here, loudly (see the docstring)

    return llama_cpp


def open_gguf(llama_cpp, path, n_ctx=256):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False,
                           type_k=0, type_v=0, flash_attn=False)  # GGML_TYPE_F32 KV cache


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def ref_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_greedy_agrees(model, llm, ids: list[int], tol: float, n: int = 16) -> None:
    """16 greedy tokens equal; a divergence is only accepted at a near-tie of minift's logits
    (closer than the logits' error bound), after which the continuations legitimately differ."""
    got = cpp_greedy(llm, ids, n)
    seq = list(ids)
    for step in range(n):
        logits = ref_logits(model, seq)[-1]
        want = int(np.argmax(logits))
        if got[step] != want:
            margin = logits[want] - logits[got[step]]
            assert margin <= 4 * tol * np.abs(logits).max(), (step, want, got[step], margin)
            return
        seq.append(want)


def with_weights(path, fn, **load_kw):
    """A fresh minift model of `path` whose 2-D weights are replaced by fn(weight)."""
    model, _ = minift.load(path, **load_kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(fn(p.detach().float()).to(p.dtype))
    return model.eval()


def as_f16(w: torch.Tensor) -> torch.Tensor:
    return w.half().float()


def as_q8_0(w: torch.Tensor) -> torch.Tensor:
    a = w.numpy().astype(np.float32)
    return torch.from_numpy(gguf.quants.dequantize(quantize(a, Q.Q8_0), Q.Q8_0).reshape(a.shape))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory, llama_cpp):
    fam = request.param
    # llama.cpp runs Mistral as llama, which has no sliding window: a Mistral without one (v0.2+)
    kw = {"sliding_window": None} if fam == "mistral" else {}
    path = write_tiny_checkpoint(tmp_path_factory.mktemp(fam) / "ckpt", fam, **kw)
    model, tok = minift.load(path)
    files = dict(zip(("f32", "f16", "q8_0"), save_gguf(model, path / "m.gguf", ["f32", "f16", "q8_0"])))
    return fam, path, model.eval(), tok, files


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_logits_and_greedy_tokens_agree(tiny, llama_cpp, quant):
    fam, path, model, tok, files = tiny
    ref = {"f32": model, "f16": with_weights(path, as_f16), "q8_0": with_weights(path, as_q8_0)}[quant]
    ids = tok(PROMPT)["input_ids"]
    assert len(ids) > 16  # past every tiny sliding window (5)
    llm = open_gguf(llama_cpp, files[quant])
    try:
        assert rel(cpp_logits(llm, ids), ref_logits(ref, ids)) < TOL[quant]
        if quant == "f16":  # and the f16 file against minift's own float32 weights
            assert rel(cpp_logits(llm, ids), ref_logits(model, ids)) < 4e-3
        assert_greedy_agrees(ref, llm, ids, TOL[quant])
    finally:
        llm.close()


def test_tokenizer_gives_the_hf_ids(tiny, llama_cpp):
    _, _, _, tok, files = tiny
    llm = llama_cpp.Llama(model_path=str(files["q8_0"]), vocab_only=True, verbose=False)
    try:
        for text in SAMPLES:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
            # add_bos=True adds what the HF tokenizer adds (nothing, for the tiny BPE)
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
            assert llm.detokenize(ids, special=True).decode() == text
        assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id
    finally:
        llm.close()


def test_lora_merged_export_runs_as_the_adapted_model(tmp_path, llama_cpp):
    path = write_tiny_checkpoint(tmp_path / "ck", "llama")
    model, tok = minift.load(path)
    minift.add_lora(model, r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, LoraLinear):
                mod.lora_B.weight.normal_(0, 0.05)
    model.eval()
    ids = tok(PROMPT)["input_ids"]
    with minift.lora.disable_adapters(model):
        base = ref_logits(model, ids)
    adapted = ref_logits(model, ids)
    assert rel(adapted, base) > 1e-2  # the adapters matter
    llm = open_gguf(llama_cpp, save_gguf(model, tmp_path / "m.gguf", "f32"))
    try:
        assert rel(cpp_logits(llm, ids), adapted) < 1e-5
    finally:
        llm.close()


def test_nf4_base_export_runs_as_the_4bit_model(tmp_path, llama_cpp):
    path = write_tiny_checkpoint(tmp_path / "ck", "gemma2")
    model, tok = minift.load(path, load_in_4bit=True)
    ids = tok(PROMPT)["input_ids"]
    with pytest.warns(UserWarning, match="NF4"):
        out = save_gguf(model, tmp_path / "m.gguf", "f32")
    llm = open_gguf(llama_cpp, out)
    try:
        assert rel(cpp_logits(llm, ids), ref_logits(model.eval(), ids)) < 1e-3
    finally:
        llm.close()


@pytest.mark.parametrize("case", ["llama3-rope", "gemma3-linear-rope", "gemma2-qpas", "gemma3-qpas", "llama-tied",
                                  "gemma2-no-softcap", "gemma3-softcap", "llama-bias"])
def test_conversions_that_change_the_function(tmp_path, llama_cpp, case):
    kw = {
        "llama3-rope": ("llama", {"rope_parameters": {
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
        "gemma3-linear-rope": ("gemma3_text", {"rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            "layer_types": ["sliding_attention", "full_attention"]}),
        "gemma2-qpas": ("gemma2", {"query_pre_attn_scalar": 64}),  # head_dim 16: llama.cpp's scale differs
        "gemma3-qpas": ("gemma3_text", {"query_pre_attn_scalar": 64}),
        "llama-tied": ("llama", {"tie_word_embeddings": True}),
        # llama.cpp always soft-caps Gemma 2: None is written as a cap too large to matter
        "gemma2-no-softcap": ("gemma2", {"attn_logit_softcapping": None, "final_logit_softcapping": None}),
        "gemma3-softcap": ("gemma3_text", {"final_logit_softcapping": 1.0}),
        "llama-bias": ("llama", {"attention_bias": True}),  # permuted q/k biases
    }[case]
    path = write_tiny_checkpoint(tmp_path / "ck", kw[0], **kw[1])
    model, tok = minift.load(path)
    with torch.no_grad():  # transformers initialises biases to 0: make them matter
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.5)
    ids = tok(PROMPT)["input_ids"]
    llm = open_gguf(llama_cpp, save_gguf(model, tmp_path / "m.gguf", "f32"))
    try:
        assert rel(cpp_logits(llm, ids), ref_logits(model.eval(), ids)) < 1e-3
    finally:
        llm.close()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "ck", "llama", hidden_size=256,
                                 intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                 num_hidden_layers=3)
    model, tok = minift.load(path)
    return path, model.eval(), tok


@pytest.mark.parametrize("quant", ["q4_0", "q5_1", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k"])
def test_k_quant_files_run(wide, tmp_path, llama_cpp, quant):
    """Each tensor's type is read from the file; minift on those dequantised weights is the reference
    (llama.cpp also quantises each matmul's activations, to Q8_0 / Q8_K: ~1.5e-2 here)."""
    path, model, tok = wide
    out = save_gguf(model, tmp_path / "m.gguf", quant)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert Q.Q6_K in types.values() and (quant in ("q4_0", "q5_1") or Q[quant[:2].upper() + "_K"] in types.values())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)

    def dequantised(name: str, w: torch.Tensor) -> torch.Tensor:
        qt = types[names.get_name(name, try_suffixes=(".weight",))]
        a = w.numpy()
        return torch.from_numpy(gguf.quants.dequantize(quantize(a, qt), qt).reshape(a.shape))

    ref, _ = minift.load(path)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.ndim >= 2:
                p.copy_(dequantised(n, p.detach().float()))
    ids = tok(PROMPT)["input_ids"]
    llm = open_gguf(llama_cpp, out)
    try:
        assert rel(cpp_logits(llm, ids), ref_logits(ref.eval(), ids)) < 3e-2
    finally:
        llm.close()


def test_quantisers_are_ggml_bit_for_bit(llama_cpp):
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((48, 768)) * rng.uniform(1e-3, 4, (48, 1))).astype(np.float32)
    x[5] = 0.0
    x[7, :300] = rng.standard_normal(300).astype(np.float32) * 1e-6
    for qt in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        mine = quantize(x, qt)
        ref = np.zeros_like(mine)
        lib.ggml_quantize_init(int(qt))
        assert lib.ggml_quantize_chunk(int(qt), x.ctypes.data, ref.ctypes.data, 0, x.shape[0], x.shape[1], None) \
            == ref.nbytes
        assert np.array_equal(mine, ref), (qt.name, float((mine != ref).mean()))


def test_gemma3_vision_language_model_and_projector(tmp_path, llama_cpp):
    import llama_cpp.mtmd_cpp as M
    from PIL import Image

    path = write_tiny_gemma3_vision(tmp_path / "ck")  # layers: sliding (window 8), full
    model, processor = minift.load(path)
    model.eval()
    lang, mmproj = save_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=processor)
    tok = processor.tokenizer
    ids = tok(PROMPT)["input_ids"]
    llm = open_gguf(llama_cpp, lang)
    ctx = None
    try:
        assert rel(cpp_logits(llm, ids), ref_logits(model, ids)) < 1e-3
        assert_greedy_agrees(model, llm, ids, 1e-3)
        params = M.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, 2, False, False
        ctx = M.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
        assert ctx and M.mtmd_support_vision(ctx)
        img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        bmp = M.mtmd_bitmap_init(64, 64, img.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        marker = M.mtmd_default_marker()
        text = M.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        chunks = M.mtmd_input_chunks_init()
        assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (M.mtmd_bitmap_p_ctypes * 1)(bmp), 1) == 0
        emb = None
        for i in range(M.mtmd_input_chunks_size(chunks)):
            ch = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(ch) == 1:  # an image chunk
                n = M.mtmd_input_chunk_get_n_tokens(ch)
                assert n == 16 and M.mtmd_encode_chunk(ctx, ch) == 0
                emb = np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n * 64,)).reshape(n, 64).copy()
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bmp)
        assert emb is not None
        pixels = processor(images=Image.fromarray(img), text="<start_of_image>", return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            want = model.image_features(pixels.float())[0].numpy()
        assert rel(emb, want) < 2e-3  # the projection matrix is f16 in every mmproj (as llama.cpp writes it)
    finally:
        if ctx:
            M.mtmd_free(ctx)
        llm.close()


def test_metadata_llama_cpp_reads(tiny, llama_cpp):
    fam, _, model, tok, files = tiny
    llm = llama_cpp.Llama(model_path=str(files["f16"]), vocab_only=True, verbose=False)
    try:
        md = llm.metadata
        arch = md["general.architecture"]
        assert arch == {"llama": "llama", "mistral": "llama"}.get(fam, fam.replace("_text", ""))
        assert int(md[f"{arch}.block_count"]) == 2 and llm.n_vocab() == len(tok)
        assert md["tokenizer.chat_template"] == tok.chat_template
    finally:
        llm.close()
    assert math.isfinite(float(md[f"{arch}.attention.layer_norm_rms_epsilon"]))


@pytest.mark.parametrize("family,prefix", [("llama", True), ("gemma", False)])
def test_sentencepiece_tokenizer_gives_sentencepieces_ids(tmp_path, llama_cpp, family, prefix):
    from test_gguf import spm_checkpoint

    path, tok = spm_checkpoint(tmp_path, family, dummy_prefix=prefix)
    model, _ = minift.load(path)
    out = save_gguf(model, tmp_path / "m.gguf", "f16", tokenizer=tok)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        for text in SAMPLES:
            if "<" in text:
                continue
            want = tok.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text
        if not prefix:  # added tokens are split out as HF does; (where a dummy prefix goes after one differs
            # between SentencePiece and HF's legacy mode, so only Gemma's kind is compared)
            text = "<start_of_turn>user\nHi there<end_of_turn>\n"
            want = [4] + tok.sp.encode("user\nHi there") + [5] + tok.sp.encode("\n")
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want
    finally:
        llm.close()


def test_padded_vocabulary_runs(tmp_path, llama_cpp):
    from minift.testing import tiny_hf_model, tiny_tokenizer

    path = tmp_path / "ck"
    tiny_hf_model("gemma3_text", vocab_size=300).save_pretrained(path)  # Gemma 3 pads its embedding too
    tiny_tokenizer(template="gemma").save_pretrained(path)
    model, tok = minift.load(path)
    llm = open_gguf(llama_cpp, save_gguf(model, tmp_path / "m.gguf", "f32"))
    try:
        assert llm.n_vocab() == 300
        ids = tok(PROMPT)["input_ids"]
        assert rel(cpp_logits(llm, ids), ref_logits(model.eval(), ids)) < 1e-3
    finally:
        llm.close()


def test_llama3_shaped_tokenizer_gives_the_hf_ids(tmp_path, llama_cpp):
    from test_gguf import llama3_checkpoint

    model, tok = minift.load(llama3_checkpoint(tmp_path / "ck"))
    llm = llama_cpp.Llama(model_path=str(save_gguf(model, tmp_path / "m.gguf", "f16")), vocab_only=True, verbose=False)
    try:
        for text in SAMPLES + ["The capital of France is Paris. 12345678 ok", "What's up?\n\n\nNo!"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tok(text, add_special_tokens=False)["input_ids"], text
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
    finally:
        llm.close()
