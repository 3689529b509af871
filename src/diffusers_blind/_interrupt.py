"""Ctrl-C while the command line is still importing torch and diffusers: one line, exit code 130.

Imported first by the package, before the heavy imports. It acts only when the running program is the
``diffusers-blind`` console script or ``python -m diffusers_blind...`` (not another program run with
``-m`` that imports the package); library users keep Python's
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


_PREVIOUS_EXCEPTHOOK = sys.excepthook


def _quiet_interrupt(kind, value, traceback):
    if issubclass(kind, KeyboardInterrupt):
        _exit_now()
    _PREVIOUS_EXCEPTHOOK(kind, value, traceback)


def restore() -> None:
    """Back to Python's ``KeyboardInterrupt`` (the command line handles it from here on)."""
    if signal.getsignal(signal.SIGINT) is _exit_now:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.excepthook is _quiet_interrupt:
        sys.excepthook = _PREVIOUS_EXCEPTHOOK


def module_target(argv) -> str | None:
    """The module of ``python [options] -m MODULE ...`` in the interpreter's own ``argv`` (``sys.orig_argv``).

    Short flags may be combined (``-Bm MODULE``, ``-mMODULE``); ``-c``, ``-W`` and ``-X`` take a value."""
    index = 1
    while index < len(argv):
        arg = argv[index]
        if not arg.startswith("-") or arg.startswith("--") or arg == "-":
            return None  # a script or "--": no -m before it
        for position, flag in enumerate(arg[1:], start=2):
            if flag == "m":
                value = arg[position:]
                return value or (argv[index + 1] if index + 1 < len(argv) else None)
            if flag in "cWX":
                if flag == "c":
                    return None
                if position == len(arg):
                    index += 1  # the value is the next argument
                break
        index += 1
    return None


def launched_as_the_command(argv=None, orig_argv=None) -> bool:
    """Whether this process is the ``diffusers-blind`` console script or ``python -m diffusers_blind[...]``.

    While Python imports the parents of a ``-m`` target, ``sys.argv[0]`` is ``"-m"`` whatever the target: the
    target itself is read from ``sys.orig_argv``, so a user's ``python -m their_package`` is left alone."""
    argv = sys.argv if argv is None else argv
    name = os.path.basename(argv[0]) if argv else ""
    if name == "diffusers-blind":
        return True
    if name != "-m":
        return False
    target = module_target(getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv) or ""
    return target == "diffusers_blind" or target.startswith("diffusers_blind.")


if launched_as_the_command():
    sys.excepthook = _quiet_interrupt
    try:
        signal.signal(signal.SIGINT, _exit_now)
    except ValueError:  # not the main thread
        pass
