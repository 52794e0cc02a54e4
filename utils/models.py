"""Model loading, written once for every script.

``--pretrained`` takes an open_clip tag (``laion2b_s32b_b79k``, ``openai``, ...), a local checkpoint path, or
``none`` for random init (tests). The QuickGELU trap: OpenAI's CLIP weights were trained with QuickGELU, but
open_clip's plain ``ViT-B-32`` config uses ``nn.GELU`` and open_clip 3.x only *warns* when the two are mixed.
The model then runs, with subtly wrong activations. ``load_model`` turns QuickGELU on whenever the tag says
the weights need it, so ``--model ViT-B-32 --pretrained openai`` is right as is. For a local checkpoint of
QuickGELU weights pass ``--force_quick_gelu``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
from pathlib import Path
from typing import Callable, Optional

import torch

from prs_hook import UnsupportedModelError, check_supported
from utils import LOG
from utils.errors import InputError
from utils.files.names import NO_WEIGHTS

_DOWNLOAD_FAILED = "Failed to download weights"


class _DropDownloadError(logging.Filter):
    """Drops open_clip's log line about a failed download (the same message is raised as an ``InputError``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_DOWNLOAD_FAILED)


def default_device() -> str:
    """``cuda`` when available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device, flag: str = "--device") -> torch.device:
    """``device`` parsed, and usable on this machine; ``InputError`` naming ``flag`` otherwise (a CUDA device
    without a usable GPU, an index past the last GPU, a name torch does not know)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"{flag} {device}: not a torch device ({e})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{flag} {device}: no usable CUDA GPU on this machine (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"{flag} {device}: no usable Apple GPU (MPS) on this machine; use --device cpu")
    return parsed


# ----------------------------------------------------------------------------- weights: cached, or reachable
HF_WEIGHTS, HF_SAFE_WEIGHTS = "open_clip_pytorch_model.bin", "open_clip_model.safetensors"  # open_clip's defaults


def _hub_files(hf_hub: str) -> tuple[str, list[str]]:
    """The repository of an open_clip ``hf_hub`` entry (``org/repo/[file]``) and the files open_clip tries there, in
    its order: the safetensors alternative first."""
    repo, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS
    if filename == HF_WEIGHTS:
        return repo, [HF_SAFE_WEIGHTS, filename]
    if filename.endswith((".bin", ".pth")):
        return repo, [filename[:-4] + ".safetensors", filename]
    return repo, [filename]


def cached_weights(model_name: str, tag: str, cache_dir: Optional[str] = None) -> Optional[str]:
    """The local file of open_clip's ``tag`` weights of ``model_name`` when they are already downloaded (the
    Hugging Face cache, or open_clip's ``~/.cache/clip`` for URL downloads), else ``None``."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, files = _hub_files(cfg["hf_hub"])
        for name in files:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
        return None
    if cfg.get("url"):
        path = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        return str(path) if path.is_file() else None
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_weights_available(model_name: str, pretrained: Optional[str], cache_dir: Optional[str] = None,
                            timeout: float = 10.0) -> Optional[str]:
    """Fail fast, before any work, when the weights ``pretrained`` names cannot be had: a tag that is neither cached
    nor downloadable (offline, or ``HF_HUB_OFFLINE=1``), or a checkpoint file that does not exist.

    One request with a short ``timeout`` and no retries decides whether a download can work, instead of the
    minute of retries a download makes offline. Returns the cached file when there is one. Random init
    (``none``) and local files return ``None``.
    """
    import open_clip

    if pretrained is None or pretrained in NO_WEIGHTS or os.path.isfile(pretrained):
        return None
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        return None  # not a tag: load_model names the problem
    found = cached_weights(model_name, pretrained, cache_dir)
    if found:
        return found
    where = cfg.get("hf_hub") or cfg.get("url") or "?"
    advice = ("download them once on a machine with network (they go to the Hugging Face cache, HF_HOME, or "
              "--cache_dir), or pass --pretrained /path/to/checkpoint; without any weights, try the tiny test "
              "model: --model_config tests/configs --model prsclip-tiny --pretrained "
              "tests/golden/prsclip-tiny_seed0.safetensors")
    if _offline():
        raise InputError(f"--pretrained {pretrained}: the {model_name} weights ({where}) are not cached and "
                         f"HF_HUB_OFFLINE is set; {advice}")
    try:
        if cfg.get("hf_hub"):
            from huggingface_hub import get_hf_file_metadata, hf_hub_url

            repo, files = _hub_files(cfg["hf_hub"])
            get_hf_file_metadata(hf_hub_url(repo, files[-1]), timeout=timeout)
        else:
            import urllib.request

            urllib.request.urlopen(urllib.request.Request(cfg["url"], method="HEAD"), timeout=timeout).close()
    except Exception as e:  # no network, DNS, proxy, HTTP error: the download would fail too
        raise InputError(f"--pretrained {pretrained}: the {model_name} weights ({where}) are not cached and cannot "
                         f"be downloaded ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                         f"{advice}") from None
    return None


@contextlib.contextmanager
def _hub_offline(enabled: bool):
    """Within: the Hugging Face hub makes no request (the weights are cached; offline, each request would be
    retried for about a minute before the cache is used)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    before = getattr(constants, "HF_HUB_OFFLINE", None)
    if enabled and constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if enabled and constants is not None:
            constants.HF_HUB_OFFLINE = before


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
        raise InputError(f"--model '{model_name}': unknown open_clip model.{hint} A model of your own (such as the "
                         f"tests' prsclip-tiny) needs its config: --model_config FILE_OR_FOLDER")
    reason = unsupported_reason(cfg)
    if reason:
        raise UnsupportedModelError(f"model '{model_name}': {reason}")
    return cfg


