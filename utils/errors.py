"""The error types every layer shares (a leaf module: it imports nothing of ours).

``InputError`` is bad input: a flag value, a file of the wrong shape, an unknown name. Library functions raise
it with a message that names the file, shape or value at fault; the scripts (``utils.cli.run``) print it as one
line, ``<script>: error: <message>``, and exit with status 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["InputError", "UnsupportedModelError"]


class InputError(ValueError):
    """Bad input (a flag, a file, a shape): printed by the scripts as one line naming the culprit, exit status 2.

    A subclass of ``ValueError`` so that library callers catching ``ValueError`` keep working.
    """


class UnsupportedModelError(InputError):
    """The image tower has a feature that breaks the exact decomposition."""
