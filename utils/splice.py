"""SpLiCE (Bhalla, Oesterling et al. 2024): a CLIP image embedding as a sparse, non-negative sum of concepts.

The math, with SpLiCE's conventions:

* Concepts. Each vocabulary line is embedded with the text tower and normalised; the mean over the vocabulary is
  subtracted and every row normalised again: the dictionary ``C`` [T, d].
* Image. ``z = normalise(encode_image(x))``; the target is ``normalise(z - mu)``, with ``mu`` [d] the mean of the
  normalised image embeddings of a reference set (SpLiCE ships one per backbone, computed on MSCOCO).
* Solve ``min_w |C^T w - target|^2 + l1_penalty * sum(w)`` over ``w >= 0`` [T]:
    - ``active_set`` (the default): the exact minimiser, by a working-set active-set method batched over images
      (``utils.solvers.active_set.ActiveSetLasso``): KKT residual ~1e-15, the same supports as ``skl``;
    - ``skl``: scikit-learn ``Lasso(alpha=l1_penalty / (2 d), positive=True, fit_intercept=False,
      max_iter=10000, tol=1e-6)``, one image at a time (SpLiCE's exact path);
    - ``admm``: SpLiCE's ADMM (rho 5, tolerance 1e-6, at most 2000 iterations), batched over images, each image
      stopping on its own residuals (``utils.solvers.nnlasso.ScreenedADMM``). Starts from zero, not from SpLiCE's
      random draw: same minimiser, weights within ~1e-5 of ``skl``.
* Recompose ``z_hat = normalise(normalise(w C) + mu)``; report L0 (non-zero weights) and ``cosine = <z_hat, z>``.
* ``vocabulary_size = k`` keeps the LAST k lines of the file (the files run from the least to the most
  frequent concept); 0, a negative size or one >= the file's means every line. Empty lines are skipped.

The Python API mirrors SpLiCE's ``splice`` package (``load``, ``get_vocabulary``, ``get_preprocess``,
``get_tokenizer``, ``available_models``, ``decompose_image``, ``decompose_classes``, ``decompose_dataset`` and the
``SPLICE`` module); the scripts ``decompose_image.py``, ``decompose_data.py``, ``concept_distribution.py`` and
``compute_image_mean.py`` are thin layers over the helpers below (their flags: ``utils.cli.add_splice_args`` /
``add_dataset_args``, read into ``SpliceSettings`` / ``DatasetSettings``). Messages go to ``log`` callables,
by default the ``utils.splice`` logger. See docs/splice.md.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.datasets import class_column, load_rgb
from utils.errors import InputError
from utils.files.names import NO_WEIGHTS, pretrained_name, splice_concepts_path
from utils.models import default_device, load_model, register_model_config
from utils.text.sets import EXTERNAL, SPLICE_FILES, TEXT_DIR, fetch_original

__all__ = ["SPLICE", "load", "get_vocabulary", "get_preprocess", "get_tokenizer", "available_models",
           "decompose_image", "decompose_classes", "decompose_dataset"]

# ----------------------------------------------------------------------------- backbones
# SpLiCE's name -> (open_clip model, weights, SpLiCE's image mean for exactly those weights)
SPLICE_BACKBONES = {
    "clip:ViT-B/32": ("ViT-B-32", "openai", "clip_ViT-B-32_image.pt"),
    "clip:ViT-B/16": ("ViT-B-16", "openai", "clip_ViT-B-16_image.pt"),
    "clip:RN50": ("RN50", "openai", "clip_RN50_image.pt"),
    "open_clip:ViT-B-32": ("ViT-B-32", "laion2b_s34b_b79k", "open_clip_ViT-B-32_image.pt"),
}
MEAN_OF_WEIGHTS = {(model, tag): mean for model, tag, mean in SPLICE_BACKBONES.values()}
DEFAULT_MODEL = "open_clip:ViT-B-32"


_LOG = logging.getLogger(__name__)


def note(message: str) -> None:
    """The default ``log`` of this module's functions: an INFO message of the ``utils.splice`` logger (the
    scripts pass ``utils.cli.note``, which prints to stderr)."""
    _LOG.info(message)


def available_models() -> dict[str, list[str]]:
    """SpLiCE's backbones with a shipped image mean, ``{library: [model, ...]}``. Any open_clip model also works
    with ``pretrained=`` and an image mean (``image_mean=`` / ``compute_image_mean.py``)."""
    out: dict[str, list[str]] = {}
    for name in SPLICE_BACKBONES:
        library, model = name.split(":", 1)
        out.setdefault(library, []).append(model)
    return out


@dataclass(frozen=True)
class Backbone:
    """A resolved ``-model`` / ``--pretrained`` pair."""
    name: str  # as given: "clip:ViT-B/32", "open_clip:ViT-B-32", "ViT-L-14", ...
    open_clip_name: str  # "ViT-B-32"
    pretrained: str  # open_clip tag, checkpoint path or "none"
    quick_gelu: bool  # OpenAI weights: QuickGELU
    mean_file: Optional[str]  # SpLiCE's image mean for these weights (a SPLICE_FILES name), or None

    @property
    def label(self) -> str:
        """``{model}_{weights}`` for file names (``clip:ViT-B/32`` -> ``clip-ViT-B-32_openai``)."""
        return f"{_safe(self.name)}_{pretrained_name(self.pretrained)}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def resolve_backbone(name: str, pretrained: Optional[str] = None) -> Backbone:
    """``[library:]model`` (SpLiCE's syntax; no library means open_clip) and weights -> ``Backbone``.

    ``clip:`` names are OpenAI's CLIP models, loaded through open_clip with their OpenAI weights (``pretrained``
    may point to a local copy of them). ``open_clip:ViT-B-32`` defaults to SpLiCE's LAION-2B weights; any other
    open_clip model needs ``pretrained`` (a tag, a checkpoint or ``none``). SpLiCE's image mean is used only
    for the weights it was computed for (a local checkpoint is taken to be the default weights of that name).
    """
    library, sep, model = name.partition(":")
    if not sep:
        library, model = "open_clip", name
    if library not in ("clip", "open_clip") or not model:
        raise InputError(f"-model {name}: use [library:]model with library clip or open_clip "
                         f"(e.g. {', '.join(SPLICE_BACKBONES)})")
    known = SPLICE_BACKBONES.get(f"{library}:{model}")
    if library == "clip" and known is None:
        raise InputError(f"-model {name}: the clip library has {', '.join(available_models()['clip'])}; "
                         f"for other models use open_clip:NAME --pretrained TAG|PATH|none")
    open_clip_name, default_tag = (known[0], known[1]) if known else (model, None)
    weights = pretrained if pretrained is not None else default_tag
    if weights is None:
        raise InputError(f"-model {name}: no default weights for this model; pass --pretrained TAG|PATH|none")
    is_file = os.path.isfile(weights) or os.path.sep in weights
    tag = default_tag if is_file else weights
    mean = None if weights in NO_WEIGHTS else MEAN_OF_WEIGHTS.get((open_clip_name, tag))
    return Backbone(name, open_clip_name, weights, library == "clip", mean)


def load_backbone(backbone: Backbone, device: str | torch.device = "cpu", model_config: Optional[str] = None):
    """(model, preprocess, tokenizer) in eval mode; any image tower (SpLiCE needs only encode_image/encode_text)."""
    register_model_config(model_config)
    return load_model(backbone.open_clip_name, backbone.pretrained, device, force_quick_gelu=backbone.quick_gelu,
                      check_vision=False)


def get_tokenizer(name: str):
    """The tokenizer of a backbone (``open_clip:ViT-B-32``, ``clip:RN50``, any open_clip name)."""
    import open_clip

    library, sep, model = name.partition(":")
    known = SPLICE_BACKBONES.get(name)
    return open_clip.get_tokenizer(known[0] if known else (model if sep else name))


def get_preprocess(name: str, pretrained: Optional[str] = None):
    """The eval image transform of a backbone and its weights, built from the configs (no model is created)."""
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    bb = resolve_backbone(name, pretrained if pretrained is not None else
                          (None if SPLICE_BACKBONES.get(name) else "none"))
    model_cfg = open_clip.get_model_config(bb.open_clip_name)
    if model_cfg is None:
        raise InputError(f"-model {name}: unknown open_clip model '{bb.open_clip_name}'")
    cfg = asdict(PreprocessCfg())
    size = model_cfg.get("vision_cfg", {}).get("image_size")
    if size:
        cfg["size"] = size
    cfg = merge_preprocess_dict(cfg, model_cfg.get("preprocess_cfg", {}))
    if bb.pretrained not in NO_WEIGHTS and not os.path.isfile(bb.pretrained):
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(bb.open_clip_name, bb.pretrained) or {})
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


# ----------------------------------------------------------------------------- vocabularies and means
SPLICE_VOCABULARIES = ("laion", "laion_bigrams", "mscoco")  # fetched from SpLiCE's repository, hash-pinned
# the project's own word lists (text_descriptions/), no download; reversed: most frequent concept last, as SpLiCE's
LOCAL_VOCABULARIES = {
    "words": ("words_10000.txt", True),
    "common_words": ("common_words_3500.txt", True),
    "image_descriptions": ("image_descriptions_3500.txt", False),
}
DEFAULT_DOWNLOAD_ROOT = TEXT_DIR / EXTERNAL / "splice"


def fetch_splice_file(name: str, download_root: Optional[str | Path] = None, base_url: Optional[str] = None,
                      log: Callable[[str], None] = note) -> Path:
    """SpLiCE's file ``name`` (a ``SPLICE_FILES`` key) in ``download_root``, downloaded and SHA-256 checked if
    missing. ``base_url``: a mirror folder (``https://...`` or ``file:///...``) instead of GitHub."""
    root = Path(download_root) if download_root else DEFAULT_DOWNLOAD_ROOT
    path = root / name
    if path.is_file():
        return path
    try:
        return fetch_original([name], root, base_url=base_url, sources=SPLICE_FILES, log=log)[name]
    except OSError as e:  # offline, or the mirror lacks it
        raise InputError(f"{name}: not in {root} and the download failed ({e}); put the file there "
                         f"(--download_root) or pass a mirror with --base_url") from e


def vocabulary_file(vocabulary: str, download_root: Optional[str | Path] = None, base_url: Optional[str] = None,
                    log: Callable[[str], None] = note) -> tuple[Path, bool]:
    """(path, reversed) of ``-vocab``: SpLiCE's name (fetched), one of ours, or a text file."""
    if vocabulary in SPLICE_VOCABULARIES:
        return fetch_splice_file(f"{vocabulary}.txt", download_root, base_url, log), False
    if vocabulary in LOCAL_VOCABULARIES:
        file, reverse = LOCAL_VOCABULARIES[vocabulary]
        return TEXT_DIR / file, reverse
    path = Path(vocabulary)
    if path.is_file():
        return path, False
    raise InputError(f"-vocab {vocabulary}: not a file, nor one of SpLiCE's vocabularies "
                     f"({', '.join(SPLICE_VOCABULARIES)}) or ours ({', '.join(LOCAL_VOCABULARIES)})")


def read_vocabulary(path: str | Path, vocabulary_size: int = 0, reverse: bool = False,
                    log: Callable[[str], None] = note) -> list[str]:
    """The concepts of a vocabulary file: its last ``vocabulary_size`` lines (all for <= 0 or >= the file's),
    stripped, empty ones skipped (with one notice). ``reverse`` reads the file bottom-up first."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"-vocab {path}: not UTF-8 text ({e})") from e
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    if reverse:
        lines = lines[::-1]
    if 0 < vocabulary_size < len(lines):
        lines = lines[-vocabulary_size:]
    stripped = [line.strip() for line in lines]
    concepts = [c for c in stripped if c]
    if len(concepts) < 2:
        what = "no concepts (the file is empty or blank)" if not concepts else "1 concept"
        raise InputError(f"-vocab {path}: {what}; the concepts are centred over the vocabulary, so it needs at "
                         f"least 2 non-empty lines")
    if len(concepts) < len(stripped):
        log(f"note: -vocab {path}: skipped {len(stripped) - len(concepts)} empty line(s); {len(concepts)} concepts")
    return concepts


def get_vocabulary(name: str, vocabulary_size: int = -1, download_root: Optional[str | Path] = None,
                   base_url: Optional[str] = None) -> list[str]:
    """The concept strings of a vocabulary, in dictionary row order (see ``read_vocabulary``)."""
    path, reverse = vocabulary_file(name, download_root, base_url)
    return read_vocabulary(path, vocabulary_size, reverse, log=lambda s: None)


def read_image_mean(path: str | Path, what: str = "--image_mean") -> torch.Tensor:
    """An image mean from a ``.pt`` (torch tensor) or ``.npy`` file -> float32 [d]; [1, d] is flattened."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: not found")
    if path.suffix == ".npy":
        mean = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        try:
            mean = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file
            raise InputError(f"{what} {path}: not a torch tensor file ({type(e).__name__}: {e})") from e
        if not isinstance(mean, torch.Tensor):
            raise InputError(f"{what} {path}: holds a {type(mean).__name__}, expected a tensor [d]")
    if mean.ndim == 2 and mean.shape[0] == 1:
        mean = mean[0]  # a [1, d] mean would make SpLiCE's skl solver take d = 1 (its alpha = l1 / (2 d))
    if mean.ndim != 1 or not mean.is_floating_point() or not torch.isfinite(mean).all():
        raise InputError(f"{what} {path}: expected a finite float vector [d], got {mean.dtype} {tuple(mean.shape)}")
    return mean.float()