_TIMM_FAMILIES = {  # timm module of the trunk -> why it cannot be decomposed (None: supported)
    "vision_transformer": None, "vision_transformer_hybrid": None, "eva": None,
    "convnext": "ConvNeXt image tower (convolutional): no attention heads to split",
    "fastvit": "FastViT image tower (hybrid convolutional/attention): no attention heads to split in its conv stages",
    "vitamin": "ViTamin image tower (hybrid convolutional/attention): no attention heads to split in its conv stages",
    "swin_transformer": "Swin image tower: windowed attention with relative position bias",
    "vision_transformer_relpos": "timm ViT with relative position bias in attention",
}


def unsupported_reason(cfg: dict) -> Optional[str]:
    """Why an open_clip model config's image tower cannot be decomposed (one line), or ``None`` if it can: read
    from the config alone, no weights (``open_clip.get_model_config(name)``). The engine checks the built tower
    again (``prs_hook.check_supported``)."""
    vcfg = cfg.get("vision_cfg", {})
    timm_name = vcfg.get("timm_model_name")
    if timm_name:
        import timm.models

        try:
            module = timm.models.get_arch_name(timm_name)
            module = timm.models._registry._model_to_module.get(module, "")
        except Exception:  # noqa: BLE001 - an unknown name: timm says so when the model is built
            module = ""
        family = module.rsplit(".", 1)[-1]
        if family not in _TIMM_FAMILIES:
            return f"timm image tower '{timm_name}' (timm module '{family or '?'}') is not supported"
        if _TIMM_FAMILIES[family]:
            return _TIMM_FAMILIES[family]
        if vcfg.get("timm_pool", "avg") not in ("map", "token", "avg", ""):
            return f"timm pooling '{vcfg['timm_pool']}' is not supported"
        if vcfg.get("timm_proj", "linear") == "mlp":
            return "an MLP projection after the timm tower (not linear) is not supported"
        return None
    if isinstance(vcfg.get("layers"), (list, tuple)):
        return "ModifiedResNet image tower (convolutional): no attention heads to split"
    if isinstance(vcfg.get("attentional_pool"), str):
        return f"attentional_pool='{vcfg['attentional_pool']}' (two poolers) is not supported"
    if vcfg.get("pool_type", "tok") not in ("tok", "avg"):
        return f"pool_type '{vcfg['pool_type']}' is not supported"
    custom = [k for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                          "scale_fc") if vcfg.get(k)]
    if custom or vcfg.get("block_type") == "custom":
        return f"custom attention blocks ({', '.join(custom) or 'custom'}) are not supported"
    return None


def coverage() -> list[tuple[str, str, Optional[str]]]:
    """Every pretrained (model, tag) pair of open_clip with why it is refused (``None``: supported), from the
    configs alone: ``[(model, tag, reason), ...]`` in ``open_clip.list_pretrained()`` order."""
    import open_clip

    return [(m, t, unsupported_reason(open_clip.get_model_config(m) or {})) for m, t in open_clip.list_pretrained()]


