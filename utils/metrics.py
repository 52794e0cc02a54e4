"""Small numeric helpers."""
from __future__ import annotations

import numpy as np


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent of ``logits`` [B, C] against integer ``labels`` [B]."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"accuracy: {logits.shape[0]} logits but {labels.shape[0]} labels")
    return float((logits.argmax(-1) == labels).mean() * 100)
