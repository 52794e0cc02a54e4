"""Top-1 accuracy, written once: hits counted chunk by chunk (``hits``), turned into percent at the end."""
from __future__ import annotations

import numpy as np


def hits(logits, labels):
    """Top-1 hits of ``logits`` ``[..., b, C]`` against integer ``labels`` ``[b]``: ``[...]`` (numpy or torch; an
    int for 2-D logits). Sum them over chunks of images, then ``percent``."""
    count = (logits.argmax(-1) == labels).sum(-1)
    return int(count) if count.ndim == 0 else count


def percent(correct, total: int):
    """``correct`` hits of ``total`` images in percent (a float, or an array of floats)."""
    if np.ndim(correct):
        return np.asarray(correct, np.float64) / total * 100.0
    return float(correct) / total * 100.0

