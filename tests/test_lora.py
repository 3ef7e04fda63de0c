"""minift's LoRA against PEFT (the reference, test-only) on tiny checkpoints: forward and gradient
parity (LoRA, rsLoRA, DoRA, PiSSA, modules_to_save), trainable counts, adapter files both ways,
merged checkpoints read by transformers (16-bit, sharded, 4-bit), and the error paths."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import transformers

import minift
from minift.errors import AdapterError
from minift.lora import LoraLinear, hf_path
from minift.testing import write_tiny_checkpoint, write_tiny_gemma3_vision

warnings.filterwarnings("ignore", module="peft")

TOL = 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny checkpoints, built once: llama (untied head), gemma3_text (tied), gemma3 vision."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {
        "llama": write_tiny_checkpoint(root / "llama", "llama", tie_word_embeddings=False),
        "gemma3_text": write_tiny_checkpoint(root / "gemma3", "gemma3_text"),
    }
    out["gemma3"] = write_tiny_gemma3_vision(root / "gemma3_vision")
    return out


def hf_model(path):
    cfg = json.loads((path / "config.json").read_text())
    cls = transformers.AutoModelForImageTextToText if cfg["model_type"] == "gemma3" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def peft_model(path, *, targets="all-linear", r=4, alpha=8, rslora=False, dora=False, mts=None, init=True, tie=False):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, use_dora=dora,
                          modules_to_save=mts, init_lora_weights=init, task_type="CAUSAL_LM", ensure_weight_tying=tie)
    return peft.get_peft_model(hf_model(path), cfg).eval()


def peft_name(model, name: str) -> str:
    """minift parameter name → PEFT's in-memory name."""
    for part, suffix in ((".lora_A.weight", ".lora_A.default.weight"), (".lora_B.weight", ".lora_B.default.weight"),
                         (".lora_magnitude_vector", ".lora_magnitude_vector.default.weight"),
                         (".modules_to_save.", ".modules_to_save.default.")):
        if part in name:
            path, rest = name.split(part)
            return f"base_model.model.{hf_path(model, path)}{suffix}{rest}"
    raise KeyError(name)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def sync(model, pm, seed=0):
    """A from PEFT, random B (and perturbed magnitudes) from here; then all of minift's adapters into PEFT."""
    g = torch.Generator().manual_seed(seed)
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for n, p in trainable(model).items():
            t = theirs[peft_name(model, n)]
            assert t.shape == p.shape, n
            if ".lora_A." in n:
                p.copy_(t)
            elif ".lora_B." in n:
                p.normal_(0, 0.1, generator=g)
            elif "magnitude" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
            t.copy_(p)


def inputs(model, seed=0, batch=2, seq=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (batch, seq), generator=g)
    kw = {}
    cfg = model.config
    if getattr(cfg, "model_type", None) == "gemma3":  # one image per row: 16 image tokens
        img = torch.full((batch, cfg.mm_tokens_per_image), cfg.image_token_index)
        ids = torch.cat([ids[:, :2], img, ids[:, 2:]], 1)
        kw = dict(pixel_values=torch.randn(batch, 3, 64, 64, generator=g), token_type_ids=(ids == cfg.image_token_index).long())
    return ids, kw


def logits(model, ids, kw):
    return model(ids, **kw).logits if not kw else model(ids, pixel_values=kw["pixel_values"],
                                                          token_type_ids=kw["token_type_ids"]).logits


def ref_logits(pm, ids, kw):
    return pm(input_ids=ids, **kw).logits


def check_parity(model, pm, *, embed_grad=True):
    """Logits, every adapter gradient and (text) the input-embedding gradient equal PEFT's."""
    ids, kw = inputs(model)
    out, ref = logits(model, ids, kw), ref_logits(pm, ids, kw)
    assert rel(out, ref) <= TOL
    (out.float() ** 2).mean().backward()
    (ref ** 2).mean().backward()
    theirs = dict(pm.named_parameters())
    mine = trainable(model)
    assert mine and all(p.grad is not None for p in mine.values())
    g1 = torch.cat([p.grad.flatten() for p in mine.values()])
    g2 = torch.cat([theirs[peft_name(model, n)].grad.flatten() for n in mine])
    assert rel(g1, g2) <= TOL
    if embed_grad and not kw:
        e1 = model.model.embed(ids).detach().requires_grad_(True)
        e2 = e1.detach().clone().requires_grad_(True)
        (model.compute_logits(model.model(None, inputs_embeds=e1)) ** 2).mean().backward()
        (pm(inputs_embeds=e2).logits ** 2).mean().backward()
        assert rel(e1.grad, e2.grad) <= TOL


