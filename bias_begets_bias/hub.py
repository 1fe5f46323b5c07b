"""Model loading from the Hugging Face Hub or a local folder, for both folders: Stable Diffusion
pipelines (data generation in diffusion_from_scratch/synthetic_data.py, the audits in
statistical_auditing/) and any ``from_pretrained`` model (CLIP).

A Hub id is looked up in the local Hugging Face cache first and downloaded only when that fails
and downloads are allowed, so an offline machine fails at once with a message saying what to
download and where to put it, instead of hanging or printing a traceback.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bias_begets_bias import utils
from bias_begets_bias.cli import InputError

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


# ----------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else the available accelerator, else the CPU (see utils)."""
    return utils.resolve_device(str(device) if device is not None else "")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on the CPU; fp16/bf16 only on an accelerator; "auto" = fp16 there, fp32 on CPU."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if dtype not in DTYPES:
        raise InputError(f"--dtype: unknown dtype {dtype!r}; expected auto, fp32, fp16 or bf16")
    if device.type == "cpu" and dtype != "fp32":
        raise InputError(f"--dtype {dtype} needs an accelerator; on the CPU use --dtype fp32 (or auto)")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------- finding the files


def hub_offline() -> bool:
    """True when Hugging Face downloads are switched off (HF_HUB_OFFLINE, read at call time)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def looks_like_path(name: str) -> bool:
    """A Hub id is 'owner/name' or 'name'; anything else (absolute, ./, ~, a/b/c) is a path."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or os.sep != "/" and os.sep in name)


def missing_download_message(model: str, what: str, reason: str) -> str:
    from huggingface_hub import constants

    return (f"{what} {model!r} is not available here: {reason}. On a machine with network run "
            f"`hf download {model}` (older huggingface_hub: `huggingface-cli download {model}`), then "
            f"either copy its Hugging Face cache ({constants.HF_HUB_CACHE}, or set HF_HOME) to this "
            f"machine, or save the model to a folder (`save_pretrained`) and pass that folder's path "
            f"instead of the id")


def check_pipeline_folder(folder: Path, parts: tuple[str, ...] = PIPELINE_PARTS) -> Path:
    """Raise InputError unless ``folder`` holds a diffusers pipeline with the given parts."""
    if not (folder / "model_index.json").is_file():
        raise InputError(
            f"{folder} is not a diffusers Stable Diffusion pipeline folder: it has no model_index.json "
            f"(expected model_index.json and the subfolders {', '.join(parts)}, as written by "
            f"StableDiffusionPipeline.save_pretrained)")
    missing = [part for part in parts if not (folder / part).is_dir()]
    if missing:
        raise InputError(f"{folder} is not a complete Stable Diffusion pipeline: missing subfolder(s) "
                         f"{', '.join(missing)} (expected {', '.join(parts)})")
    return folder


def resolve_pipeline_folder(model: str, parts: tuple[str, ...] = PIPELINE_PARTS) -> Path:
    """A local folder holding ``model``'s pipeline files: the folder itself, or the Hub cache.

    Order: an existing folder; the local Hugging Face cache (no network); a download
    (skipped when HF_HUB_OFFLINE is set). Every failure is an InputError that names the model.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return check_pipeline_folder(path, parts)
    if path.exists():
        raise InputError(f"--model: {model} is a file; expected a diffusers pipeline folder or a Hub id")
    if looks_like_path(model):
        raise InputError(f"--model: no such folder {model} (expected a diffusers pipeline folder or a Hub id "
                         f"such as {DEFAULT_MODEL})")
    from diffusers import DiffusionPipeline

    try:  # the cache first: no network, and fast
        return check_pipeline_folder(Path(DiffusionPipeline.download(model, local_files_only=True)), parts)
    except InputError:
        raise
    except Exception as cache_error:  # noqa: BLE001 -- every library error becomes one message
        if hub_offline():
            raise InputError(missing_download_message(
                model, "Stable Diffusion model", "it is not in the local cache and HF_HUB_OFFLINE is set")) from cache_error
    try:
        return check_pipeline_folder(Path(DiffusionPipeline.download(model)), parts)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001
        raise InputError(missing_download_message(
            model, "Stable Diffusion model",
            f"it is not in the local cache and the download failed ({type(error).__name__}: {str(error)[:160]})")) from error


def load_hf_model(cls: Any, model: str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(model)`` for a folder or a Hub id: the local cache first, then a
    download unless HF_HUB_OFFLINE is set; failures are InputErrors naming ``model``."""
    path = Path(model).expanduser()
    if path.exists() or looks_like_path(model):
        if not path.is_dir():
            raise InputError(f"{what}: no such folder {model} (expected a folder written by save_pretrained or a Hub id)")
        try:
            return cls.from_pretrained(str(path), local_files_only=True, **kwargs)
        except Exception as error:  # noqa: BLE001
            raise InputError(f"{what}: cannot load {cls.__name__} from {path}: {type(error).__name__}: "
                             f"{str(error)[:300]}") from error
    try:
        return cls.from_pretrained(model, local_files_only=True, **kwargs)
    except Exception as cache_error:  # noqa: BLE001
        if hub_offline():
            raise InputError(missing_download_message(
                model, what, "it is not in the local cache and HF_HUB_OFFLINE is set")) from cache_error
    try:
        return cls.from_pretrained(model, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise InputError(missing_download_message(
            model, what, f"it is not in the local cache and the download failed "
                         f"({type(error).__name__}: {str(error)[:160]})")) from error