def load_image_mean(backbone: Backbone, image_mean: Optional[str | Path] = None,
                    download_root: Optional[str | Path] = None, base_url: Optional[str] = None,
                    log: Callable[[str], None] = note) -> torch.Tensor:
    """``image_mean`` if given, else SpLiCE's mean for these weights (fetched); else a clear error."""
    if image_mean is not None:
        return read_image_mean(image_mean)
    if backbone.mean_file is None:
        raise InputError(
            f"no image mean for -model {backbone.name} --pretrained {backbone.pretrained}: pass --image_mean FILE "
            f"(.pt or .npy, [d]), compute one with compute_image_mean.py, or use a backbone SpLiCE ships a mean for "
            f"({', '.join(f'{n} ({w[1]})' for n, w in SPLICE_BACKBONES.items())})")
    return read_image_mean(fetch_splice_file(backbone.mean_file, download_root, base_url, log), "SpLiCE mean")


# ----------------------------------------------------------------------------- the dictionary
@torch.no_grad()
def embed_concepts(model: nn.Module, tokenizer: Callable, concepts: Sequence[str],
                   device: str | torch.device = "cpu", batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """SpLiCE's dictionary [T, d] (float32): text embeddings normalised, centred over the concepts, normalised.

    SpLiCE embeds one line at a time; batches change the dictionary by ~5e-7.
    """
    from utils.text.embeddings import encode_texts

    return centre_concepts(encode_texts(model, tokenizer, concepts, device, batch_size, progress))


def centre_concepts(embeddings: torch.Tensor) -> torch.Tensor:
    """normalise -> subtract the mean over concepts -> normalise ([T, d])."""
    c = F.normalize(embeddings.float(), dim=1)
    return F.normalize(c - c.mean(0), dim=1)


def concepts_digest(concepts: Sequence[str]) -> str:
    """SHA-256 of the concept list (what a cached dictionary was made from)."""
    return hashlib.sha256("\n".join(concepts).encode("utf-8")).hexdigest()


def concept_cache_path(folder: str | Path, backbone: Backbone, vocabulary: str, vocabulary_size: int) -> Path:
    """``splice_concepts_{model}_{weights}_{vocab}_{size|full}.npy`` in ``folder``."""
    vocab = Path(vocabulary).stem if vocabulary not in SPLICE_VOCABULARIES + tuple(LOCAL_VOCABULARIES) else vocabulary
    return splice_concepts_path(folder, backbone.label, _safe(vocab), vocabulary_size)


def cached_dictionary(path: Path, key: dict, build: Callable[[], torch.Tensor], record: dict,
                      log: Callable[[str], None] = note) -> torch.Tensor:
    """The dictionary at ``path`` if its provenance record has ``key``, else ``build()`` it and save it there."""
    from utils.files.provenance import read_provenance, save_output

    rec = read_provenance(path) if path.is_file() else None
    if rec is not None and rec.get("concepts_key") == key:
        log(f"reusing the concept embeddings {path}")
        return torch.from_numpy(np.load(path))
    if rec is not None:
        log(f"{path}: made from other concepts or weights; recomputing it")
    dictionary = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_output(path, dictionary.cpu().numpy().astype(np.float32), {**record, "concepts_key": key})
    log(f"wrote {path} [{dictionary.shape[0]}, {dictionary.shape[1]}]")
    return dictionary


# ----------------------------------------------------------------------------- solving
SOLVERS = ("active_set", "admm", "skl")


def solve_skl(dictionary: torch.Tensor, targets: torch.Tensor, l1_penalty: float) -> torch.Tensor:
    """SpLiCE's exact path: one scikit-learn positive Lasso per target -> weights [n, T] (float32, CPU).

    ``alpha = l1_penalty / (2 d)`` with d from the dictionary (SpLiCE takes it from the image mean).
    """
    from sklearn.linear_model import Lasso

    X = dictionary.detach().float().cpu().numpy().T  # [d, T], the transposed view SpLiCE passes
    Y = targets.detach().float().cpu().numpy()
    clf = Lasso(alpha=l1_penalty / (2 * X.shape[0]), fit_intercept=False, positive=True, max_iter=10000, tol=1e-6)
    out = np.zeros((len(Y), X.shape[1]), dtype=np.float32)
    for i, y in enumerate(Y):
        out[i] = clf.fit(X, y).coef_
    return torch.from_numpy(out)


def check_l1_penalty(l1_penalty) -> float:
    if l1_penalty is None or not float(l1_penalty) > 0 or not np.isfinite(float(l1_penalty)):
        raise InputError(f"-l1_penalty {l1_penalty}: must be a number > 0 (larger: sparser decompositions)")
    return float(l1_penalty)


class SPLICE(nn.Module):
    """A sparse, non-negative decomposer of CLIP embeddings over a concept dictionary (SpLiCE's ``SPLICE``).

    Args:
        image_mean: [d] (a [1, d] mean is flattened) the mean of normalised image embeddings.
        dictionary: [T, d] the concept dictionary (``centre_concepts``).
        clip: a module with ``encode_image`` / ``encode_text``; None: inputs are embeddings already.
        solver: ``active_set`` (exact, batched; this project's default), ``admm`` (batched ADMM) or ``skl``
            (SpLiCE's default, its per-image scikit-learn loop).
        l1_penalty: the weight of ``sum(w)``; larger is sparser.
        return_weights: ``encode_image`` returns the weights [b, T] instead of the recomposition [b, d].
        return_cosine: ``encode_image`` also returns the cosine [b] of recomposition and embedding (per image;
            SpLiCE returns its sum over the batch).
        decomp_text, text_mean: decompose text too, centred with ``text_mean`` [d].
        device: where the dictionary, the mean and the solver live.
        admm_batch_size: images solved together by ``admm`` and ``active_set`` (default: 64 and 256 on CPU,
            1024 on GPU).
    """

    def __init__(self, image_mean: torch.Tensor, dictionary: torch.Tensor, clip: Optional[nn.Module] = None,
                 solver: str = "active_set", l1_penalty: float = 0.01, return_weights: bool = False,
                 return_cosine: bool = False, decomp_text: bool = False, text_mean: Optional[torch.Tensor] = None,
                 device: str | torch.device = "cpu", admm_batch_size: Optional[int] = None):
        super().__init__()
        if solver not in SOLVERS:
            raise InputError(f"-solver {solver}: must be one of {', '.join(SOLVERS)}")
        image_mean = torch.as_tensor(image_mean).float()
        if image_mean.ndim == 2 and image_mean.shape[0] == 1:
            image_mean = image_mean[0]
        dictionary = torch.as_tensor(dictionary).float()
        if dictionary.ndim != 2 or image_mean.shape != dictionary.shape[1:]:
            raise InputError(f"SPLICE: the image mean {tuple(image_mean.shape)} and the dictionary "
                             f"{tuple(dictionary.shape)} must be [d] and [T, d] with the same d (a mean of another "
                             f"model? see --image_mean)")
        self.device = torch.device(device)
        self.clip = clip.to(self.device) if clip is not None else None
        self.register_buffer("image_mean", image_mean.to(self.device))
        self.register_buffer("dictionary", dictionary.to(self.device))
        self.register_buffer("text_mean", None if text_mean is None else torch.as_tensor(text_mean).float()
                             .reshape(-1).to(self.device))
        self.solver = solver
        self.l1_penalty = check_l1_penalty(l1_penalty)
        self.return_weights, self.return_cosine, self.decomp_text = return_weights, return_cosine, decomp_text
        self.admm_batch_size = admm_batch_size
        self._solvers: dict = {}

    # -- solving
    def _solver(self):
        """The ``admm`` or ``active_set`` solver over the current dictionary (built once)."""
        from utils.solvers.active_set import ActiveSetLasso
        from utils.solvers.nnlasso import ScreenedADMM

        key = (self.solver, self.dictionary.data_ptr(), self.dictionary.device, tuple(self.dictionary.shape))
        if key not in self._solvers:
            make = ActiveSetLasso if self.solver == "active_set" else ScreenedADMM
            self._solvers = {key: make(self.dictionary, device=self.dictionary.device)}
        return self._solvers[key]

    @torch.no_grad()
    def decompose(self, embedding: torch.Tensor) -> torch.Tensor:
        """Weights [b, T] (>= 0, sparse) of targets [b, d] (normalised, centred embeddings).

        ``active_set`` warns (``warnings``) when some decompositions are not certified optimal."""
        if self.solver == "skl":
            return solve_skl(self.dictionary, embedding, self.l1_penalty).to(self.device)
        if self.solver == "admm":
            bs = self.admm_batch_size or (1024 if self.dictionary.is_cuda else 64)
            return self._solver().fit(embedding.float(), self.l1_penalty, batch_size=bs, as_numpy=False)
        bs = self.admm_batch_size or (1024 if self.dictionary.is_cuda else 256)
        weights, report = self._solver().fit(embedding.float(), self.l1_penalty, batch_size=bs, as_numpy=False,
                                             return_report=True)
        if len(report.uncertified):
            warnings.warn(f"SpLiCE active_set: {len(report.uncertified)} of {len(weights)} decompositions are not "
                          f"certified optimal (KKT residual up to {report.kkt.max():.2e}; working set or round cap "
                          f"reached): their weights are the best found")
        return weights

    def _recompose(self, weights: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.normalize(weights @ self.dictionary, dim=1) + mean, dim=1)

    def recompose_image(self, weights: torch.Tensor) -> torch.Tensor:
        """Dense embeddings [b, d] of weights [b, T]: ``normalise(normalise(w C) + mu)``."""
        return self._recompose(weights, self.image_mean)

    def recompose_text(self, weights: torch.Tensor) -> torch.Tensor:
        """As ``recompose_image``, with the text mean."""
        if self.text_mean is None:
            raise ValueError("SPLICE.recompose_text: no text_mean was given")
        return self._recompose(weights, self.text_mean)

    # -- images
    def _embed_images(self, image: torch.Tensor) -> torch.Tensor:
        if self.clip is not None:
            self.clip.eval()
            with torch.no_grad():
                image = self.clip.encode_image(image.to(self.device))
        return F.normalize(image.float().to(self.device), dim=1)

    def _weights(self, z: torch.Tensor) -> torch.Tensor:
        return self.decompose(F.normalize(z - self.image_mean, dim=1))

    def encode_image(self, image: torch.Tensor):
        """Preprocessed images [b, 3, H, W] (or embeddings [b, d] when ``clip`` is None) -> the weights [b, T]
        (``return_weights``) or the recomposition [b, d]; with ``return_cosine`` a pair (that, cosine [b])."""
        z = self._embed_images(image)
        weights = self._weights(z)
        if self.return_weights and not self.return_cosine:
            return weights
        recon = self.recompose_image(weights)
        if self.return_cosine:
            return (weights if self.return_weights else recon), (recon * z).sum(1)
        return recon

    def intervene_image(self, image: torch.Tensor, intervention_indices: Iterable[int]) -> torch.Tensor:
        """``encode_image`` with the weights of the concepts ``intervention_indices`` set to zero (after the
        decomposition; the others are unchanged) -> weights [b, T] or recomposition [b, d]."""
        weights = self._weights(self._embed_images(image))
        weights[:, list(intervention_indices)] = 0
        return weights if self.return_weights else self.recompose_image(weights)

    # -- text
    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Tokens [b, 77] (or embeddings [b, d] when ``clip`` is None) -> normalised embeddings [b, d]; with
        ``decomp_text`` their weights [b, T] (``return_weights``) or recomposition [b, d]."""
        if self.clip is not None:
            self.clip.eval()
            with torch.no_grad():
                text = self.clip.encode_text(text.to(self.device))
        text = F.normalize(text.float().to(self.device), dim=1)
        if not self.decomp_text:
            return text
        if self.text_mean is None:
            raise ValueError("SPLICE.encode_text: decomp_text needs a text_mean")
        weights = self.decompose(F.normalize(text - self.text_mean, dim=1))
        return weights if self.return_weights else self.recompose_text(weights)

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        """(``encode_image(image)``, ``encode_text(text)``)."""
        return self.encode_image(image), self.encode_text(text)


def load(name: str, vocabulary: str, vocabulary_size: int = -1, device: Optional[str | torch.device] = None,
         download_root: Optional[str | Path] = None, *, pretrained: Optional[str] = None,
         model_config: Optional[str] = None, image_mean: Optional[str | Path] = None,
         cache_dir: Optional[str | Path] = None, base_url: Optional[str] = None, text_batch_size: int = 256,
         log: Callable[[str], None] = note, **kwargs) -> SPLICE:
    """A ``SPLICE`` over backbone ``name`` and ``vocabulary`` (SpLiCE's ``splice.load``).

    Args:
        name: ``clip:ViT-B/32``, ``clip:ViT-B/16``, ``clip:RN50``, ``open_clip:ViT-B-32`` or any open_clip name
            (``[open_clip:]NAME`` with ``pretrained``).
        vocabulary: ``laion``, ``laion_bigrams``, ``mscoco`` (fetched), ``words``, ``common_words``,
            ``image_descriptions`` (ours) or a text file, one concept per line.
        vocabulary_size: keep the last k lines (<= 0: all).
        device: default cuda if available.
        download_root: where SpLiCE's files are (fetched there if missing).
        pretrained, model_config: weights (tag, checkpoint, ``none``) and an extra open_clip config.
        image_mean: a ``.pt`` / ``.npy`` mean [d] instead of SpLiCE's.
        cache_dir: where the concept embeddings are cached (default: not cached).
        base_url: a mirror of SpLiCE's files.
        kwargs: ``SPLICE`` arguments (``l1_penalty``, ``return_weights``, ``solver``, ...).
    """
    device = device or default_device()
    backbone = resolve_backbone(name, pretrained)
    mean = load_image_mean(backbone, image_mean, download_root, base_url, log)  # before the model: fail fast
    path, reverse = vocabulary_file(vocabulary, download_root, base_url, log)
    concepts = read_vocabulary(path, vocabulary_size, reverse, log=log)
    model, _, tokenizer = load_backbone(backbone, device, model_config)
    dictionary = concept_dictionary(model, tokenizer, concepts, backbone, vocabulary, vocabulary_size, device,
                                    cache_dir, text_batch_size, log)
    return SPLICE(mean, dictionary, clip=model, device=device, **kwargs)


def concept_dictionary(model, tokenizer, concepts: Sequence[str], backbone: Backbone, vocabulary: str,
                       vocabulary_size: int, device, cache_dir: Optional[str | Path] = None,
                       text_batch_size: int = 256, log: Callable[[str], None] = note) -> torch.Tensor:
    """The dictionary [T, d] of ``concepts``, from the cache in ``cache_dir`` when it was made the same way."""
    from utils.files.provenance import make_record, pretrained_identity

    def build():
        return embed_concepts(model, tokenizer, concepts, device, text_batch_size, progress=True).cpu()

    if cache_dir is None:
        return build()
    key = {"model": backbone.name, "open_clip_model": backbone.open_clip_name,
           "pretrained": pretrained_identity(backbone.pretrained), "quick_gelu": backbone.quick_gelu,
           "concepts_sha256": concepts_digest(concepts), "num_concepts": len(concepts)}
    key = {k: (v.get("sha256") if isinstance(v, dict) else v) for k, v in key.items()}
    record = make_record(model=backbone.name, pretrained=backbone.pretrained, vocab=vocabulary,
                         vocab_size=vocabulary_size, num_concepts=len(concepts))
    path = concept_cache_path(cache_dir, backbone, vocabulary, vocabulary_size)
    return cached_dictionary(path, key, build, record, log)


# ----------------------------------------------------------------------------- SpLiCE's dataset functions
def _default_model(splicemodel: Optional[SPLICE], device) -> SPLICE:
    if splicemodel is not None:
        return splicemodel
    return load(DEFAULT_MODEL, "laion", -1, device, l1_penalty=0.15, return_weights=True)


def image_decomposition(splicemodel: SPLICE, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [b, T], cosine [b]) of preprocessed images [b, 3, H, W] (embeddings [b, d] without ``clip``)."""
    z = splicemodel._embed_images(image)
    weights = splicemodel._weights(z)
    return weights, (splicemodel.recompose_image(weights) * z).sum(1)


@torch.no_grad()
def decompose_image(image: torch.Tensor, splicemodel: Optional[SPLICE] = None, device: str = "cpu"):
    """(weights [b, T], L0, cosine) of a preprocessed image [1, 3, H, W] (or [3, H, W]); for several images the
    L0 and the cosine are their means."""
    splicemodel = _default_model(splicemodel, device)
    weights, cosine = image_decomposition(splicemodel, image.unsqueeze(0) if image.ndim == 3 else image)
    return weights, float((weights != 0).sum(1).float().mean()), float(cosine.mean())


def _batches(dataloader):
    """(images, labels or None) from a loader of (image, label) pairs or of images."""
    for data in dataloader:
        if isinstance(data, (list, tuple)):
            yield data[0], (torch.as_tensor(data[1]) if len(data) > 1 else None)
        else:
            yield data, None


@torch.no_grad()
def decompose_dataset(dataloader, splicemodel: Optional[SPLICE] = None, device: str = "cpu"):
    """(mean weights [T], mean L0, mean cosine) over every image of ``dataloader``."""
    classes, l0, cosine = _accumulate(dataloader, _default_model(splicemodel, device), None, by_class=False)
    return classes[None], l0, cosine


@torch.no_grad()
def decompose_classes(dataloader, target_label: Optional[int] = None, splicemodel: Optional[SPLICE] = None,
                      device: str = "cpu"):
    """({label: mean weights [T]}, mean L0, mean cosine) over the images of ``dataloader`` ((image, label)
    batches), only those labelled ``target_label`` when it is given."""
    return _accumulate(dataloader, _default_model(splicemodel, device), target_label, by_class=True)


def _accumulate(dataloader, splicemodel: SPLICE, target_label: Optional[int], by_class: bool):
    sums: dict = {}
    counts: dict = {}
    total, l0, cosine = 0, 0, 0.0
    for image, label in _batches(dataloader):
        if target_label is not None:
            keep = (label == target_label).nonzero()[:, 0]
            if len(keep) == 0:
                continue
            image, label = image[keep], label[keep]
        weights, cos = image_decomposition(splicemodel, image)
        keys = label.tolist() if by_class else [None] * len(weights)
        for key in set(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            part = weights[rows].double().sum(0)
            sums[key] = sums[key] + part if key in sums else part
            counts[key] = counts.get(key, 0) + len(rows)
        total += len(weights)
        l0 += int((weights != 0).sum())
        cosine += float(cos.double().sum())
    if total == 0:
        raise InputError("no image to decompose" + (f" with label {target_label}" if target_label is not None
                                                    else ""))
    return {k: (sums[k] / counts[k]).float() for k in sums}, l0 / total, cosine / total


# ----------------------------------------------------------------------------- what the scripts share
@dataclass(frozen=True)
class SpliceSettings:
    """What SpLiCE's flags name (``utils.cli.add_splice_args``): backbone, vocabulary, image mean and solver."""
    l1_penalty: Optional[float]
    model: str = DEFAULT_MODEL
    pretrained: Optional[str] = None
    model_config: Optional[str] = None
    device: str = "cpu"
    vocab: str = "laion"
    vocab_size: int = 10000
    solver: str = "active_set"
    image_mean: Optional[str] = None
    download_root: Optional[str] = None
    base_url: Optional[str] = None
    cache_dir: Optional[str] = None
    text_batch_size: int = 256


@dataclass
class Loaded:
    """What ``SpliceSettings`` name, checked and loaded (everything but the concept embeddings)."""
    backbone: Backbone
    mean: torch.Tensor
    concepts: list
    model: nn.Module
    preprocess: Callable
    tokenizer: Callable


def load_inputs(settings: SpliceSettings, log: Callable[[str], None] = note) -> Loaded:
    """Check the penalty, the image mean and the vocabulary (cheap, first), then load the model."""
    check_l1_penalty(settings.l1_penalty)
    backbone = resolve_backbone(settings.model, settings.pretrained)
    mean = load_image_mean(backbone, settings.image_mean, settings.download_root, settings.base_url, log)
    path, reverse = vocabulary_file(settings.vocab, settings.download_root, settings.base_url, log)
    concepts = read_vocabulary(path, settings.vocab_size, reverse, log=log)
    model, preprocess, tokenizer = load_backbone(backbone, settings.device, settings.model_config)
    return Loaded(backbone, mean, concepts, model, preprocess, tokenizer)


def splice_from_loaded(settings: SpliceSettings, loaded: Loaded, cache_dir: str | Path,
                       log: Callable[[str], None] = note) -> SPLICE:
    """The SPLICE (``return_weights``) of loaded settings; the concept embeddings come from (or go to) the cache
    (``settings.cache_dir``, else ``cache_dir``)."""
    dictionary = concept_dictionary(loaded.model, loaded.tokenizer, loaded.concepts, loaded.backbone, settings.vocab,
                                    settings.vocab_size, settings.device, settings.cache_dir or cache_dir,
                                    settings.text_batch_size, log)
    return SPLICE(loaded.mean, dictionary, clip=loaded.model, solver=settings.solver, l1_penalty=settings.l1_penalty,
                  return_weights=True, device=settings.device)


def splice_record(settings: SpliceSettings, backbone: Backbone, concepts: Sequence[str], **fields) -> dict:
    """Provenance record of a SpLiCE output (``fields``: dataset, data_path, image, num_images, ...)."""
    from utils.files.provenance import make_record

    return make_record(model=backbone.name, pretrained=backbone.pretrained, l1_penalty=settings.l1_penalty,
                       solver=settings.solver, vocab=settings.vocab, vocab_size=settings.vocab_size,
                       num_concepts=len(concepts), concepts_sha256=concepts_digest(concepts),
                       image_mean=str(settings.image_mean) if settings.image_mean else backbone.mean_file, **fields)


def read_image(path: str | Path, what: str = "-path"):
    """An image file as RGB PIL (a clear error for a missing file or one PIL cannot read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: not found")
    return load_rgb(path)


def decomposition_lines(weights: np.ndarray, concepts: Sequence[str], stop: str = "zero") -> list[str]:
    """SpLiCE's concept lines ``\\t{concept}\\t{round(weight, 4)}``, largest first, down to the first weight that is
    0 (``stop="zero"``, decompose_image) or rounds to 0.0 (``stop="rounded"``, decompose_data)."""
    w = np.asarray(weights, dtype=np.float32)
    lines = []
    for j in np.argsort(-w, kind="stable"):
        value = float(w[j])
        if (value == 0) if stop == "zero" else (str(round(value, 4)) == "0.0"):
            break
        lines.append(f"\t{concepts[j]}\t{round(value, 4)}")
    return lines


# SpLiCE's dataset names -> ours (utils.datasets); any other name is passed on (an ImageFolder at -data_path)
SPLICE_DATASETS = {"ImageNetVal": "imagenet", "CIFAR10": "CIFAR10", "CIFAR100": "CIFAR100", "MSCOCO": "MSCOCO"}


def splice_dataset(name: str, data_path: Optional[str], transform: Callable):
    """A dataset with ``.labels`` for SpLiCE's names (and everything ``utils.datasets.build_dataset`` knows).

    ``ImageNetVal`` takes torchvision's ImageNet layout (``val/`` + devkit) or, as SpLiCE's
    ``imagenetv2_pytorch.ImageNetValDataset``, ``{data_path}/imagenet_validation/{class index}/*.JPEG``.
    CIFAR goes to ``./datasets/`` by default (downloaded if missing), as in SpLiCE.
    """
    from utils.datasets import IMAGE_EXTENSIONS, ImageFiles, build_dataset

    if name == "ImageNetVal" and data_path and (Path(data_path) / "imagenet_validation").is_dir():
        root = Path(data_path) / "imagenet_validation"
        files = sorted(p for p in root.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.parent.name.isdigit())
        if not files:
            raise InputError(f"-data_path {data_path}: no images in imagenet_validation/<class index>/")
        return ImageFiles(files, [int(p.parent.name) for p in files], transform)
    if name in ("CIFAR10", "CIFAR100") and not data_path:
        data_path = "./datasets/"
    return build_dataset(SPLICE_DATASETS.get(name, name), data_path, transform)


@dataclass
class Summary:
    """SpLiCE's averages over a set of images: mean weights [T], mean L0, mean cosine; and the concepts [T]."""
    weights: np.ndarray
    l0: float
    cosine: float
    num_images: int
    concepts: list


def summarise(data: Iterable[np.ndarray], indices: Iterable[np.ndarray], cosine: Iterable[np.ndarray],
              num_images: int, concepts: Sequence[str]) -> Summary:
    """The ``Summary`` of sparse weights given as pieces of their non-zero values and concept indices (CSR
    ``data`` / ``indices``, in order) and of the cosines, summed in float64 in that order (the same pieces give
    the same bits, whether read from memory or streamed from a file)."""
    T, n = len(concepts), max(int(num_images), 1)
    sums, nnz, cos = np.zeros(T, dtype=np.float64), 0, 0.0
    for values, cols in zip(data, indices):
        sums += np.bincount(cols, weights=values.astype(np.float64), minlength=T)
        nnz += len(values)
    for c in cosine:
        cos += float(c.astype(np.float64).sum())
    return Summary((sums / n).astype(np.float32), nnz / n, cos / n, int(num_images), list(concepts))


def _pieces(array: np.ndarray) -> Iterator[np.ndarray]:
    from utils.files.npz import CHUNK

    for st in range(0, len(array), CHUNK):
        yield array[st:st + CHUNK]


@dataclass
class Decompositions:
    """Per-image SpLiCE decompositions of a dataset (or of one class of it), in memory."""
    weights: "object"  # scipy.sparse.csr_matrix [N, T] float32
    cosine: np.ndarray  # [N] cosine(recomposition, embedding)
    labels: np.ndarray  # [N]
    index: np.ndarray  # [N] the images' indices in the dataset
    concepts: list  # [T]

    def select(self, label: Optional[int]) -> "Decompositions":
        """The images with ``label`` (all for None)."""
        if label is None:
            return self
        rows = rows_with_label(self.labels, label)
        return Decompositions(self.weights[rows], self.cosine[rows], self.labels[rows], self.index[rows],
                              self.concepts)

    def summary(self) -> Summary:
        """SpLiCE's averages (as its decompose_dataset / decompose_classes), as ``summarise_weights`` of a file."""
        w = self.weights.tocsr()
        w.sort_indices()
        return summarise(_pieces(w.data), _pieces(w.indices), _pieces(self.cosine), w.shape[0], self.concepts)


def rows_with_label(labels: np.ndarray, label: int, of: str = "") -> np.ndarray:
    """The rows of ``labels`` [N] equal to ``label``; none is an ``InputError`` listing the labels present."""
    rows = np.nonzero(labels == label)[0]
    if len(rows) == 0:
        raise InputError(f"-class_label {label}: no image {of}has this label "
                         f"(labels present: {np.unique(labels)[:20].tolist()})")
    return rows


WEIGHT_ROWS = {"nnz": "int64", "cosine": "float32", "labels": "int64", "index": "int64"}  # per image, streamed


def weights_parts(path: str | Path) -> Path:
    """The folder where ``stream_decompositions`` keeps a weights file's pieces until it is complete."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def stream_decompositions(splicemodel: SPLICE, dataset, concepts: Sequence[str], path: str | Path, record: dict,
                          indices: Optional[Sequence[int]] = None, batch_size: int = 512, num_workers: int = 0,
                          resume: bool = False, log: Callable[[str], None] = note) -> Summary:
    """Decompose the images ``indices`` (default all) of ``dataset`` into the weights file ``path`` (the format of
    ``load_decompositions``), batch by batch, and return its ``Summary``.

    RAM stays flat in the number of images: each batch's non-zero weights are appended to raw files (values
    float32, concept indices int32) and its per-image numbers (non-zeros, cosine, label, index) streamed to row
    files (``utils.files.streaming.stream_dataset``), all in ``{path}.parts/``; the ``.npz`` is then written
    piece by piece and the folder removed. ``resume`` continues a killed run from its last finished batch (what
    the killed run appended past it is cut off); the file is byte-identical to an uninterrupted run's.
    ``record`` is the provenance record (and the resume key).
    """
    from torch.utils.data import Subset

    from utils.files.npz import AppendFile, Chunked, write_npz
    from utils.files.provenance import read_provenance, run_key, write_provenance
    from utils.files.rows import StreamingArrays
    from utils.files.streaming import Output, stream_dataset

    path = Path(path)
    labels = class_column(getattr(dataset, "labels", np.full(len(dataset), -1)))
    index = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    record = dict(record, num_images=len(index))
    parts = weights_parts(path)
    if resume and path.is_file() and not parts.exists():
        if run_key(read_provenance(path) or {}) != run_key(record):
            raise InputError(f"--resume: {path} is a finished output of another run (its provenance record "
                             f"differs); rerun without --resume to overwrite it")
        log(f"--resume: {path} already complete (same run); nothing to do")
        return summarise_weights(path)
    parts.mkdir(parents=True, exist_ok=True)
    rows = {k: parts / f"{k}.npy" for k in WEIGHT_ROWS}
    values, cols = AppendFile(parts / "data.float32", np.float32), AppendFile(parts / "indices.int32", np.int32)
    first = [True]

    def compute(images: torch.Tensor, _labels, start: int) -> dict:
        if first[0]:  # cut back what a killed run appended past its last recorded batch
            kept = int(np.load(StreamingArrays.partial(rows["nnz"]), mmap_mode="r")[:start].sum()) if start else 0
            values.truncate(kept)
            cols.truncate(kept)
            first[0] = False
        weights, cos = image_decomposition(splicemodel, images)
        w = weights.cpu().numpy().astype(np.float32)
        r, c = np.nonzero(w)  # row-major: CSR order
        values.append(w[r, c])
        cols.append(c)
        at = index[start:start + len(w)]
        return {"nnz": np.bincount(r, minlength=len(w)), "cosine": cos.cpu().numpy().astype(np.float32),
                "labels": labels[at].astype(np.int64), "index": at}

    with torch.no_grad():
        stream_dataset(Subset(dataset, index.tolist()), {k: Output(p, (), WEIGHT_ROWS[k]) for k, p in rows.items()},
                       compute, record=record, resume=resume, batch_size=batch_size, num_workers=num_workers,
                       desc="SpLiCE decompositions", log=log)
    arrays = {k: np.load(p, mmap_mode="r") for k, p in rows.items()}
    n, total = len(index), int(sum(int(x.sum()) for x in _pieces(arrays["nnz"])))

    def indptr() -> Iterator[np.ndarray]:
        yield np.zeros(1, dtype=np.int64)
        offset = 0
        for x in _pieces(arrays["nnz"]):
            ends = np.cumsum(x, dtype=np.int64) + offset
            offset = int(ends[-1])
            yield ends

    def rows_of(k: str) -> Chunked:
        return Chunked(np.dtype(WEIGHT_ROWS[k]), (n,), lambda: _pieces(arrays[k]))

    write_npz(path, {"format": np.array("csr"), "shape": np.array([n, len(concepts)]),
                     "data": Chunked(np.dtype(np.float32), (total,), lambda: values.pieces(total)),
                     "indices": Chunked(np.dtype(np.int32), (total,), lambda: cols.pieces(total)),
                     "indptr": Chunked(np.dtype(np.int64), (n + 1,), indptr), "cosine": rows_of("cosine"),
                     "labels": rows_of("labels"), "index": rows_of("index"), "concepts": np.array(concepts, dtype=str)})
    write_provenance(path, record)
    arrays.clear()  # the memory maps go before their files
    shutil.rmtree(parts)
    return summarise_weights(path)


def summarise_weights(path: str | Path) -> Summary:
    """The ``Summary`` of a weights file, read piece by piece."""
    from utils.files.npz import npz_chunks

    with np.load(path, allow_pickle=False) as z:
        n, concepts = int(z["shape"][0]), z["concepts"].tolist()
    return summarise(npz_chunks(path, "data"), npz_chunks(path, "indices"), npz_chunks(path, "cosine"), n, concepts)


def load_decompositions(path: str | Path) -> Decompositions:
    """A weights file (``stream_decompositions``), in memory."""
    import scipy.sparse as sp

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--from_weights {path}: not found (written by decompose_data.py)")
    with np.load(path, allow_pickle=False) as z:
        missing = {"data", "indices", "indptr", "shape", "cosine", "labels", "index", "concepts"} - set(z.files)
        if missing:
            raise InputError(f"--from_weights {path}: not a decompose_data.py weights file (no {sorted(missing)})")
        weights = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        return Decompositions(weights, z["cosine"], z["labels"], z["index"], z["concepts"].tolist())


@dataclass(frozen=True)
class DatasetSettings:
    """What SpLiCE's dataset flags name (``utils.cli.add_dataset_args``)."""
    dataset: str
    data_path: Optional[str] = None
    class_label: Optional[int] = None
    batch_size: int = 512
    num_workers: int = 0
    resume: bool = False
    from_weights: Optional[str] = None
    allow_mismatch: bool = False


def dataset_decompositions(settings: SpliceSettings, data: DatasetSettings, out_dir: str | Path,
                           weights_out: str | Path, log: Callable[[str], None] = note) -> tuple[Summary, dict]:
    """(``Summary`` of the images of ``data.dataset`` / ``data.class_label``, provenance record): read from
    ``data.from_weights``, or decomposed and streamed to ``weights_out`` (``stream_decompositions``); the concept
    embeddings are cached in ``out_dir`` (or ``settings.cache_dir``)."""
    from utils.files.provenance import check_consistent, derived_record

    if data.from_weights:
        check_consistent([data.from_weights], fields=("dataset",), expected={"dataset": data.dataset},
                         allow_mismatch=data.allow_mismatch, log=log)
        summary = load_decompositions(data.from_weights).select(data.class_label).summary()
        return summary, derived_record([data.from_weights], from_weights=str(Path(data.from_weights).resolve()),
                                       class_label=data.class_label, num_images=summary.num_images)
    loaded = load_inputs(settings, log)
    ds = splice_dataset(data.dataset, data.data_path, loaded.preprocess)
    indices = None
    if data.class_label is not None:
        indices = rows_with_label(class_column(ds.labels), data.class_label, f"of -dataset {data.dataset} ")
    splicemodel = splice_from_loaded(settings, loaded, out_dir, log)
    record = splice_record(settings, loaded.backbone, loaded.concepts, dataset=data.dataset,
                           data_path=data.data_path, class_label=data.class_label)
    summary = stream_decompositions(splicemodel, ds, loaded.concepts, weights_out, record, indices, data.batch_size,
                                    data.num_workers, data.resume, log)
    return summary, dict(record, num_images=summary.num_images)


def plot_concepts(concepts: Sequence[str], weights: Sequence[float], title: str, path: str | Path) -> None:
    """Horizontal bar chart of concept weights, largest on top (SpLiCE's concept distribution plot)."""
    import matplotlib.pyplot as plt

    from utils.files.atomic import save_figure

    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(concepts), 1) + 1.6))
    y = np.arange(len(concepts))
    ax.barh(y, weights, color=["#e86276" if i % 2 == 0 else "#629d1e" for i in range(len(concepts))])
    ax.set_yticks(y, labels=list(concepts))
    ax.invert_yaxis()
    ax.set_title(title, fontsize=16)
    ax.set_xlabel("Weight", fontsize=13)
    ax.set_ylabel("Concept", fontsize=13)
    ax.spines[["top", "right", "bottom"]].set_visible(False)
    ax.grid(axis="x", alpha=0.4)
    fig.tight_layout()
    save_figure(fig, path)
