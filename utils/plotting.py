"""Saving matplotlib figures the crash-safe way (Agg backend, temporary name, rename)."""
from __future__ import annotations

from pathlib import Path


def new_figure(figsize: tuple[float, float] = (6, 4)):
    """``(fig, ax)`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """``tight_layout``, write to a temporary name beside ``path``, rename, close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
