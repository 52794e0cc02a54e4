"""Run a script and SIGKILL its process when the streaming loop reaches image $PRSCLIP_KILL_AT (tests only).

    python tests/kill_harness.py compute_prs.py --dataset ... --num_workers 0

No Python-level cleanup runs (no finally, no atexit): the same as a kill -9 or a lost machine.
"""
import os
import runpy
import signal
import sys

from torch.utils.data import Subset

import utils.files.streaming

AT = int(os.environ["PRSCLIP_KILL_AT"])


class KillingSubset(Subset):
    def __getitem__(self, i):
        if self.indices[i] == AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)

    def __getitems__(self, indices):
        return [self[i] for i in indices]


utils.files.streaming.Subset = KillingSubset
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
