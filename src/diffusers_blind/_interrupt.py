"""Ctrl-C while the command line is still importing torch and diffusers: one line, exit code 130.

Imported first by the package, before the heavy imports. It acts only when the running program is the
``diffusers-blind`` console script or ``python -m diffusers_blind...``; library users keep Python's
default behaviour.
"""

import os
import sys


def _quiet_interrupt(kind, value, traceback, previous=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        print("diffusers-blind: interrupted", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    previous(kind, value, traceback)


if os.path.basename(sys.argv[0] if sys.argv else "") in ("diffusers-blind", "-m"):
    sys.excepthook = _quiet_interrupt
