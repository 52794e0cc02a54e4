"""Model loading, written once for every script.

``--pretrained`` takes an open_clip tag (``laion2b_s32b_b79k``, ``openai``, ...), a local checkpoint path, or
``none`` for random init (tests). The QuickGELU trap: OpenAI's CLIP weights were trained with QuickGELU, but
open_clip's plain ``ViT-B-32`` config uses ``nn.GELU`` and open_clip 3.x only *warns* when the two are mixed.
The model then runs, with subtly wrong activations. ``load_model`` turns QuickGELU on whenever the tag says
the weights need it, so ``--model ViT-B-32 --pretrained openai`` is right as is. For a local checkpoint of
QuickGELU weights pass ``--force_quick_gelu``.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Callable, Optional

import torch

from prs_hook import UnsupportedModelError, check_supported
from utils import LOG
from utils.files.names import NO_WEIGHTS
from utils.errors import InputError



_DOWNLOAD_FAILED = "Failed to download weights"


class _DropDownloadError(logging.Filter):
    """Drops open_clip's log line about a failed download (the same message is raised as an ``InputError``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_DOWNLOAD_FAILED)


def default_device() -> str:
    """``cuda`` when available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_config(model_name: str) -> dict:
    """Fail fast, before any download, on an unknown name or an image tower we cannot decompose."""
    import open_clip

    if model_name.startswith(("hf-hub:", "local-dir:")):
        return {}
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        import difflib

        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See open_clip.list_models()."
        raise InputError(f"--model '{model_name}': unknown open_clip model.{hint}")
    vcfg = cfg.get("vision_cfg", {})
    if "timm_model_name" in vcfg:
        raise UnsupportedModelError(f"model '{model_name}': timm image towers are not supported")
    if isinstance(vcfg.get("layers"), (list, tuple)):
        raise UnsupportedModelError(f"model '{model_name}': ResNet image towers are not supported")
    if vcfg.get("attentional_pool"):
        raise UnsupportedModelError(f"model '{model_name}': attention pooling is not supported")
    if vcfg.get("pool_type", "tok") != "tok":
        raise UnsupportedModelError(f"model '{model_name}': pool_type '{vcfg['pool_type']}' (average pooling) "
                                    f"is not supported; needs CLS-token pooling")
    custom = [k for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                          "scale_fc") if vcfg.get(k)]
    if custom or vcfg.get("block_type") == "custom":
        raise UnsupportedModelError(f"model '{model_name}': custom attention blocks ({', '.join(custom) or 'custom'})"
                                    f" are not supported")
    return cfg


def _safetensors_error() -> type:
    """safetensors' error class (``Exception`` subclass), or a class nothing raises when it is missing."""
    try:
        from safetensors import SafetensorError
        return SafetensorError
    except ImportError:
        return type("_NoSafetensorError", (Exception,), {})


def _unusable_checkpoint(e: BaseException, weights: Optional[str], model_name: str) -> None:
    """Re-raise an error of loading a checkpoint file the user gave as one line; anything else as it is."""
    if weights is None or not os.path.isfile(weights):
        raise e  # not about a file the user gave: a real error
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise InputError(f"--pretrained {weights}: not a usable checkpoint of {model_name} "
                     f"({type(e).__name__}: {first[:200]})") from e


def load_model(
        model_name: str,
        pretrained: Optional[str],
        device: str | torch.device = "cpu",
        force_quick_gelu: bool = False,
        check_vision: bool = True,
) -> tuple[torch.nn.Module, Callable, Callable]:
    """Build an open_clip model in eval mode on ``device``.

    Returns ``(model, preprocess, tokenizer)``: ``preprocess`` is the eval transform for that tag or config.
    Raises ``InputError`` (unknown model or tag, missing or unusable checkpoint, weights that cannot be
    downloaded) or ``UnsupportedModelError``.
    """
    import open_clip

    cfg = _check_config(model_name) if check_vision else {}
    weights = None if pretrained is None or pretrained in NO_WEIGHTS else pretrained
    if weights is not None and not os.path.isfile(weights):
        tag_cfg = open_clip.get_pretrained_cfg(model_name, weights)
        if not tag_cfg:
            if os.path.sep in weights or weights.endswith((".pt", ".bin", ".safetensors", ".pth")):
                raise InputError(f"--pretrained '{weights}': checkpoint file not found")
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise InputError(f"--pretrained '{weights}': not a tag of {model_name} (known: {tags}) nor a file")
        if tag_cfg.get("quick_gelu", False) and not cfg.get("quick_gelu", False) and not force_quick_gelu:
            LOG.info(f"[load_model] '{weights}' weights were trained with QuickGELU: enabling it for {model_name}")
            force_quick_gelu = True
    quiet = _DropDownloadError()  # open_clip logs the failure on the root logger, then raises it: say it once
    logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=weights, force_quick_gelu=force_quick_gelu, device=device)
    except RuntimeError as e:
        if str(e).startswith(_DOWNLOAD_FAILED):  # open_clip wraps a failed download (offline, no cache)
            raise InputError(f"--pretrained {weights}: the {model_name} weights are not cached and could not be "
                             f"downloaded (offline? pass a checkpoint file instead): {e}") from e
        _unusable_checkpoint(e, weights, model_name)
    except (EOFError, KeyError, pickle.UnpicklingError, _safetensors_error()) as e:
        _unusable_checkpoint(e, weights, model_name)
    finally:
        logging.getLogger().removeFilter(quiet)
    model.eval()
    if check_vision:
        check_supported(model, model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, preprocess, tokenizer


def register_model_config(path: Optional[str]) -> None:
    """Register an extra open_clip config file or folder (``--model_config``)."""
    if not path:
        return
    import open_clip

    if not Path(path).exists():
        raise FileNotFoundError(f"--model_config {path}: not found")
    open_clip.add_model_config(path)
