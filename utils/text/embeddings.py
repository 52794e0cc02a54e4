"""Text-side embeddings: zero-shot classifiers and text sets."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import tqdm


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str], device: str | torch.device,
                 batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """L2-normalised ``encode_text`` of every string, in float32: ``[T, d]`` on ``device``."""
    out = []
    for i in tqdm.trange(0, len(texts), batch_size, desc="encode_text", unit="batch", disable=not progress):
        tokens = tokenizer(list(texts[i:i + batch_size])).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def zero_shot_classifier(model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str],
                         templates: Sequence[Callable[[str], str]], device: str | torch.device,
                         batch_size: int = 256) -> torch.Tensor:
    """Zero-shot classifier ``[d, C]``: per class, the normalised mean of its normalised template embeddings.

    Prompts are encoded class-major (prompt ``c * len(templates) + t``), batched across classes.
    """
    prompts = [template(c) for c in classnames for template in templates]
    emb = encode_texts(model, tokenizer, prompts, device, batch_size)  # [C * T, d]
    emb = emb.view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1).t().contiguous()  # [d, C]


def write_classifier(model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str], path: str | Path,
                     record: dict, device: str | torch.device, batch_size: int = 256) -> torch.Tensor:
    """The zero-shot classifier ``[d, C]`` of ``classnames`` under the 80 OpenAI ImageNet templates, saved
    atomically at ``path`` with its provenance record (``record`` plus the class and template counts).

    What compute_text_projection.py, compute_classifier_projection.py and PCLens's compute_classes_embeddings
    write (each under its own name). Returns the classifier (float32, on ``device``).
    """
    from utils.files.provenance import save_output
    from utils.text.classnames import OPENAI_IMAGENET_TEMPLATES

    classifier = zero_shot_classifier(model, tokenizer, classnames, OPENAI_IMAGENET_TEMPLATES, device, batch_size)
    save_output(path, classifier.cpu().numpy(),
                dict(record, num_classes=len(classnames), templates=len(OPENAI_IMAGENET_TEMPLATES)))
    return classifier
