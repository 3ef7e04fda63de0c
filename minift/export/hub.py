"""`push_to_hub`: a model's adapter, merged checkpoint or GGUF file(s), staged in a local folder
with a model card (README.md) and uploaded to a Hugging Face Hub repository.

The folder is staged first, through the same save functions and atomic writer as a local save
(`save_adapter`, `save_merged`, `save_gguf`), so a failed upload (no token, HF_HUB_OFFLINE=1, a
network or permission error) loses nothing: the error names the folder, and `push_folder` uploads
it again without the model. `push_folder` is the only function here that talks to the hub; its
`api` argument takes any object with huggingface_hub's `create_repo` / `upload_folder` methods
(default `huggingface_hub.HfApi(token=token)`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ExportError, HubError, InputError
from ..io.files import MANIFEST, atomic_dir, remove_dir
from ..io.hub import is_hub_id
from ..lora.peft import base_model_name
from ..lora.settings import settings_of
from .gguf import QUANT_ALIASES, SUPPORTED_QUANTS, _resolve_quants

logger = logging.getLogger(__name__)

WHATS = ("adapter", "merged", "gguf")
CARD = "README.md"
STAGING_ROOT = "minift-hub"  # default staging folders: ./minift-hub/<org>--<name>-<what>


def default_staging_dir(repo_id: str, what: str) -> Path:
    """Where `push_to_hub` stages when no staging_dir is given: ./minift-hub/<org>--<name>-<what>
    (removed after a successful upload, kept after a failed one)."""
    return Path(os.path.abspath(Path(STAGING_ROOT) / f"{repo_id.replace('/', '--')}-{what}"))


# ---- argument checks ------------------------------------------------------------------------------


def _check_repo_id(repo_id: Any, who: str) -> str:
    if not isinstance(repo_id, str) or not is_hub_id(repo_id):
        raise InputError(f"{who}: repo_id: expected a hub repository id 'org/name' (letters, digits, '-', '_', "
                         f"'.'), got {repo_id!r}")
    return repo_id


def _check_token(token: Any, who: str) -> None:
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise InputError(f"{who}: token: expected None (huggingface_hub's saved token) or a non-empty string, "
                         f"got {type(token).__name__}")


def _check_api(api: Any, who: str) -> None:
    if api is None:
        return
    missing = [m for m in ("create_repo", "upload_folder") if not callable(getattr(api, m, None))]
    if missing:
        raise InputError(f"{who}: api: expected None (huggingface_hub.HfApi) or an object with create_repo and "
                         f"upload_folder methods; {type(api).__name__} has no {' / '.join(missing)}")


def _check_bool(value: Any, name: str, who: str) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{who}: {name}: expected True or False, got {value!r}")


def _quant_names(quant: Any) -> list[str]:
    """The GGUF quant(s) asked for, checked (InputError naming `quant`)."""
    names = [quant] if isinstance(quant, str) else list(quant) if isinstance(quant, (list, tuple)) else None
    aliases = ", ".join(f"{k}={v}" for k, v in QUANT_ALIASES.items())
    if not names or not all(isinstance(n, str) for n in names):
        raise InputError(f"push_to_hub: quant: expected a GGUF quant name or a list of them "
                         f"({', '.join(SUPPORTED_QUANTS)}; aliases {aliases}), got {quant!r}")
    bad = [n for n in names if n.strip().lower() not in SUPPORTED_QUANTS]
    if bad:
        raise InputError(f"push_to_hub: quant: {', '.join(map(repr, bad))} not supported; supported: "
                         f"{', '.join(SUPPORTED_QUANTS)} (aliases {aliases})")
    return [n.strip().lower() for n in names]


def _check_dtype(dtype: Any) -> None:
    if isinstance(dtype, str) and dtype.lower() in ("4bit", "nf4"):
        return
    d = getattr(torch, dtype.replace("torch.", ""), None) if isinstance(dtype, str) else dtype
    if not (isinstance(d, torch.dtype) and d.is_floating_point):
        raise InputError(f"push_to_hub: dtype: expected a floating torch dtype (torch.bfloat16, torch.float16, "
                         f"torch.float32) or its name, or '4bit', got {dtype!r}")


def _summary_dict(summary: Any) -> dict[str, Any] | None:
    if summary is None:
        return None
    if isinstance(summary, Mapping):
        return dict(summary)
    if callable(getattr(summary, "to_dict", None)):
        out = summary.to_dict()
        if isinstance(out, Mapping):
            return dict(out)
    raise InputError(f"push_to_hub: summary: expected None, a TrainSummary (what Trainer.train() returns) or a "
                     f"dict, got {type(summary).__name__}")


# ---- the model card -------------------------------------------------------------------------------


def _minift_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("minift")
    except PackageNotFoundError:
        return "unknown"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _number(x: Any) -> str | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return f"{x:,}" if isinstance(x, int) else f"{x:.4f}"


def _training_lines(summary: dict[str, Any] | None) -> list[str]:
    if summary is None:
        return ["Not recorded here (pass `summary=`, what `Trainer.train()` returns, to `push_to_hub`)."]
    losses = summary.get("losses")
    final = summary.get("final_loss", losses[-1] if isinstance(losses, (list, tuple)) and losses else None)
    rows = [("optimizer steps", summary.get("steps")), ("tokens trained on", summary.get("tokens")),
            ("final training loss", final), ("eval loss", summary.get("eval_loss")),
            ("training time (s)", summary.get("time_s"))]
    out = [f"- {k}: {_number(v)}" for k, v in rows if _number(v) is not None]
    return out or ["No steps, tokens or losses in the summary given."]


def _lora_lines(model: nn.Module, what: str) -> list[str]:
    s = settings_of(model)
    if s is None:
        return ["No LoRA adapters (the model's own weights)."]
    kind = "DoRA" if s.dora else "LoRA"
    targets = s.target_modules if isinstance(s.target_modules, str) else ", ".join(s.target_modules)
    out = [f"- {kind} rank r = {s.r}, alpha = {s.alpha:g}{' (rsLoRA: alpha / sqrt(r))' if s.rslora else ''}, "
           f"dropout = {s.dropout:g}, init = {s.init}",
           f"- target modules: {targets or '(none)'}"]
    if s.modules_to_save:
        out.append(f"- trained in full: {', '.join(s.modules_to_save)}")
    if what != "adapter":
        out.append("- merged into these weights (in float32, before the cast or quantisation)")
    return out


def _usage(what: str, repo_id: str, files: list[str]) -> list[str]:
    if what == "adapter":
        return ["```python", "from peft import AutoPeftModelForCausalLM", "",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")', "```"]
    if what == "merged":
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```"]
    labels = [f[: -len(".gguf")].rsplit(".", 1)[-1] for f in files
              if f.endswith(".gguf") and not f.startswith("mmproj-")]
    label = labels[0] if labels else "Q8_0"
    return ["```bash", f"llama-cli -hf {repo_id}:{label}", f"ollama run hf.co/{repo_id}:{label}", "```"]


def model_card(model: nn.Module, repo_id: str, what: str, folder: Path, summary: dict[str, Any] | None) -> str:
    """README.md for the staged folder: hub metadata (base_model when it is a hub id, library,
    tags), the base, LoRA settings, training summary, files and how to load them."""
    from huggingface_hub import ModelCardData

    base = base_model_name(model)
    hub_base = base if base is not None and is_hub_id(base) else None
    s = settings_of(model)
    tags = ["minift"] + (["dora" if s.dora else "lora"] if s is not None else []) + (["gguf"] if what == "gguf" else [])
    meta = ModelCardData(base_model=hub_base, library_name={"adapter": "peft", "merged": "transformers"}.get(what),
                         tags=tags)
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST, CARD))
    kind = {"adapter": "A LoRA adapter (PEFT format)", "merged": "A merged transformers checkpoint",
            "gguf": "llama.cpp GGUF file(s)"}[what]
    if hub_base is not None:
        src = f"[`{hub_base}`](https://huggingface.co/{hub_base})"
    elif base is not None:
        src = f"a local model (`{Path(base).name}`; not on the hub under that name)"
    else:
        src = "an unnamed base model"
    lines = ["---", meta.to_yaml(), "---", "", f"# {repo_id.split('/', 1)[1]}", "",
             f"{kind} fine-tuned from {src} with minift {_minift_version()}.", ""]
    if what == "adapter" and hub_base is None and base is not None:
        lines += ["adapter_config.json names the base by its local path; load it with the base given "
                  "explicitly (`PeftModel.from_pretrained(base_model, repo)`).", ""]
    lines += ["## LoRA", "", *_lora_lines(model, what), "", "## Training", "", *_training_lines(summary), "",
              "## Files", "", *[f"- `{f}` ({_size((folder / f).stat().st_size)})" for f in files], "",
              "## Use", "", *_usage(what, repo_id, files), ""]
    return "\n".join(lines)


# ---- staging and upload ---------------------------------------------------------------------------


def _gguf_target(tmp: Path, quants: list[str], repo_id: str) -> Path:
    stem = repo_id.split("/", 1)[1]
    qs = _resolve_quants(quants)
    return tmp / (f"{stem}.{qs[0].label}.gguf" if len(qs) == 1 else f"{stem}.gguf")


def stage(
    model: nn.Module, repo_id: str, folder: Path, *, what: str, quant: list[str], dtype: Any, tokenizer: Any,
    summary: dict[str, Any] | None, overwrite: bool, modelfile: bool | str,
) -> Path:
    """Writes the folder `push_to_hub` uploads (arguments already checked), atomically: the
    save function's files plus README.md, or nothing."""
    from ..lora.peft import save_adapter
    from .gguf import save_gguf
    from .merged import save_merged

    with atomic_dir(folder, overwrite=overwrite, what=f"hub upload ({what})", error=ExportError) as tmp:
        # the save functions write into the (empty) temporary directory, replacing it atomically
        if what == "adapter":
            save_adapter(model, tmp, overwrite=True, tokenizer=tokenizer)
        elif what == "merged":
            save_merged(model, tmp, dtype, overwrite=True, tokenizer=tokenizer)
        else:
            save_gguf(model, _gguf_target(tmp, quant, repo_id), quant, tokenizer=tokenizer, modelfile=modelfile)
        (tmp / CARD).write_text(model_card(model, repo_id, what, tmp, summary))
    return folder


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = True,
    commit_message: str | None = None,
    api: Any = None,
) -> str:
    """Uploads a staged folder (what `push_to_hub` wrote, or any model folder) to `repo_id`,
    creating the repository if needed (private=True: a new repository is private; an existing
    one keeps its visibility). The one function here that talks to the hub: also the retry of
    a failed `push_to_hub`. token: default huggingface_hub's own (`hf auth login`, HF_TOKEN); a
    given `api` carries its own credentials. Returns the repository's URL.

    HubError, naming the folder (which is left as it is), when HF_HUB_OFFLINE=1, when there is
    no token, or when the hub refuses the upload."""
    who = "push_folder"
    repo_id = _check_repo_id(repo_id, who)
    _check_token(token, who)
    _check_api(api, who)
    _check_bool(private, "private", who)
    if commit_message is not None and not isinstance(commit_message, str):
        raise InputError(f"{who}: commit_message: expected None or a string, got {type(commit_message).__name__}")
    if not isinstance(folder, (str, os.PathLike)):
        raise InputError(f"{who}: folder: expected a directory path, got {type(folder).__name__}")
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    if not folder.is_dir() or not any(folder.iterdir()):
        raise InputError(f"{who}: folder: {folder} is not a directory holding files to upload")

    import huggingface_hub
    from huggingface_hub import constants as hf_constants

    retry = (f"the files are kept in {folder}; upload them with minift.push_folder({str(folder)!r}, {repo_id!r}"
             f"{', token=...' if api is None else ''}) or `hf upload {repo_id} {folder}`")
    if hf_constants.HF_HUB_OFFLINE:
        raise HubError(f"{repo_id}: HF_HUB_OFFLINE=1 forbids uploading; {retry} once online")
    if api is None:
        token = token or huggingface_hub.get_token()
        if not token:
            raise HubError(f"{repo_id}: no Hugging Face token (pass token=..., or log in with `hf auth login`, "
                           f"or set HF_TOKEN); {retry}")
        api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=commit_message or f"Upload {folder.name} with minift",
                          ignore_patterns=[MANIFEST])
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors all mean: not uploaded, retry later
        raise HubError(f"{repo_id}: the upload failed ({type(e).__name__}: {e}); {retry}") from e
    logger.info("push_folder: uploaded %s to %s", folder, repo_id)
    return str(url) if url else f"https://huggingface.co/{repo_id}"


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    what: str = "adapter",
    quant: str | Sequence[str] | None = None,
    dtype: torch.dtype | str | None = None,
    token: str | None = None,
    private: bool = True,
    tokenizer: Any = None,
    summary: Any = None,
    staging_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    modelfile: bool | str = False,
    commit_message: str | None = None,
    api: Any = None,
) -> str:
    """Stages `model` in a local folder with a model card and uploads it to the hub repository
    `repo_id` (created if needed; private=True makes a new one private). Returns its URL.

    what: "adapter" (PEFT's format, `save_adapter`), "merged" (a transformers checkpoint,
        `save_merged`; dtype default torch.bfloat16, or "4bit") or "gguf" (`save_gguf`; quant
        default "q8_0", or a list: one file each, `<name>.<QUANT>.gguf`).
    summary: what `Trainer.train()` returned (or a dict of its fields), for the card's training
        summary (steps, tokens, final loss); without it the card says it was not recorded.
    staging_dir: where the folder is staged (default ./minift-hub/<org>--<name>-<what>, removed
        after a successful upload); a staging_dir given is kept. An existing non-empty one needs
        overwrite=True.
    token / api / commit_message: as `push_folder`, which does the upload.

    Everything is checked before staging; staging is atomic; a failed upload (HubError: no token,
    HF_HUB_OFFLINE=1, the hub refused) keeps the staged folder and names it, for `push_folder`."""
    who = "push_to_hub"
    if not isinstance(model, nn.Module):
        raise InputError(f"{who}: model: expected a model minift.load returned, got {type(model).__name__}")
    repo_id = _check_repo_id(repo_id, who)
    if what not in WHATS:
        raise InputError(f"{who}: what: expected one of {', '.join(map(repr, WHATS))}, got {what!r}")
    if quant is not None and what != "gguf":
        raise InputError(f"{who}: quant: only applies to what='gguf' (got what={what!r}); use dtype= for a merged "
                         "model")
    if dtype is not None and what != "merged":
        raise InputError(f"{who}: dtype: only applies to what='merged' (got what={what!r})")
    if modelfile is not False and what != "gguf":
        raise InputError(f"{who}: modelfile: only applies to what='gguf' (got what={what!r})")
    quants = _quant_names("q8_0" if quant is None else quant) if what == "gguf" else []
    if dtype is None:
        dtype = torch.bfloat16
    _check_dtype(dtype)
    _check_token(token, who)
    _check_api(api, who)
    _check_bool(private, "private", who)
    _check_bool(overwrite, "overwrite", who)
    if what == "adapter" and settings_of(model) is None:
        raise InputError(f"{who}: what='adapter': the model has no adapters; call minift.add_lora or "
                         f"minift.load_adapter first, or push what='merged' / 'gguf'")
    info = _summary_dict(summary)
    if staging_dir is not None and not isinstance(staging_dir, (str, os.PathLike)):
        raise InputError(f"{who}: staging_dir: expected None or a directory path, got {type(staging_dir).__name__}")
    named = staging_dir is not None
    folder = Path(os.path.abspath(Path(staging_dir).expanduser())) if named else default_staging_dir(repo_id, what)
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ExportError(f"{who}: staging_dir: {folder} exists and is not empty (a previous push's staged files?); "
                          f"upload it as it is with minift.push_folder({str(folder)!r}, {repo_id!r}), or pass "
                          f"overwrite=True to stage anew")

    stage(model, repo_id, folder, what=what, quant=quants, dtype=dtype, tokenizer=tokenizer, summary=info,
          overwrite=overwrite, modelfile=modelfile)
    logger.info("push_to_hub: staged %s in %s", what, folder)
    url = push_folder(folder, repo_id, token=token, private=private, commit_message=commit_message, api=api)
    if not named:
        remove_dir(folder)
        try:
            folder.parent.rmdir()  # ./minift-hub, when this was its only folder
        except OSError:
            pass
    return url
