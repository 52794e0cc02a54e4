"""One writer for a script's result: its JSON, its figure, text files beside them, and a provenance record for each.

Every analysis script ends the same way: ``{stem}.json`` (the numbers), ``{stem}.png`` (the figure), sometimes a
text file in the original's format, each with ``<file>.provenance.json``. ``save_result`` writes them atomically and
returns their paths, JSON first; the script then prints them (``utils.cli.say_wrote``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from utils.files.atomic import atomic_write_json, atomic_write_text, save_figure
from utils.files.provenance import write_provenance

__all__ = ["save_result"]


def save_result(folder: str | Path, stem: str, result: Mapping[str, Any], record: Mapping[str, Any], *,
                figure: Any = None, texts: Optional[Mapping[str, str]] = None, json_name: Optional[str] = None,
                figure_name: Optional[str] = None, indent: Optional[int] = 1) -> list[Path]:
    """Write a result and its records into ``folder``.

    Args:
        folder: an existing folder (``utils.files.atomic.make_output_dir``).
        stem: the file stem (``utils.files.names``); the files are ``{stem}.json``, ``{stem}.png`` and
            ``{stem}{suffix}`` for each text.
        result: what the JSON holds (JSON-serialisable).
        record: the provenance record of every file written (``make_record``/``derived_record``).
        figure: a matplotlib figure saved as ``{stem}.png`` (and closed), or ``None``.
        texts: ``{suffix: text}``, e.g. ``{".txt": ...}`` for a file in the original's format.
        json_name, figure_name: the JSON's and the figure's file names when they are not ``{stem}.json`` and
            ``{stem}.png``.
        indent: the JSON's indentation (``None``: one line).

    Returns:
        The paths written, JSON first, then the texts, then the figure.
    """
    folder = Path(folder)
    written = [folder / (json_name or f"{stem}.json")]
    atomic_write_json(written[0], dict(result), indent=indent)
    for suffix, text in (texts or {}).items():
        written.append(folder / f"{stem}{suffix}")
        atomic_write_text(written[-1], text)
    if figure is not None:
        written.append(folder / (figure_name or f"{stem}.png"))
        save_figure(figure, written[-1])
    for path in written:
        write_provenance(path, record)
    return written
