"""The library layer of prsclip: it takes arrays, paths and plain values and returns records.

Nothing here parses flags, prints, exits or picks a matplotlib backend: the top-level scripts (and the PCLens
command modules in ``utils/scripts/``) own those; ``utils/cli.py`` is their helper. Sub-packages by job:
``files`` (atomic writes, streamed arrays, names, provenance, readers), ``text`` (embeddings, text sets, TextSpan,
PCLens), ``neurons`` (paper 2), ``solvers`` (OMP, non-negative lasso), ``reproduce`` (reproduce.py's plan, runner
and report). The map of modules is in docs/api.md.
"""
import logging
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "data"  # the files that ship with the package (json, txt)
REPO_ROOT = PACKAGE_DIR.parent  # a checkout's root (text_descriptions/, tests/, the scripts)

# Messages of the library (what it is doing, a fallback it took): the scripts show them on stdout (utils.cli.run);
# in a notebook, INFO messages are silent unless logging is configured, warnings show.
LOG = logging.getLogger("prsclip")
