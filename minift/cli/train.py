"""`minift train`: unsloth-cli.py's options under the same names (an existing command line runs
unchanged), minift's own beside them, and `--config file.yaml` with the same keys (flags given on
the command line override the file). Every flag is checked before anything loads: a bad value
or combination exits with status 2, names the flag, and writes nothing."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from .common import UsageError, check_chat_template, check_model_arg, parse_dtype, str2bool
from .data import check_data_arg

SUPPRESS = argparse.SUPPRESS

# transformers' / unsloth's optimizer names -> TrainConfig.optimizer (note printed when inexact)
OPTIMS: dict[str, tuple[str, str | None]] = {
    "adamw": ("adamw", None), "adamw_torch": ("adamw", None), "adamw_torch_fused": ("adamw", None),
    "adamw_hf": ("adamw", None), "adamw_apex_fused": ("adamw", "apex is not used: torch AdamW (fused on CUDA)"),
    "adamw_torch_xla": ("adamw", None), "adamw_torch_npu_fused": ("adamw", None),
    "paged_adamw_32bit": ("adamw", "not paged: torch AdamW"),
    "adamw_8bit": ("adamw_8bit", None), "adamw_bnb_8bit": ("adamw_8bit", None),
    "paged_adamw_8bit": ("adamw_8bit", "not paged: bitsandbytes AdamW8bit"),
    "sgd": ("sgd", None),
}
# transformers' lr_scheduler_type -> TrainConfig.scheduler
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
REPORT_TO = ("none", "tensorboard", "wandb", "all")
HF_REPORT_TO = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "mlflow", "neptune",
                "swanlab", "trackio")
SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")
TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "out_proj", "fc1", "fc2")

DEFAULTS: dict[str, Any] = {}


def _add(group: argparse._ArgumentGroup, name: str, default: Any, help: str, *, flag: bool = False,
         aliases: tuple[str, ...] = (), dest: str | None = None, **kw: Any) -> None:
    """One option, default SUPPRESS (so what was given, on the command line or in --config, is
    known); its real default is recorded in DEFAULTS and shown in --help."""
    dest = dest or name
    if dest not in DEFAULTS:
        DEFAULTS[dest] = default
    shown = "" if default is None or default == [] else f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
    if flag:
        kw.update(nargs="?", const=True, type=str2bool, metavar="BOOL")
        help += " (a bare flag is true; `--flag false` turns it off)"
    group.add_argument(f"--{name}", *[f"--{a}" for a in aliases], dest=dest, default=SUPPRESS,
                       help=help + shown, **kw)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="minift train")
    p.description = ("Fine-tune LoRA adapters (unsloth-cli.py's options under the same names, minift's own "
                     "beside them). Flags override --config.")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML (or JSON) file whose keys are these options' names; flags given here override it")

    g = p.add_argument_group("model")
    _add(g, "model_name", "unsloth/llama-3-8b", "a hub id or a local model directory", metavar="NAME")
    _add(g, "max_seq_length", 2048, "longest example (or packed row) in tokens; longer ones are truncated", type=int)
    _add(g, "dtype", None, "compute dtype: None (auto: bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32")
    _add(g, "load_in_4bit", False, "NF4 base (QLoRA)", flag=True)

    g = p.add_argument_group("data")
    _add(g, "dataset", "yahma/alpaca-cleaned",
         "a hub id, or a local .json / .jsonl / .parquet / .csv / .txt file or folder (datasets' loaders); rows: "
         "messages, conversations (ShareGPT), prompt + completion, text, or Alpaca instruction / input / output")
    _add(g, "split", "train", "the dataset split (slices such as train[:1000] work)")
    _add(g, "text_field", None, "train on this text column as plain text (TRL's dataset_text_field)")
    _add(g, "chat_template", None, "put this minift chat template on the tokenizer (minift.chat_templates(); "
                                   "Alpaca rows then become chats)")
    _add(g, "train_on_responses_only", False, "loss on assistant turns / completions only", flag=True)
    _add(g, "packing", False, "padding-free packing of examples into rows of max_seq_length", flag=True)
    _add(g, "raw_text_file", None, "continued pretraining: a UTF-8 text file cut into token windows (instead of "
                                   "--dataset)", metavar="FILE")
    _add(g, "chunk_size", None, "raw text: tokens per window (default: --max_seq_length)", type=int)
    _add(g, "stride", 0, "raw text: tokens each window shares with the one before (context only, not "
                         "trained twice)", type=int)
    _add(g, "eval_dataset", None, "held-out data: a hub id or local file / folder like --dataset, or a "
                                  "fraction (e.g. 0.05) split off the training rows")
    _add(g, "eval_split", None, "the eval dataset's split (default: train for local files, test for hub ids)")
    _add(g, "eval_steps", None, "evaluate every this many steps (and at the end)", type=int)

    g = p.add_argument_group("LoRA")
    _add(g, "r", 16, "LoRA rank", type=int)
    _add(g, "lora_alpha", 16, "LoRA alpha (scaling alpha / r, or alpha / sqrt(r) with --use_rslora)", type=float)
    _add(g, "lora_dropout", 0.0, "LoRA dropout", type=float)
    _add(g, "bias", "none", "bias training: only 'none' is supported")
    _add(g, "use_gradient_checkpointing", "unsloth",
         "'unsloth' (checkpointing with layer inputs offloaded to CPU), true, false, or 'auto' (the fastest plan "
         "fitting --memory_budget_gb or the GPU)")
    _add(g, "memory_budget_gb", None, "with --use_gradient_checkpointing auto: the peak GPU memory to plan for "
                                      "(GiB; default: what the GPU has)", type=float)
    _add(g, "mlp_chunk_tokens", None, "long context: each MLP over this many tokens at a time, each chunk "
                                      "recomputed in the backward (default: off, or 8192 when an auto plan needs it)",
         type=int)
    _add(g, "random_state", 3407, "seed of the adapters' initialisation", type=int)
    _add(g, "use_rslora", False, "rank-stabilised LoRA", flag=True)
    _add(g, "loftq_config", None, "LoftQ initialisation: not implemented in minift (refused)")
    _add(g, "use_dora", False, "DoRA (PEFT's magnitude vector)", flag=True)
    _add(g, "target_modules", ["all-linear"], "all-linear, module names (q_proj k_proj v_proj o_proj gate_proj "
                                              "up_proj down_proj; vision: q_proj out_proj fc1 fc2) or one regex",
         nargs="+")
    _add(g, "modules_to_save", [], "modules trained in full beside the adapters (continued pretraining: "
                                   "embed_tokens lm_head)", nargs="+")
    _add(g, "finetune_vision_layers", True, "adapters on the vision tower (vision models)", flag=True)
    _add(g, "finetune_language_layers", True, "adapters on the language model", flag=True)
    _add(g, "finetune_attention_modules", True, "adapters on attention projections", flag=True)
    _add(g, "finetune_mlp_modules", True, "adapters on MLP projections", flag=True)

    g = p.add_argument_group("training")
    _add(g, "per_device_train_batch_size", 2, "examples per micro-batch", type=int)
    _add(g, "gradient_accumulation_steps", 4, "micro-batches per optimizer step", type=int)
    _add(g, "warmup_steps", 5, "linear warmup steps", type=int)
    _add(g, "warmup_ratio", 0.0, "warmup as a fraction of the steps (when --warmup_steps is 0)", type=float)
    _add(g, "max_steps", 400, "optimizer steps (<= 0: run --epochs)", type=int)
    _add(g, "epochs", None, "passes over the data instead of --max_steps", type=float, aliases=("num_train_epochs",))
    _add(g, "learning_rate", 2e-4, "peak learning rate", type=float)
    _add(g, "embedding_learning_rate", None, "learning rate of --modules_to_save embeddings / lm_head "
                                            "(unsloth's embedding_learning_rate; default: --learning_rate)", type=float)
    _add(g, "optim", "adamw_8bit", f"optimizer: {', '.join(OPTIMS)}")
    _add(g, "weight_decay", 0.01, "AdamW weight decay (matrices only)", type=float)
    _add(g, "lr_scheduler_type", "linear", f"schedule: {', '.join(SCHEDULERS)}")
    _add(g, "max_grad_norm", 1.0, "gradient clipping (0: off)", type=float)
    _add(g, "seed", 3407, "seed of the data order, dropout and RNGs", type=int)
    _add(g, "save_steps", None, "write a resumable checkpoint every this many steps", type=int)
    _add(g, "save_total_limit", None, "keep at most this many checkpoints", type=int)
    _add(g, "resume", None, "resume from output_dir's latest checkpoint, or from the checkpoint DIR given",
         nargs="?", const="latest", metavar="DIR")
    _add(g, "save_on_interrupt", True, "on Ctrl-C, finish the running step, write a resumable checkpoint "
                                       "in --output_dir and exit with status 130 (Ctrl-C again: at once)", flag=True)
    _add(g, "peak_tflops", None, "the accelerator's peak TFLOP/s: logs MFU", type=float)
    _add(g, "cuda_graphs", "auto", "replay each micro-batch's forward and backward as a CUDA graph: auto (one GPU, "
                                   "the step within half the memory), true or false")

    g = p.add_argument_group("report")
    _add(g, "report_to", ["none"], "none, tensorboard, wandb or all (one or several)", nargs="+")
    _add(g, "logging_steps", 1, "log every this many steps (a logged loss is the window's mean)", type=int)
    _add(g, "logging_dir", None, "TensorBoard's directory (default: OUTPUT_DIR/runs)")
    _add(g, "run_name", None, "the W&B run name")

    g = p.add_argument_group("save")
    _add(g, "output_dir", "outputs", "metrics.jsonl, checkpoints, runs/ and the adapter (final/) go here")
    _add(g, "save_model", False, "after training, also save to --save_path as --save_method (or GGUF)", flag=True)
    _add(g, "save_method", "merged_16bit", f"{', '.join(SAVE_METHODS)}")
    _add(g, "save_gguf", False, "save as GGUF (llama.cpp) in --quantization instead of --save_method", flag=True)
    _add(g, "save_path", "model", "where --save_model writes")
    _add(g, "quantization", ["q8_0"], "GGUF quantisation(s): f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k_s q4_k_m "
                                      "q5_k_s q5_k_m q6_k, or not_quantized / fast_quantized / quantized",
         nargs="+", aliases=("quantization_method",))
    _add(g, "modelfile", False, "with --save_gguf, also write an Ollama Modelfile", flag=True)
    _add(g, "overwrite", False, "replace an existing --save_path", flag=True)
    _add(g, "adapter_file", None, "unsloth's MLX adapter file name: ignored (the adapter goes to OUTPUT_DIR/final)")

    g = p.add_argument_group("push (Hugging Face Hub)")
    _add(g, "push_model", False, "after saving, upload --save_path (what --save_model writes: the adapter for "
                                 "--save_method lora, the merged model otherwise, the GGUF(s) with --save_gguf) with a "
                                 "model card to --hub_path; implies --save_model", flag=True)
    _add(g, "push_gguf", False, "upload GGUF file(s) of --quantization to --hub_path (those --save_gguf saved, else "
                                "written first to OUTPUT_DIR/gguf)", flag=True)
    _add(g, "hub_path", None, "the hub repository to push to, 'org/name' (a new one is created private)",
         metavar="REPO")
    _add(g, "hub_token", None, "the Hugging Face token (default: huggingface_hub's, from `hf auth login` or "
                               "HF_TOKEN)", metavar="TOKEN")
    return p


# ---- --config -----------------------------------------------------------------------------------


def _actions(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out = {}
    for a in p._actions:
        for s in a.option_strings:
            out[s.lstrip("-").replace("-", "_")] = a
    return out


def read_config(path: str) -> dict[str, Any]:
    f = Path(path).expanduser()
    if not f.is_file():
        raise UsageError("--config", f"{path}: no such file")
    text = f.read_text()
    if f.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError("--config", f"{path}: not valid JSON: {e}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise UsageError("--config", "YAML configs need pyyaml: pip install pyyaml (or minift[yaml]), or "
                                         "write the file as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UsageError("--config", f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError("--config", f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def config_tokens(p: argparse.ArgumentParser, data: dict[str, Any], path: str) -> list[str]:
    """The config file as command-line tokens, parsed before the real ones (which then win)."""
    acts = _actions(p)
    out: list[str] = []
    for key, value in data.items():
        k = str(key).replace("-", "_")
        a = acts.get(k)
        if a is None or k in ("config", "help", "h"):
            raise UsageError("--config", f"{path}: unknown key {key!r} (keys are `minift train` option names, "
                                         "e.g. model_name, r, learning_rate)")
        if value is None:
            continue
        opt = a.option_strings[0]
        if isinstance(value, bool):
            out += [opt, "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            if not value:
                continue
            out += [opt, *map(str, value)]
        elif isinstance(value, dict):
            raise UsageError("--config", f"{path}: {key!r} must be a value or a list, not a mapping")
        else:
            out += [opt, str(value)]
    return out


def parse(argv: list[str], parser: argparse.ArgumentParser) -> tuple[dict[str, Any], set[str]]:
    """(every option's value, the names given on the command line or in --config)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    tokens: list[str] = []
    if known.config:
        tokens = config_tokens(parser, read_config(known.config), known.config)
    ns = parser.parse_args(tokens + list(argv))
    given = {k for k in vars(ns) if k != "config"}
    values = {**DEFAULTS, **{k: v for k, v in vars(ns).items() if k != "config"}}
    values["config"] = known.config
    return values, given


# ---- checks -------------------------------------------------------------------------------------


def _int_at_least(v: dict[str, Any], name: str, low: int) -> None:
    if v[name] is not None and v[name] < low:
        raise UsageError(f"--{name}", f"must be >= {low}, got {v[name]}")


def gradient_checkpointing(value: Any, auto: bool = False) -> bool | str:
    s = str(value).strip().lower()
    if s == "unsloth" or s == "offload":
        return "offload"
    if auto and s == "auto":
        return "auto"
    try:
        return str2bool(s)
    except argparse.ArgumentTypeError:
        allowed = "'unsloth', true, false or 'auto'" if auto else "'unsloth', true or false"
        raise UsageError("--use_gradient_checkpointing", f"expected {allowed}, got {value!r}") from None


def target_modules(value: list[str]) -> str | list[str]:
    if value == ["all-linear"] or value == ["all_linear"]:
        return "all-linear"
    if len(value) == 1 and not re.fullmatch(r"[A-Za-z0-9_]+", value[0]):
        try:
            re.compile(value[0])
        except re.error as e:
            raise UsageError("--target_modules", f"{value[0]!r} is not a valid regular expression: {e}") from None
        return value[0]
    names = [n for v in value for n in v.split(",") if n]
    if "lm_head" in names:
        raise UsageError("--target_modules", "lm_head cannot take a LoRA adapter in minift (its weight feeds the fused "
                                             "loss); train it fully with the Python API's modules_to_save=['lm_head']")
    bad = [n for n in names if n not in TARGET_NAMES]
    if bad:
        raise UsageError("--target_modules", f"unknown module name(s) {bad}; use all-linear, a regex, or names among "
                                             f"{', '.join(TARGET_NAMES)}")
    return names


def _quants(values: list[str]) -> list[str]:
    from ..export.gguf import QUANT_ALIASES, SUPPORTED_QUANTS

    out = []
    for q in values:
        for part in str(q).split(","):
            k = part.strip().lower()
            if not k:
                continue
            if k not in SUPPORTED_QUANTS:
                raise UsageError("--quantization", f"{part!r} is not supported; supported: "
                                                   f"{', '.join(SUPPORTED_QUANTS)} ({', '.join(f'{a}={b}' for a, b in QUANT_ALIASES.items())})")
            out.append(k)
    if not out:
        raise UsageError("--quantization", "name at least one quantisation")
    return out


def _report_to(values: list[str]) -> list[str]:
    import importlib.util

    out = []
    for r in values:
        for k in str(r).split(","):
            k = k.strip().lower()
            if not k:
                continue
            if k in HF_REPORT_TO:
                raise UsageError("--report_to", f"{k!r} is not supported by minift; use none, tensorboard, wandb or all")
            if k not in REPORT_TO:
                raise UsageError("--report_to", f"unknown integration {k!r}; use none, tensorboard, wandb or all")
            if k in ("tensorboard", "wandb") and importlib.util.find_spec(k) is None:
                raise UsageError("--report_to", f"{k} is not installed: pip install {k} (or minift[{k}])")
            out.append(k)
    if len(out) > 1 and "none" in out:
        raise UsageError("--report_to", "'none' cannot be combined with other integrations")
    return out or ["none"]


def check(v: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """Validates every option (UsageError naming the flag) and returns the derived settings."""
    if str(v["bias"]).lower() != "none":
        raise UsageError("--bias", f"only 'none' is supported (minift's LoRA trains no biases), got {v['bias']!r}")
    if v["loftq_config"] not in (None, "", "None", "none", "null", "{}"):
        raise UsageError("--loftq_config", "LoftQ initialisation is not implemented in minift; drop the flag "
                                           "(adapters start as PEFT's default init)")
    d: dict[str, Any] = {}
    d["dtype"] = parse_dtype(v["dtype"])
    d["checkpointing"] = gradient_checkpointing(v["use_gradient_checkpointing"], auto=True)
    budget = v["memory_budget_gb"]
    if budget is not None:
        if not float(budget) > 0:
            raise UsageError("--memory_budget_gb", f"must be > 0 GiB, got {budget!r}")
        if d["checkpointing"] != "auto":
            raise UsageError("--memory_budget_gb", "is the budget of --use_gradient_checkpointing auto; set that too")
    graphs = str(v["cuda_graphs"]).strip().lower()
    if graphs == "auto":
        d["cuda_graphs"] = "auto"
    else:
        try:
            d["cuda_graphs"] = str2bool(graphs)
        except argparse.ArgumentTypeError:
            raise UsageError("--cuda_graphs", f"expected auto, true or false, got {v['cuda_graphs']!r}") from None
    if v["mlp_chunk_tokens"] is not None and v["mlp_chunk_tokens"] < 1:
        raise UsageError("--mlp_chunk_tokens", f"must be a number of tokens >= 1, got {v['mlp_chunk_tokens']!r}")
    key = str(v["optim"]).strip().lower()
    if key not in OPTIMS:
        raise UsageError("--optim", f"{v['optim']!r} is not supported; supported: {', '.join(OPTIMS)}")
    d["optimizer"], d["optim_note"] = OPTIMS[key]
    sched = str(v["lr_scheduler_type"]).strip().lower()
    if sched not in SCHEDULERS:
        raise UsageError("--lr_scheduler_type", f"{v['lr_scheduler_type']!r} is not supported; supported: "
                                                f"{', '.join(SCHEDULERS)}")
    d["scheduler"] = SCHEDULERS[sched]
    d["report_to"] = _report_to(v["report_to"])
    if v["save_method"] not in SAVE_METHODS:
        raise UsageError("--save_method", f"{v['save_method']!r}: use one of {', '.join(SAVE_METHODS)}")
    d["quants"] = _quants(v["quantization"])
    d["targets"] = target_modules(list(v["target_modules"]))

    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "r", "eval_steps",
                 "save_steps", "save_total_limit"):
        _int_at_least(v, name, 1)
    _int_at_least(v, "max_seq_length", 2)
    _int_at_least(v, "warmup_steps", 0)
    if not v["lora_alpha"] > 0 or not math.isfinite(v["lora_alpha"]):
        raise UsageError("--lora_alpha", f"must be > 0, got {v['lora_alpha']}")
    if not 0.0 <= v["lora_dropout"] < 1.0:
        raise UsageError("--lora_dropout", f"must be in [0, 1), got {v['lora_dropout']}")
    bad_mts = [m for m in v["modules_to_save"] if m not in ("embed_tokens", "lm_head")]
    if bad_mts:
        raise UsageError("--modules_to_save", f"{bad_mts}: use embed_tokens and / or lm_head")
    if v["embedding_learning_rate"] is not None:
        if not v["modules_to_save"]:
            raise UsageError("--embedding_learning_rate", "needs --modules_to_save embed_tokens and / or lm_head")
        if not v["embedding_learning_rate"] >= 0:
            raise UsageError("--embedding_learning_rate", f"must be >= 0, got {v['embedding_learning_rate']}")
    for name in ("learning_rate", "weight_decay", "max_grad_norm"):
        if not v[name] >= 0:
            raise UsageError(f"--{name}", f"must be >= 0, got {v[name]}")
    if not 0.0 <= v["warmup_ratio"] < 1.0:
        raise UsageError("--warmup_ratio", f"must be in [0, 1), got {v['warmup_ratio']}")
    if v["peak_tflops"] is not None and not v["peak_tflops"] > 0:
        raise UsageError("--peak_tflops", f"must be > 0, got {v['peak_tflops']}")
    if v["epochs"] is not None:
        if not v["epochs"] > 0:
            raise UsageError("--epochs", f"must be > 0, got {v['epochs']}")
        if "max_steps" in given and v["max_steps"] > 0:
            raise UsageError("--epochs", "give --epochs or --max_steps, not both (--max_steps -1 runs --epochs)")
        d["max_steps"] = None
    else:
        d["max_steps"] = v["max_steps"] if v["max_steps"] > 0 else None
        if d["max_steps"] is None:
            v["epochs"] = 1.0
    if not (v["finetune_vision_layers"] or v["finetune_language_layers"]):
        raise UsageError("--finetune_language_layers", "with --finetune_vision_layers false nothing is selected")
    if not (v["finetune_attention_modules"] or v["finetune_mlp_modules"]):
        raise UsageError("--finetune_mlp_modules", "with --finetune_attention_modules false nothing is selected")

    check_model_arg(str(v["model_name"]), "--model_name")
    check_chat_template(v["chat_template"])

    # data
    if v["raw_text_file"] is not None:
        if "dataset" in given:
            raise UsageError("--raw_text_file", "give --dataset or --raw_text_file, not both")
        f = Path(v["raw_text_file"]).expanduser()
        if not f.is_file():
            raise UsageError("--raw_text_file", f"{v['raw_text_file']}: no such file")
        for name in ("text_field", "train_on_responses_only"):
            if v[name]:
                raise UsageError(f"--{name}", "does not apply to --raw_text_file (raw text has no columns or responses)")
        chunk = v["chunk_size"] if v["chunk_size"] is not None else v["max_seq_length"]
        if not 2 <= chunk <= v["max_seq_length"]:
            raise UsageError("--chunk_size", f"must be in [2, --max_seq_length={v['max_seq_length']}], got {chunk}")
        if not 0 <= v["stride"] < chunk:
            raise UsageError("--stride", f"must be in [0, chunk size {chunk}), got {v['stride']}")
        d["chunk"] = chunk
    else:
        for name in ("chunk_size", "stride"):
            if name in given:
                raise UsageError(f"--{name}", "only applies with --raw_text_file")
        check_data_arg(str(v["dataset"]), "--dataset")
    d["eval_fraction"] = None
    if v["eval_dataset"] is not None:
        try:
            frac = float(v["eval_dataset"])
        except ValueError:
            frac = None
        if frac is not None and not Path(str(v["eval_dataset"])).exists():
            if not 0.0 < frac < 1.0:
                raise UsageError("--eval_dataset", f"a fraction must be in (0, 1), got {frac}")
            if v["raw_text_file"] is not None:
                raise UsageError("--eval_dataset", "a fraction split does not apply to --raw_text_file")
            d["eval_fraction"] = frac
        else:
            check_data_arg(str(v["eval_dataset"]), "--eval_dataset")
    elif v["eval_steps"] is not None:
        raise UsageError("--eval_steps", "needs --eval_dataset")

    d.update(check_push(v, given))

    # outputs
    out = Path(v["output_dir"]).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError("--output_dir", f"{v['output_dir']} exists and is not a directory")
    if v["resume"] is not None and v["resume"] != "latest" and not Path(v["resume"]).expanduser().is_dir():
        raise UsageError("--resume", f"{v['resume']}: no such checkpoint directory")
    if v["save_model"]:
        sp = Path(v["save_path"]).expanduser()
        if sp.resolve() == out.resolve():
            raise UsageError("--save_path", "must differ from --output_dir (which holds checkpoints and final/)")
        if sp.exists() and not v["overwrite"] and (sp.is_file() or any(sp.iterdir())):
            raise UsageError("--save_path", f"{v['save_path']} exists and is not empty; pass --overwrite to replace it")
    elif v["save_gguf"] or "save_method" in given:
        note("--save_gguf / --save_method apply with --save_model; the model is saved as an adapter in "
             f"{out / 'final'} only")
    if v["modelfile"] and not v["save_gguf"]:
        raise UsageError("--modelfile", "only applies with --save_gguf")
    if (v["save_model"] and v["save_gguf"]) or v["push_gguf"]:
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise UsageError("--push_gguf" if v["push_gguf"] else "--save_gguf",
                             "GGUF export needs the gguf package: pip install minift[gguf]")
    d["gguf_dir"] = None
    d["push_saved"] = bool(v["push_model"]) or (bool(v["push_gguf"]) and bool(v["save_model"] and v["save_gguf"]))
    if d["push_saved"]:
        check_staging(Path(v["save_path"]).expanduser(), "--save_path", bool(v["overwrite"]))
    if v["push_gguf"] and not (v["save_model"] and v["save_gguf"]):
        d["gguf_dir"] = out / "gguf"
        check_staging(d["gguf_dir"], "--push_gguf", bool(v["overwrite"]))
    return d


def check_staging(path: Path, flag: str, overwrite: bool) -> None:
    """A folder a push stages in (then uploads) must be absent, empty, or (with --overwrite) one
    minift wrote: checked here so that the push does not fail after training."""
    from ..io.files import foreign_files

    if not path.exists():
        return
    if path.is_file():
        raise UsageError(flag, f"{path} (the folder pushed) is a file")
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise UsageError(flag, f"{path} (the folder pushed) exists and is not empty; pass --overwrite to replace it")
    foreign = foreign_files(path)
    if foreign:
        raise UsageError(flag, f"{path} also holds files minift did not write ({', '.join(foreign[:5])}); the "
                               "folder pushed is replaced whole: move them away or choose another path")


def hub_token(token: str | None, flag: str, token_flag: str) -> str:
    """The token a push will use (`token_flag`'s, else huggingface_hub's), checked before anything
    loads: UsageError when there is none or HF_HUB_OFFLINE=1 forbids uploading."""
    import huggingface_hub
    from huggingface_hub import constants as hf_constants

    if hf_constants.HF_HUB_OFFLINE:
        raise UsageError(flag, "HF_HUB_OFFLINE=1 forbids uploading to the hub; unset it, or save locally only")
    token = token or huggingface_hub.get_token()
    if not token:
        raise UsageError(token_flag, f"{flag} needs a Hugging Face token: pass {token_flag} TOKEN, or log in with "
                                     "`hf auth login` (or set HF_TOKEN)")
    return token


def check_push(v: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """--push_model / --push_gguf / --hub_path / --hub_token: the repository and token, checked
    before anything loads. --push_model implies --save_model (the folder uploaded is --save_path)."""
    from ..io.hub import is_hub_id

    if not (v["push_model"] or v["push_gguf"]):
        for name in ("hub_path", "hub_token"):
            if name in given and v[name] is not None:
                note(f"--{name} applies with --push_model / --push_gguf; nothing is pushed")
        return {"hub_token": None}
    flag = "--push_model" if v["push_model"] else "--push_gguf"
    repo = v["hub_path"]
    if not repo:
        raise UsageError("--hub_path", f"{flag} needs --hub_path ORG/NAME, the hub repository to push to")
    if not is_hub_id(str(repo)):
        raise UsageError("--hub_path", f"expected a hub repository id 'org/name', got {repo!r}")
    if v["push_model"] and not v["save_model"]:
        if "save_model" in given:
            raise UsageError("--push_model", "uploads what --save_model writes; drop --save_model false")
        v["save_model"] = True
    return {"hub_token": hub_token(v["hub_token"], flag, "--hub_token")}


def note(msg: str) -> None:
    sys.stderr.write(f"[minift] {msg}\n")


# ---- the run ------------------------------------------------------------------------------------


def _train_config(v: dict[str, Any], d: dict[str, Any]) -> Any:
    from ..train import TrainConfig

    warmup = v["warmup_steps"]
    if v["lr_scheduler_type"] == "constant" and warmup:
        note("--lr_scheduler_type constant has no warmup in transformers; --warmup_steps is ignored "
             "(use constant_with_warmup)")
        warmup = 0
    return TrainConfig(
        batch_size=v["per_device_train_batch_size"], grad_accum=v["gradient_accumulation_steps"],
        max_steps=d["max_steps"], epochs=v["epochs"] if v["epochs"] is not None else 1.0, lr=v["learning_rate"],
        embedding_lr=v["embedding_learning_rate"],
        weight_decay=v["weight_decay"], warmup_steps=warmup,
        warmup_ratio=v["warmup_ratio"] if v["lr_scheduler_type"] != "constant" else 0.0,
        scheduler=d["scheduler"], max_grad_norm=v["max_grad_norm"] or None, optimizer=d["optimizer"],
        max_seq_length=v["max_seq_length"], packing=bool(v["packing"]),
        train_on_responses_only=bool(v["train_on_responses_only"]), gradient_checkpointing=d["checkpointing"],
        memory_budget_gb=None if v["memory_budget_gb"] is None else float(v["memory_budget_gb"]),
        mlp_chunk_tokens=v["mlp_chunk_tokens"], cuda_graphs=d["cuda_graphs"],
        seed=v["seed"], logging_steps=v["logging_steps"], logging_first_step=True, report_to=d["report_to"],
        logging_dir=v["logging_dir"], run_name=v["run_name"], peak_tflops=v["peak_tflops"],
        eval_steps=v["eval_steps"], save_steps=v["save_steps"], save_total_limit=v["save_total_limit"],
        output_dir=str(v["output_dir"]), resume_from=v["resume"], save_on_interrupt=bool(v["save_on_interrupt"]),
        extra={"command": "minift train"},
    )


def _data(v: dict[str, Any], d: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(train rows, eval rows, formatting_func), loaded and checked before the model."""
    from .data import formatting_for, load_rows

    if v["raw_text_file"] is not None:
        ev = None
        if v["eval_dataset"] is not None:
            ev = load_rows(str(v["eval_dataset"]), v["eval_split"] or _default_eval_split(v["eval_dataset"]),
                           "--eval_dataset")
        return None, ev, None
    chat = v["chat_template"] is not None
    train = load_rows(str(v["dataset"]), v["split"], "--dataset")
    if len(train) == 0:
        raise UsageError("--dataset", f"{v['dataset']} (split {v['split']!r}) has no rows")
    fmt, kind = formatting_for(train, text_field=v["text_field"], chat=chat,
                               responses_only=bool(v["train_on_responses_only"]), flag="--dataset")
    if kind == "alpaca":
        note(f"--dataset: Alpaca rows (instruction / input / output) formatted as "
             f"{'chats (--chat_template)' if chat else 'prompt / completion in the Alpaca prompt'}")
    ev = None
    if d["eval_fraction"] is not None:
        parts = train.train_test_split(test_size=d["eval_fraction"], seed=v["seed"])
        train, ev = parts["train"], parts["test"]
    elif v["eval_dataset"] is not None:
        ev = load_rows(str(v["eval_dataset"]), v["eval_split"] or _default_eval_split(v["eval_dataset"]),
                       "--eval_dataset")
        efmt, _ = formatting_for(ev, text_field=v["text_field"], chat=chat,
                                 responses_only=bool(v["train_on_responses_only"]), flag="--eval_dataset")
        if (efmt is None) != (fmt is None):
            raise UsageError("--eval_dataset", "holds another row format than --dataset; give both in one format")
    return train, ev, fmt


def _default_eval_split(spec: str) -> str:
    return "train" if Path(str(spec)).expanduser().exists() else "test"


def _window_trainer() -> type:
    from ..train import Trainer
    from .data import TokenWindows

    class WindowTrainer(Trainer):
        """The Trainer, taking TokenWindows (already tokenised raw text) as it is."""

        def _prepare(self, dataset: Any, name: str) -> Any:
            if isinstance(dataset, TokenWindows):
                return dataset.examples()
            return super()._prepare(dataset, name)

    return WindowTrainer


def run(argv: list[str]) -> int:
    parser = build_parser()
    try:
        v, given = parse(argv, parser)
        d = check(v, given)
        train_rows, eval_rows, fmt = _data(v, d)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"minift train: error: {e}\n")
        return 2
    if v["adapter_file"] is not None:
        note("--adapter_file is unsloth's MLX option and is ignored: the adapter goes to "
             f"{Path(v['output_dir']) / 'final'}")
    if d["optim_note"]:
        note(f"--optim {v['optim']}: {d['optim_note']}")

    import minift

    name = str(v["model_name"])
    if Path(name).expanduser().is_dir():
        name = str(Path(name).expanduser().resolve())
    model, tok = minift.load(name, dtype=d["dtype"], max_seq_length=v["max_seq_length"],
                             load_in_4bit=bool(v["load_in_4bit"]))
    if v["chat_template"]:
        minift.get_chat_template(tok, v["chat_template"])
    minift.add_lora(model, r=v["r"], alpha=v["lora_alpha"], dropout=v["lora_dropout"], targets=d["targets"],
                    vision=bool(v["finetune_vision_layers"]), language=bool(v["finetune_language_layers"]),
                    attention=bool(v["finetune_attention_modules"]), mlp=bool(v["finetune_mlp_modules"]),
                    rslora=bool(v["use_rslora"]), dora=bool(v["use_dora"]), seed=v["random_state"],
                    modules_to_save=list(v["modules_to_save"]) or None)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    note(f"{name}: LoRA r={v['r']}, {n_train:,} trainable parameters")
    cfg = _train_config(v, d)
    trainer_cls = minift.train.Trainer
    if v["raw_text_file"] is not None:
        from .data import token_windows

        train_rows = token_windows(Path(v["raw_text_file"]).expanduser(), tok, d["chunk"], v["stride"])
        note(f"--raw_text_file: {train_rows.n_tokens:,} tokens in {len(train_rows)} windows of <= {d['chunk']} "
             f"(stride {v['stride']})")
        trainer_cls = _window_trainer()
    trainer = trainer_cls(model, tok, train_rows, eval_dataset=eval_rows, config=cfg, formatting_func=fmt)
    summary = trainer.train()
    msg = (f"trained {summary.steps} steps: loss {summary.losses[0]:.4f} -> {summary.losses[-1]:.4f}, "
           f"{summary.tokens_per_s:,.0f} tokens/s, peak memory {summary.peak_memory_gb:.2f} GB")
    if summary.eval_loss is not None:
        msg += f", eval loss {summary.eval_loss:.4f}"
    note(msg + f"; adapter: {summary.final_path}")

    from ..train import distributed

    with distributed.unsharded(model, trainer.world):  # FSDP: the whole weights, for rank 0 to write
        if not trainer.world.main:
            return 0  # under torchrun rank 0 alone saves and pushes
        return _save_and_push(model, tok, summary, v, d)


def _save_and_push(model: Any, tok: Any, summary: Any, v: dict[str, Any], d: dict[str, Any]) -> int:
    """--save_model's save, and the --push_model / --push_gguf uploads (the pushed folders are
    written by push_to_hub, which saves them with the same functions, plus a model card)."""
    import torch

    import minift

    push = dict(token=d["hub_token"], tokenizer=tok, summary=summary, overwrite=bool(v["overwrite"]))
    if d["gguf_dir"] is not None:  # --push_gguf of a run that saves no GGUF (pushed first: the main card wins)
        url = minift.push_to_hub(model, v["hub_path"], what="gguf", quant=d["quants"], staging_dir=d["gguf_dir"],
                                 **push)
        note(f"pushed the GGUF(s) in {d['gguf_dir']} to {url}")
    if not v["save_model"]:
        note("--save_model not given: saved only the adapter in " + str(summary.final_path))
        return 0
    sp = Path(v["save_path"]).expanduser()
    if v["save_gguf"]:
        what, kw = "gguf", {"quant": d["quants"], "modelfile": bool(v["modelfile"])}
    elif v["save_method"] == "lora":
        what, kw = "adapter", {}
    else:
        what, kw = "merged", {"dtype": "4bit" if v["save_method"] == "merged_4bit" else (
            torch.float16 if d["dtype"] == torch.float16 else torch.bfloat16)}
    if d["push_saved"]:  # --save_path is the staged folder: the same files as a plain save, plus README.md
        url = minift.push_to_hub(model, v["hub_path"], what=what, staging_dir=sp, **kw, **push)
        note(f"saved the {what} to {sp} and pushed it to {url}")
    elif what == "gguf":
        sp.mkdir(parents=True, exist_ok=True)
        paths = model.save_gguf(str(sp) + "/", d["quants"], tokenizer=tok, overwrite=bool(v["overwrite"]),
                                modelfile=bool(v["modelfile"]))
        for p in paths if isinstance(paths, list) else [paths]:
            note(f"saved {p}")
    elif what == "adapter":
        model.save_adapter(sp, tokenizer=tok, overwrite=bool(v["overwrite"]))
        note(f"saved the adapter to {sp}")
    else:
        model.save_merged(sp, kw["dtype"], tokenizer=tok, overwrite=bool(v["overwrite"]))
        note(f"saved the merged model ({v['save_method']}) to {sp}")
    return 0