def coverage_table() -> str:
    """docs/towers.md: the coverage of open_clip's pretrained pairs as a Markdown page (``coverage()``)."""
    import open_clip

    rows = coverage()
    ok = sum(r is None for *_, r in rows)
    lines = ["# Image towers: which open_clip models decompose", "",
             f"Generated by `utils.models.coverage_table()` from open_clip {open_clip.__version__}'s configs (no "
             f"weights); `tests/test_towers.py` fails when this page drifts. **{ok} of {len(rows)}** pretrained "
             f"(model, tag) pairs are supported; the others are refused in one line (`UnsupportedModelError`).", "",
             "| model | tag | image tower | supported |", "|---|---|---|---|"]
    for m, t, reason in rows:
        v = (open_clip.get_model_config(m) or {}).get("vision_cfg", {})
        tower = v.get("timm_model_name") and f"timm `{v['timm_model_name']}` ({v.get('timm_pool', 'avg')} pool)"
        pool = "attentional pool" if v.get("attentional_pool") else f"{v.get('pool_type', 'tok')} pool"
        tower = tower or ("ModifiedResNet" if isinstance(v.get("layers"), (list, tuple)) else f"VisionTransformer ({pool})")
        lines.append(f"| {m} | {t} | {tower} | {'yes' if reason is None else 'no: ' + reason} |")
    return "\n".join(lines) + "\n"


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
        model_config: Optional[str | Path] = None,
        cache_dir: Optional[str] = None,
) -> tuple[torch.nn.Module, Callable, Callable]:
    """Build an open_clip model in eval mode on ``device``.

    Args:
        model_name: an open_clip name (``ViT-B-16``), ``hf-hub:org/repo``, or a model of ``model_config``.
        pretrained: an open_clip tag (``laion2b_s34b_b88k``, ``openai``), a checkpoint file, or ``none``.
        force_quick_gelu: QuickGELU whatever the config says (turned on by itself for tags trained with it).
        check_vision: refuse image towers the decomposition does not support.
        model_config: an extra open_clip config, a ``.json`` file or a folder of them (``register_model_config``),
            e.g. ``tests/configs`` for the tiny test model ``prsclip-tiny``.
        cache_dir: where downloaded weights go (open_clip's ``cache_dir``; default: the Hugging Face cache).

    Returns ``(model, preprocess, tokenizer)``: ``preprocess`` is the eval transform for that tag or config.
    Raises ``InputError`` (unknown model or tag, missing or unusable checkpoint, weights neither cached nor
    downloadable: in seconds, see ``check_weights_available``) or ``UnsupportedModelError``.
    """
    import open_clip

    register_model_config(model_config)
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
    cached = check_weights_available(model_name, weights, cache_dir) if weights is not None else None
    quiet = _DropDownloadError()  # open_clip logs the failure on the root logger, then raises it: say it once
    logging.getLogger().addFilter(quiet)
    try:
        with _hub_offline(cached is not None):
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights, force_quick_gelu=force_quick_gelu, device=device,
                cache_dir=cache_dir)
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
    register_timm_variants(path)


def register_timm_variants(path: str | Path) -> list[str]:
    """Register with timm the small variants named in ``timm_variants.json`` of a config folder (or beside a config
    file): ``{"name": {"base": "<timm model>", "kwargs": {...}}}``, so that an open_clip config can name them as
    ``timm_model_name`` (timm builds ``base`` with ``kwargs`` overriding its arguments; no weights). Returns the
    names registered."""
    import json

    path = Path(path)
    spec = (path if path.is_dir() else path.parent) / "timm_variants.json"
    if not spec.is_file():
        return []
    import timm
    from timm.models import register_model

    names = []
    for name, v in json.loads(spec.read_text()).items():
        if name in timm.list_models(name):
            names.append(name)
            continue
        base = timm.models.model_entrypoint(v["base"])

        def variant(pretrained: bool = False, _base=base, _kwargs=dict(v.get("kwargs", {})), **kwargs):
            return _base(pretrained=False, **{**_kwargs, **kwargs})

        variant.__name__ = variant.__qualname__ = name
        variant.__module__ = base.__module__
        register_model(variant)
        names.append(name)
    return names
