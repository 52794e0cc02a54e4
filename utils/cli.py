"""Command-line entry point shared by the scripts: bad input becomes one clear line and exit status 2."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


def run(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser) -> None:
    """Parse the command line and call ``main(args)``.

    ``ValueError``, ``FileNotFoundError`` and ``KeyError`` raised for bad input are printed as
    ``<script>: error: <message>`` and exit with status 2; set ``PRSCLIP_TRACEBACK=1`` to see the traceback.
    """
    args = parser.parse_args()
    try:
        main(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        if os.environ.get("PRSCLIP_TRACEBACK"):
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
