"""SpLiCE (Bhalla, Oesterling et al. 2024): a CLIP image embedding as a sparse, non-negative sum of concepts.

The math, with SpLiCE's conventions:

* Concepts. Each vocabulary line is embedded with the text tower and normalised; the mean over the vocabulary is
  subtracted and every row normalised again: the dictionary ``C`` [T, d].
* Image. ``z = normalise(encode_image(x))``; the target is ``normalise(z - mu)``, with ``mu`` [d] the mean of the
  normalised image embeddings of a reference set (SpLiCE ships one per backbone, computed on MSCOCO).
* Solve ``min_w |C^T w - target|^2 + l1_penalty * sum(w)`` over ``w >= 0`` [T]:
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
``compute_image_mean.py`` are thin layers over the helpers below. See docs/splice.md.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import InputError
from utils.datasets import class_column, load_rgb
from utils.models import default_device, load_model, register_model_config
from utils.files.names import NO_WEIGHTS, pretrained_name, splice_concepts_path
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


def note(message: str) -> None:
    """Informational messages go to stderr (stdout carries SpLiCE's own output)."""
    print(message, file=sys.stderr)


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
    import open_clip
    from dataclasses import asdict
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


def vocabulary_file(vocabulary: str, download_root: Optional[str | Path] = None,
                    base_url: Optional[str] = None) -> tuple[Path, bool]:
    """(path, reversed) of ``-vocab``: SpLiCE's name (fetched), one of ours, or a text file."""
    if vocabulary in SPLICE_VOCABULARIES:
        return fetch_splice_file(f"{vocabulary}.txt", download_root, base_url), False
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
                    download_root: Optional[str | Path] = None, base_url: Optional[str] = None) -> torch.Tensor:
    """``image_mean`` if given, else SpLiCE's mean for these weights (fetched); else a clear error."""
    if image_mean is not None:
        return read_image_mean(image_mean)
    if backbone.mean_file is None:
        raise InputError(
            f"no image mean for -model {backbone.name} --pretrained {backbone.pretrained}: pass --image_mean FILE "
            f"(.pt or .npy, [d]), compute one with compute_image_mean.py, or use a backbone SpLiCE ships a mean for "
            f"({', '.join(f'{n} ({w[1]})' for n, w in SPLICE_BACKBONES.items())})")
    return read_image_mean(fetch_splice_file(backbone.mean_file, download_root, base_url), "SpLiCE mean")


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
    mean = load_image_mean(backbone, image_mean, download_root, base_url)  # before the model: fail fast
    path, reverse = vocabulary_file(vocabulary, download_root, base_url)
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
    record = make_record(None, model=backbone.name, pretrained=backbone.pretrained, vocab=vocabulary,
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
def add_splice_args(parser, l1_penalty: Optional[float] = None) -> None:
    """SpLiCE's flags (single dash, its defaults; a double-dash spelling works too) and ours."""
    parser.add_argument("-model", "--model", default=DEFAULT_MODEL,
                        help="backbone, [library:]model: clip:ViT-B/32, clip:ViT-B/16, clip:RN50 (OpenAI weights), "
                             "open_clip:ViT-B-32 (LAION-2B laion2b_s34b_b79k), or any open_clip name with "
                             "--pretrained (default: %(default)s)")
    parser.add_argument("--pretrained", default=None,
                        help="weights: open_clip tag, checkpoint path or 'none' (default: the backbone's own; "
                             "required for other open_clip models)")
    parser.add_argument("--model_config", default=None, help="extra open_clip model config (.json or a folder)")
    parser.add_argument("-device", "--device", default=default_device(),
                        help="torch device (default: cuda if available, else cpu; SpLiCE: cuda)")
    parser.add_argument("-l1_penalty", "--l1_penalty", type=float, default=l1_penalty,
                        help="weight of the l1 penalty, > 0; larger is sparser"
                             + (f" (default: {l1_penalty})" if l1_penalty is not None else " (required)"))
    parser.add_argument("-vocab", "--vocab", default="laion",
                        help=f"concept vocabulary: SpLiCE's {', '.join(SPLICE_VOCABULARIES)} (downloaded, "
                             f"SHA-256 checked), ours {', '.join(LOCAL_VOCABULARIES)} (no download), or a text "
                             f"file, one concept per line (default: %(default)s)")
    parser.add_argument("-vocab_size", "--vocab_size", type=int, default=10000,
                        help="keep the last k lines of the vocabulary (its most frequent concepts); 0: all "
                             "(default: %(default)s)")
    parser.add_argument("-solver", "--solver", default="admm", choices=SOLVERS,
                        help="admm: batched ADMM, each image stopping on its own residuals (default); skl: "
                             "SpLiCE's own per-image scikit-learn Lasso (its default)")
    parser.add_argument("--image_mean", default=None,
                        help="image mean .pt or .npy [d] (default: SpLiCE's for its four backbones; "
                             "compute_image_mean.py makes one for any model)")
    parser.add_argument("--download_root", default=None,
                        help=f"where SpLiCE's vocabularies and means are kept (default: {DEFAULT_DOWNLOAD_ROOT})")
    parser.add_argument("--base_url", default=None,
                        help="take SpLiCE's files from this folder URL (a mirror, or file:///path/) instead of "
                             "GitHub; SHA-256 checked all the same")
    parser.add_argument("--cache_dir", default=None,
                        help="where the concept embeddings are cached (default: beside the outputs)")
    parser.add_argument("--text_batch_size", type=int, default=256, help="concepts embedded at once (default: %(default)s)")


@dataclass
class Loaded:
    """What ``add_splice_args`` flags name, checked and loaded (everything but the concept embeddings)."""
    backbone: Backbone
    mean: torch.Tensor
    concepts: list
    model: nn.Module
    preprocess: Callable
    tokenizer: Callable


def load_from_args(args) -> Loaded:
    """Check the flags, the image mean and the vocabulary (cheap, first), then load the model."""
    check_l1_penalty(args.l1_penalty)
    backbone = resolve_backbone(args.model, args.pretrained)
    mean = load_image_mean(backbone, args.image_mean, args.download_root, args.base_url)
    path, reverse = vocabulary_file(args.vocab, args.download_root, args.base_url)
    concepts = read_vocabulary(path, args.vocab_size, reverse)
    model, preprocess, tokenizer = load_backbone(backbone, args.device, args.model_config)
    return Loaded(backbone, mean, concepts, model, preprocess, tokenizer)


def splice_from_loaded(args, loaded: Loaded, cache_dir: str | Path) -> SPLICE:
    """The SPLICE (``return_weights``) of loaded flags; the concept embeddings come from (or go to) the cache."""
    dictionary = concept_dictionary(loaded.model, loaded.tokenizer, loaded.concepts, loaded.backbone, args.vocab,
                                    args.vocab_size, args.device, args.cache_dir or cache_dir, args.text_batch_size)
    return SPLICE(loaded.mean, dictionary, clip=loaded.model, solver=args.solver, l1_penalty=args.l1_penalty,
                  return_weights=True, device=args.device)


def splice_record(args, backbone: Backbone, concepts: Sequence[str], **fields) -> dict:
    """Provenance record of a SpLiCE output."""
    from utils.files.provenance import make_record

    return make_record(args, model=backbone.name, pretrained=backbone.pretrained, l1_penalty=args.l1_penalty,
                       solver=args.solver, vocab=args.vocab, vocab_size=args.vocab_size, num_concepts=len(concepts),
                       concepts_sha256=concepts_digest(concepts),
                       image_mean=str(args.image_mean) if args.image_mean else backbone.mean_file, **fields)


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
class Decompositions:
    """Per-image SpLiCE decompositions of a dataset (or of one class of it)."""
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

    def summary(self) -> tuple[np.ndarray, float, float]:
        """(mean weights [T], mean L0, mean cosine), as SpLiCE's decompose_dataset / decompose_classes."""
        n = self.weights.shape[0]
        mean = np.asarray(self.weights.sum(0), dtype=np.float64).ravel() / n
        return mean.astype(np.float32), self.weights.nnz / n, float(self.cosine.astype(np.float64).sum() / n)


def rows_with_label(labels: np.ndarray, label: int, of: str = "") -> np.ndarray:
    """The rows of ``labels`` [N] equal to ``label``; none is an ``InputError`` listing the labels present."""
    rows = np.nonzero(labels == label)[0]
    if len(rows) == 0:
        raise InputError(f"-class_label {label}: no image {of}has this label "
                         f"(labels present: {np.unique(labels)[:20].tolist()})")
    return rows


def decompose_images(splicemodel: SPLICE, dataset, concepts: Sequence[str], batch_size: int = 512,
                     num_workers: int = 0, indices: Optional[Sequence[int]] = None,
                     progress: bool = True) -> Decompositions:
    """Decompose the images ``indices`` (default all) of ``dataset``, batch by batch, keeping only the
    non-zero weights."""
    import scipy.sparse as sp
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    labels = class_column(getattr(dataset, "labels", np.full(len(dataset), -1)))
    index = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    loader = DataLoader(Subset(dataset, index.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    blocks, cosines = [], []
    with torch.no_grad():
        for image, _ in tqdm(_batches(loader), total=len(loader), desc="SpLiCE decompositions", disable=not progress):
            weights, cos = image_decomposition(splicemodel, image)
            blocks.append(sp.csr_matrix(weights.cpu().numpy().astype(np.float32)))
            cosines.append(cos.cpu().numpy().astype(np.float32))
    T = len(concepts)
    weights = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, T), dtype=np.float32)
    return Decompositions(weights, np.concatenate(cosines) if cosines else np.zeros(0, np.float32),
                          labels[index].astype(np.int64), index, list(concepts))


def save_decompositions(path: str | Path, dec: Decompositions) -> None:
    """One ``.npz``, atomically: a scipy CSR [N, T] (``scipy.sparse.load_npz`` reads it) plus ``cosine``,
    ``labels``, ``index`` [N] and ``concepts`` [T]."""
    from utils.files.atomic import atomic_write

    w = dec.weights.tocsr()
    arrays = dict(format=np.array("csr"), shape=np.array(w.shape), data=w.data, indices=w.indices, indptr=w.indptr,
                  cosine=dec.cosine, labels=dec.labels, index=dec.index, concepts=np.array(dec.concepts, dtype=str))
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def load_decompositions(path: str | Path) -> Decompositions:
    """What ``save_decompositions`` wrote."""
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


def add_dataset_args(parser) -> None:
    """SpLiCE's dataset flags, and ours for reading a decomposition back (``--from_weights``)."""
    from utils.files.provenance import add_mismatch_arg

    parser.add_argument("-dataset", "--dataset", required=True,
                        help=f"SpLiCE's {', '.join(SPLICE_DATASETS)} (MSCOCO: a folder of images), or any name "
                             f"utils/datasets.py knows (imagenet, sample, binary_waterbirds, ...; other names: an "
                             f"ImageFolder at -data_path)")
    parser.add_argument("-data_path", "--data_path", default=None, help="dataset root (CIFAR: ./datasets/)")
    parser.add_argument("-class_label", "--class_label", type=int, default=None,
                        help="decompose only the images with this label (default: all)")
    parser.add_argument("-batch_size", "--batch_size", type=int, default=512, help="images per batch (default: %(default)s)")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader workers (default: %(default)s)")
    parser.add_argument("--from_weights", default=None,
                        help="read the per-image weights from this decompose_data.py .npz instead of running the "
                             "model (its model, vocabulary and l1 penalty apply)")
    add_mismatch_arg(parser)


def dataset_decompositions(args, out_dir: str | Path, weights_out: Optional[str | Path] = None):
    """(Decompositions of -dataset / -class_label, provenance record), from --from_weights or by decomposing.

    ``weights_out``: where to write the per-image weights (``save_decompositions``) when decomposing.
    """
    from utils.files.provenance import check_consistent, derived_record, write_provenance

    if args.from_weights:
        check_consistent([args.from_weights], fields=("dataset",), expected={"dataset": args.dataset},
                         allow_mismatch=args.allow_mismatch)
        dec = load_decompositions(args.from_weights).select(args.class_label)
        return dec, derived_record([args.from_weights], from_weights=str(Path(args.from_weights).resolve()),
                                   class_label=args.class_label, num_images=len(dec.index))
    loaded = load_from_args(args)
    ds = splice_dataset(args.dataset, args.data_path, loaded.preprocess)
    indices = None
    if args.class_label is not None:
        indices = rows_with_label(class_column(ds.labels), args.class_label, f"of -dataset {args.dataset} ")
    splicemodel = splice_from_loaded(args, loaded, out_dir)
    backbone, concepts = loaded.backbone, loaded.concepts
    dec = decompose_images(splicemodel, ds, concepts, args.batch_size, args.num_workers, indices)
    record = splice_record(args, backbone, concepts, class_label=args.class_label, num_images=len(dec.index))
    if weights_out is not None:
        save_decompositions(weights_out, dec)
        write_provenance(weights_out, record)
    return dec, record


def plot_concepts(concepts: Sequence[str], weights: Sequence[float], title: str, path: str | Path) -> None:
    """Horizontal bar chart of concept weights, largest on top (SpLiCE's concept distribution plot)."""
    import matplotlib

    matplotlib.use("Agg")
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
