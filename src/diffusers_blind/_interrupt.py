"""Ctrl-C while the command line is still importing torch and diffusers: one line, exit code 130.

Imported first by the package, before the heavy imports. It acts only when the running program is the
``diffusers-blind`` console script or ``python -m diffusers_blind...``; library users keep Python's
default behaviour. Until ``cli.main`` starts (and calls :func:`restore`), SIGINT ends the process at
once: nothing has been written yet, and an interrupt inside diffusers' lazy imports otherwise surfaces
as an unrelated ``RecursionError`` traceback.
"""

import os
import signal
import sys


def _exit_now(signum=None, frame=None):
    print("diffusers-blind: interrupted", file=sys.stderr)
    sys.stderr.flush()
    os._exit(130)


def _quiet_interrupt(kind, value, traceback, previous=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        _exit_now()
    previous(kind, value, traceback)


def restore() -> None:
    """Back to Python's ``KeyboardInterrupt`` (the command line handles it from here on)."""
    if signal.getsignal(signal.SIGINT) is _exit_now:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if os.path.basename(sys.argv[0] if sys.argv else "") in ("diffusers-blind", "-m"):
    sys.excepthook = _quiet_interrupt
    try:
        signal.signal(signal.SIGINT, _exit_now)
    except ValueError:  # not the main thread
        pass