# ---- parity with PEFT ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_forward_and_grads_match_peft(ckpts, family, variant):
    kw = dict(rslora=variant == "rslora", dora=variant == "dora")
    model, _ = minift.load(ckpts[family])
    minift.add_lora(model, r=4, alpha=8, **kw)
    pm = peft_model(ckpts[family], **kw)
    sync(model, pm)
    check_parity(model, pm)


def test_modules_to_save_grads_match_peft(ckpts):
    model, _ = minift.load(ckpts["llama"])
    minift.add_lora(model, r=4, alpha=8, targets=["q_proj", "down_proj"], modules_to_save=["lm_head", "embed_tokens"])
    pm = peft_model(ckpts["llama"], targets=["q_proj", "down_proj"], mts=["lm_head", "embed_tokens"])
    sync(model, pm)
    check_parity(model, pm, embed_grad=False)


def test_tied_head_modules_to_save_match_peft_weight_tying(ckpts):
    """Gemma 3 ties lm_head to the embedding: one shared trainable copy, as PEFT's ensure_weight_tying."""
    model, _ = minift.load(ckpts["gemma3_text"])
    minift.add_lora(model, r=4, alpha=8, dora=True, modules_to_save=["lm_head"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    pm = peft_model(ckpts["gemma3_text"], dora=True, mts=["lm_head"], tie=True)
    assert sum(p.numel() for p in trainable(model).values()) == pm.get_nb_trainable_parameters()[0]
    with torch.no_grad():
        for n, p in trainable(model).items():
            if "lora_B" in n:
                p.normal_(0, 0.1)
            if "modules_to_save" in n:
                p.add_(0.01 * torch.randn_like(p))
        theirs = dict(pm.named_parameters())
        for n, p in trainable(model).items():
            if "modules_to_save" in n:  # PEFT keeps the shared copy under the embedding's name
                n = n.replace("lm_head", "model.embed_tokens")
            theirs[peft_name(model, n)].copy_(p)
    ids, _ = inputs(model)
    assert rel(model(ids).logits, pm(input_ids=ids).logits) <= TOL


VISION_SELECTIONS = [
    (dict(), r".*\.(?:self_attn|mlp)\.(?:q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2)"),
    (dict(vision=False), r"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj"),
    (dict(language=False, mlp=False), r"model\.vision_tower\.encoder\.layers\.\d+\.self_attn\.\w+"),
]


@pytest.mark.parametrize("sel,regex", VISION_SELECTIONS, ids=["all", "language", "vision-attn"])
def test_gemma3_vision_selections_match_peft(ckpts, tmp_path, sel, regex):
    model, _ = minift.load(ckpts["gemma3"])
    minift.add_lora(model, r=4, alpha=8, dora=sel == {}, **sel)
    pm = peft_model(ckpts["gemma3"], targets=regex, dora=sel == {})
    mine = {hf_path(model, n) for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert mine == {n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert sum(p.numel() for p in trainable(model).values()) == pm.get_nb_trainable_parameters()[0]
    sync(model, pm)
    check_parity(model, pm)
    # the saved adapter names the same modules for transformers' model
    model.save_adapter(tmp_path / "ad")
    loaded = peft.PeftModel.from_pretrained(hf_model(ckpts["gemma3"]), tmp_path / "ad").eval()
    ids, kw = inputs(model, seed=1)
    with torch.no_grad():
        assert rel(logits(model, ids, kw), ref_logits(loaded, ids, kw)) <= TOL


@pytest.mark.parametrize(
    "family,kw,peft_kw",
    [
        ("llama", dict(r=8, targets=["q_proj", "v_proj"]), dict(r=8, targets=["q_proj", "v_proj"])),
        ("llama", dict(r=3, modules_to_save=["lm_head", "embed_tokens"]), dict(r=3, mts=["lm_head", "embed_tokens"])),
        ("llama", dict(r=2, targets=r"model\.layers\.1\..*_proj"), dict(r=2, targets=r"model\.layers\.1\..*_proj")),
        ("llama", dict(r=4, dora=True, attention=False), dict(r=4, dora=True, targets=["gate_proj", "up_proj", "down_proj"])),
        ("gemma3_text", dict(r=16, modules_to_save=["embed_tokens", "lm_head"]), dict(r=16, mts=["embed_tokens", "lm_head"], tie=True)),
        ("gemma3_text", dict(r=4, modules_to_save=["norm"]), dict(r=4, mts=["norm"])),
    ],
)
def test_trainable_counts_equal_peft(ckpts, family, kw, peft_kw):
    model, _ = minift.load(ckpts[family])
    minift.add_lora(model, **kw)
    if kw.get("modules_to_save") == ["norm"]:  # whole components: model.norm, not q_norm or input_layernorm
        assert [n for n, m in model.named_modules() if type(m).__name__ == "ModulesToSave"] == ["model.norm"]
        if tuple(int(v) for v in peft.__version__.split(".")[:2]) < (0, 22):
            pytest.skip("PEFT < 0.22 matched modules_to_save by plain suffix ('norm' took q_norm too)")
    pm = peft_model(ckpts[family], **peft_kw)
    assert sum(p.numel() for p in trainable(model).values()) == pm.get_nb_trainable_parameters()[0]


def test_pissa_matches_peft_and_saves_as_lora(ckpts, tmp_path):
    model, _ = minift.load(ckpts["llama"])
    base = hf_model(ckpts["llama"])
    minift.add_lora(model, r=4, alpha=8, init="pissa")
    pm = peft_model(ckpts["llama"], init="pissa")
    theirs = dict(pm.named_parameters())
    for n, p in trainable(model).items():
        assert rel(p, theirs[peft_name(model, n)]) <= 1e-5
    ids, _ = inputs(model)
    with torch.no_grad():  # the residual base + the principal adapter is the original model
        assert rel(model(ids).logits, base(input_ids=ids).logits) <= 1e-5
        for n, p in trainable(model).items():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.save_adapter(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
    loaded = peft.PeftModel.from_pretrained(hf_model(ckpts["llama"]), tmp_path / "ad").eval()
    with torch.no_grad():
        assert rel(model(ids).logits, loaded(input_ids=ids).logits) <= 1e-5


# ---- adapter files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama", dict(modules_to_save=["lm_head"])),
        ("gemma3_text", dict(dora=True, rslora=True, targets=["q_proj", "o_proj", "up_proj"], modules_to_save=["embed_tokens"])),
        ("llama", dict(targets=r"model\.layers\.0\.self_attn\.(q|v)_proj")),
    ],
)
def test_save_adapter_loads_in_peft(ckpts, tmp_path, family, kw):
    model, _ = minift.load(ckpts[family])
    minift.add_lora(model, r=4, alpha=16, **kw)
    with torch.no_grad():
        for n, p in trainable(model).items():
            p.add_(0.05 * torch.randn_like(p))
    out = model.save_adapter(tmp_path / "ad")
    names = {f.name for f in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary dirs left
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    assert cfg["use_dora"] == kw.get("dora", False) and cfg["use_rslora"] == kw.get("rslora", False)
    assert cfg["base_model_name_or_path"] == str(ckpts[family])
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in keys)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    loaded = peft.PeftModel.from_pretrained(hf_model(ckpts[family]), out).eval()
    ids, _ = inputs(model)
    with torch.no_grad():
        mine = model(ids).logits
        assert rel(mine, loaded(input_ids=ids).logits) <= TOL
        # and back into minift
        again, _ = minift.load(ckpts[family])
        minift.load_adapter(again, out)
        assert torch.equal(again(ids).logits, mine)


@pytest.mark.parametrize("family,kw", [("llama", dict()), ("gemma3_text", dict(dora=True, mts=["lm_head"])),
                                       ("gemma3_text", dict(mts=["embed_tokens"], tie=True)),
                                       ("llama", dict(rslora=True, mts=["embed_tokens"]))])
def test_peft_adapter_loads_in_minift(ckpts, tmp_path, family, kw):
    pm = peft_model(ckpts[family], r=4, alpha=8, init=False, **kw)  # init=False: random B
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and "modules_to_save" in n:
                p.add_(0.01 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "ad")
    model, _ = minift.load(ckpts[family])
    minift.load_adapter(model, tmp_path / "ad")
    assert sum(p.numel() for p in trainable(model).values()) == pm.get_nb_trainable_parameters()[0]
    ids, _ = inputs(model)
    with torch.no_grad():
        assert rel(model(ids).logits, pm(input_ids=ids).logits) <= TOL
    model.save_adapter(tmp_path / "again")  # and out again, for PEFT
    again = peft.PeftModel.from_pretrained(hf_model(ckpts[family]), tmp_path / "again").eval()
    with torch.no_grad():
        assert rel(again(input_ids=ids).logits, pm(input_ids=ids).logits) <= TOL


@pytest.mark.parametrize("kw", [dict(), dict(targets=["q_proj", "down_proj"], modules_to_save=["lm_head"])])
def test_text_only_adapter_of_vision_checkpoint_loads_on_full_model(ckpts, tmp_path, kw):
    """A LoRA trained on the language half of a Gemma 3 vision checkpoint (text_only=True) is saved
    under the full model's names: PEFT applies it to Gemma3ForConditionalGeneration (what
    transformers loads for that checkpoint) without touching the vision tower, and minift loads
    it into the full model or another text-only load."""
    path = ckpts["gemma3"]
    model, _ = minift.load(path, text_only=True)
    minift.add_lora(model, r=4, alpha=8, **kw)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(0.05 * torch.randn_like(p))
    out = model.save_adapter(tmp_path / "ad")
    cfg = json.loads((out / "adapter_config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not any(k.startswith("base_model.model.model.layers.") for k in keys)
    ref = hf_model(path)
    loaded = peft.PeftModel.from_pretrained(ref, out).eval()
    wrapped = [n for n, m in loaded.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and all(".language_model." in n for n in wrapped), cfg["target_modules"]
    ids, _ = inputs(model)
    with torch.no_grad():
        mine = model(ids).logits
        assert rel(mine, loaded(input_ids=ids).logits) <= TOL
        full, _ = minift.load(path)
        minift.load_adapter(full, out)
        assert rel(full(ids).logits, mine) <= TOL
        again, _ = minift.load(path, text_only=True)
        minift.load_adapter(again, out)
        assert torch.equal(again(ids).logits, mine)


def test_load_adapter_errors(ckpts, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "wide", "llama", hidden_size=96, num_attention_heads=6,
                                  num_key_value_heads=2, tie_word_embeddings=False)
    pm = peft_model(other, r=4)
    pm.save_pretrained(tmp_path / "wide_ad")
    model, _ = minift.load(ckpts["llama"])
    with pytest.raises(AdapterError, match=r"adapter for model\.layers\.\d\.\w+\.\w+_proj does not fit.*base weight is \(\d+, \d+\)"):
        minift.load_adapter(model, tmp_path / "wide_ad")
    three = write_tiny_checkpoint(tmp_path / "deep", "llama", num_hidden_layers=3, tie_word_embeddings=False)
    peft_model(three, r=4, targets=["q_proj"]).save_pretrained(tmp_path / "deep_ad")
    with pytest.raises(AdapterError, match=r"no linear layer for: model\.layers\.2\.self_attn\.q_proj"):
        minift.load_adapter(model, tmp_path / "deep_ad")
    with pytest.raises(AdapterError, match="adapter_config.json"):
        minift.load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # nothing half-added


# ---- merged checkpoints -------------------------------------------------------------------------


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in trainable(model).items():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))


@pytest.mark.parametrize("family,kw", [("llama", dict(modules_to_save=["lm_head"])),
                                       ("gemma3_text", dict(dora=True, modules_to_save=["embed_tokens"])),
                                       ("gemma3", dict(dora=True))])
def test_save_merged_loads_in_transformers(ckpts, tmp_path, family, kw):
    model, _ = minift.load(ckpts[family])
    minift.add_lora(model, r=4, alpha=8, **kw)
    randomise(model)
    out = model.save_merged(tmp_path / "merged", dtype=torch.float32)
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float32" and "quantization_config" not in cfg
    from safetensors.torch import load_file

    sd = load_file(str(out / "model.safetensors"))
    base = load_file(str(ckpts[family] / "model.safetensors"))
    assert set(sd) == set(base)  # transformers 5 names; a tied head stays left out
    q = next(k for k in sd if "language_model.layers.0.self_attn.q_proj.weight" in k or k == "model.layers.0.self_attn.q_proj.weight")
    assert not torch.allclose(sd[q], base[q])
    ref = hf_model(out)
    ids, ikw = inputs(model)
    with torch.no_grad():
        assert rel(logits(model, ids, ikw), ref_logits(ref, ids, ikw)) <= 1e-5


def test_save_merged_sharded_bf16(ckpts, tmp_path):
    model, _ = minift.load(ckpts["llama"])
    minift.add_lora(model, r=4)
    randomise(model)
    out = model.save_merged(tmp_path / "m", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 40_000 + 64 * 270 * 2 + 1000 for s in shards)  # one tensor may exceed
    ref = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert ref.dtype == torch.bfloat16
    ids, _ = inputs(model)
    with torch.no_grad():
        assert rel(model(ids).logits, ref(input_ids=ids).logits.float()) <= 2e-2
    with pytest.raises(AdapterError, match="not empty"):
        model.save_merged(out)
    model.save_merged(out, dtype=torch.float32, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()


# ---- 4-bit bases ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def q4(ckpts):
    return ckpts["llama"]


@pytest.mark.parametrize("dora", [False, True])
def test_4bit_base_train_step_and_merged_save(q4, tmp_path, dora):
    model, _ = minift.load(q4, load_in_4bit=True)
    minift.add_lora(model, r=4, alpha=8, dora=dora, dropout=0.1)
    assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    randomise(model)
    ids, _ = inputs(model)
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in trainable(model).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with pytest.raises(AdapterError, match="4-bit"):
        model.merge_lora()
    merged = model.save_merged(tmp_path / "m16", dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(merged)
    with torch.no_grad():
        assert rel(model(ids).logits, ref(input_ids=ids).logits) <= 1e-5


def test_4bit_save_matches_transformers_quantisation(q4, tmp_path):
    model, _ = minift.load(q4, load_in_4bit=True)
    minift.add_lora(model, r=4)
    randomise(model)
    model.save_merged(tmp_path / "m16", dtype=torch.float32)
    model.save_merged(tmp_path / "m4", dtype="4bit")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m16", quantization_config=bnb, device_map="cpu")
    theirs.save_pretrained(tmp_path / "t4")
    from safetensors.torch import load_file

    mine_sd, their_sd = load_file(str(tmp_path / "m4" / "model.safetensors")), load_file(str(tmp_path / "t4" / "model.safetensors"))
    assert set(mine_sd) == set(their_sd)
    assert all(torch.equal(mine_sd[k], their_sd[k]) for k in mine_sd)
    cfg = json.loads((tmp_path / "m4" / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((tmp_path / "t4" / "config.json").read_text())["quantization_config"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m4", device_map="cpu")
    ids, _ = inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, theirs(input_ids=ids).logits)
    again, _ = minift.load(tmp_path / "m4")  # and minift reads it back as 4-bit, bit for bit
    q = again.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit"
    assert torch.equal(q.weight, mine_sd["model.layers.0.self_attn.q_proj.weight"])
    with torch.no_grad():  # transformers' CPU 4-bit matmul runs at bfloat16 precision, hence the tolerance
        assert rel(again(ids).logits, loaded(input_ids=ids).logits) <= 1e-2


# ---- switching adapters, init, errors -------------------------------------------------------------


def test_disable_enable_merge_unmerge(ckpts):
    model, _ = minift.load(ckpts["gemma3_text"])
    base_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    ids, _ = inputs(model)
    with torch.no_grad():
        base = model(ids).logits
        minift.add_lora(model, r=4, dora=True, modules_to_save=["embed_tokens"])
        randomise(model)
        adapted = model(ids).logits
        assert rel(adapted, base) > 1e-3
        with model.disable_adapters():
            assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids).logits, adapted)
        model.disable_adapters()
        assert torch.equal(model(ids).logits, base)
        model.enable_adapters()
        model.merge_lora()
        assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base_q)
        assert rel(model(ids).logits, adapted) <= 1e-5
        with model.disable_adapters():  # unmerges first
            assert rel(model(ids).logits, base) <= 1e-5
        assert (model.model.layers[0].self_attn.q_proj.weight - base_q).abs().max() <= 1e-6
        model.merge_lora()
        model.unmerge_lora()
        assert rel(model(ids).logits, adapted) <= 1e-6


def test_dropout_only_in_training(ckpts):
    model, _ = minift.load(ckpts["llama"])
    minift.add_lora(model, r=4, dropout=0.5)
    randomise(model)
    ids, _ = inputs(model)
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
        model.train()
        c = model(ids, return_logits=True).logits
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seed_gives_same_init_without_touching_global_rng(ckpts):
    def adapters(seed, init="default"):
        m, _ = minift.load(ckpts["llama"])
        minift.add_lora(m, r=4, seed=seed, init=init)
        return {n: p.detach().clone() for n, p in trainable(m).items()}

    state = torch.get_rng_state()
    a, b, c = adapters(1), adapters(1), adapters(2)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a[next(iter(a))], c[next(iter(c))])
    assert all(not v.any() for k, v in a.items() if "lora_B" in k)
    for k, v in a.items():
        if "lora_A" in k:  # PEFT's Kaiming-uniform(a=sqrt 5): U(-1/sqrt(in), 1/sqrt(in))
            assert v.abs().max() <= v.shape[1] ** -0.5 and v.dtype == torch.float32
    g = adapters(1, "gaussian")
    assert 0.1 < g[next(k for k in g if "lora_A" in k)].std().item() < 0.4  # std 1/r


def test_bad_inputs(ckpts, tmp_path):
    path = ckpts["llama"]
    model, _ = minift.load(path)
    with pytest.raises(AdapterError, match=r"match no linear module.*down_proj, gate_proj, k_proj"):
        minift.add_lora(model, targets=r".*nonexistent")
    with pytest.raises(AdapterError, match="match no linear module"):
        minift.add_lora(model, targets=["fc1"])
    with pytest.raises(AdapterError, match="positive integer"):
        minift.add_lora(model, r=0)
    with pytest.raises(AdapterError, match="init"):
        minift.add_lora(model, init="olora")
    with pytest.raises(AdapterError, match="lm_head"):
        minift.add_lora(model, targets=["q_proj", "lm_head"])
    with pytest.raises(AdapterError, match="select nothing"):
        minift.add_lora(model, attention=False, mlp=False)
    with pytest.raises(AdapterError, match="modules_to_save"):
        minift.add_lora(model, modules_to_save=["no_such_module"])
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # failed calls changed nothing
    minift.add_lora(model, r=2, targets=["q_proj"])
    with pytest.raises(AdapterError, match="already has adapters"):
        minift.add_lora(model)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(AdapterError, match="not empty"):
        model.save_adapter(tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    # overwrite=True replaces what minift wrote, never the user's other files: it names them instead
    with pytest.raises(AdapterError, match=r"also holds x;"):
        model.save_adapter(tmp_path / "full", overwrite=True)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    (tmp_path / "full" / "x").unlink()
    model.save_adapter(tmp_path / "full", overwrite=True)
    model.save_adapter(tmp_path / "full", overwrite=True)  # its own output it replaces
    assert (tmp_path / "full" / "adapter_config.json").exists()


@pytest.mark.parametrize("dora", [False, True])
def test_bf16_model_keeps_float32_adapters(ckpts, dora):
    m32, _ = minift.load(ckpts["gemma3_text"])
    m16, _ = minift.load(ckpts["gemma3_text"], dtype=torch.bfloat16)
    for m in (m32, m16):
        minift.add_lora(m, r=4, dora=dora, seed=5)
        randomise(m)
    assert all(p.dtype == torch.float32 for p in trainable(m16).values())
    ids, _ = inputs(m16)
    out = m16(ids, return_logits=True)
    assert out.logits.dtype == torch.bfloat16
    assert rel(out.logits.float(), m32(ids).logits) <= 3e-2
    m16.train()
    m16(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in trainable(m16).values())


def test_load_adapter_reads_in_memory_peft_names(ckpts, tmp_path):
    """Keys as PEFT names them in memory (`.lora_A.default.weight`) load too."""
    from safetensors.torch import load_file, save_file

    pm = peft_model(ckpts["llama"], r=4, init=False, dora=True)
    pm.save_pretrained(tmp_path / "ad")
    f = tmp_path / "ad" / "adapter_model.safetensors"
    sd = load_file(str(f))
    ren = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
           .replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight"): v for k, v in sd.items()}
    assert ren.keys() != sd.keys()
    save_file(ren, str(f))
    model, _ = minift.load(ckpts["llama"])
    minift.load_adapter(model, tmp_path / "ad")
    ids, _ = inputs(model)
    with torch.no_grad():
        assert rel(model(ids).logits, pm(input_ids=ids).logits) <= TOL


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_fused_lora_path_matches_plain(tmp_path, family):
    """The opt-in fused path (ops.lora_linear in each layer, ops.lora_mlp in the MLP) computes
    the same logits and adapter gradients as the plain matmuls."""
    path = write_tiny_checkpoint(tmp_path, family)
    model, _ = minift.load(path)
    minift.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    model.train()
    results = []
    for fuse in (False, True):
        model.set_fused_lora(fuse)
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-6, atol=1e-6)
    for n in g0:
        assert ((g0[n] - g1[n]).norm() / (g0[n].norm() + 1e-12)).item() < 1e-5, n


def test_adapter_config_rank_against_tensors_refused_like_peft(ckpts, tmp_path):
    """An adapter_config.json whose r disagrees with its tensors: PEFT refuses it, and so does
    minift (it would otherwise scale by lora_alpha over the wrong rank)."""
    pm = peft_model(ckpts["llama"], r=4, init=False)
    pm.save_pretrained(tmp_path / "ad")
    cf = tmp_path / "ad" / "adapter_config.json"
    cf.write_text(json.dumps(dict(json.loads(cf.read_text()), r=8)))
    with pytest.raises(Exception):
        peft.PeftModel.from_pretrained(hf_model(ckpts["llama"]), tmp_path / "ad")
    model, _ = minift.load(ckpts["llama"])
    with pytest.raises(AdapterError, match=r"rank 8 \(r=8\), but its lora_A tensor has rank 4"):
        minift.load_adapter(model, tmp_path / "ad", strict=False)  # never a partial adapter: always refused
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_partial_adapter_strict_refuses_and_strict_false_matches_peft(ckpts, tmp_path):
    """A PEFT adapter of a 2-layer model on a 3-layer one: PEFT warns of the missing keys and leaves
    layer 2 unadapted; minift refuses it by default and, with strict=False, warns and computes what
    PEFT computes."""
    deep = write_tiny_checkpoint(tmp_path / "deep", "llama", num_hidden_layers=3, tie_word_embeddings=False)
    pm = peft_model(ckpts["llama"], r=4, targets=["q_proj", "v_proj"], init=False)  # random B: trained-like
    pm.save_pretrained(tmp_path / "ad")
    cf = tmp_path / "ad" / "adapter_config.json"  # PEFT's layer 2 then starts as it would: B = 0, no change
    cf.write_text(json.dumps(dict(json.loads(cf.read_text()), init_lora_weights=True)))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ref = peft.PeftModel.from_pretrained(hf_model(deep), tmp_path / "ad").eval()
    assert any("layers.2" in str(w.message) for w in seen)
    model, _ = minift.load(deep)
    with pytest.raises(AdapterError, match=r"model\.layers\.2\.self_attn\.q_proj.*strict=False"):
        minift.load_adapter(model, tmp_path / "ad")
    with pytest.warns(UserWarning, match=r"model\.layers\.2\.self_attn\.(q|v)_proj"):
        minift.load_adapter(model, tmp_path / "ad", strict=False)
    ids, _ = inputs(model)
    with torch.no_grad():
        assert rel(model(ids).logits, ref(input_ids=ids).logits) <= TOL


def test_saved_adapter_names_its_local_base_absolutely(ckpts, tmp_path, monkeypatch):
    """base_model_name_or_path is the absolute directory of a local base even when it was loaded by a
    relative path, so PEFT run from another directory reads the same base (not the hub)."""
    monkeypatch.chdir(ckpts["llama"].parent)
    model, _ = minift.load(ckpts["llama"].name)
    minift.add_lora(model, r=2)
    out = model.save_adapter(tmp_path / "ad")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(ckpts["llama"])
    monkeypatch.chdir(tmp_path)
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert loaded.base_model.model.config.num_hidden_layers == 2
