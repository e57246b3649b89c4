"""One kind of error for bad flags and bad input, one for a run that cannot go on; both shown as one line."""

from __future__ import annotations

import argparse
import functools
import re
import sys

_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class UsageError(ValueError):
    """Bad flag, value or input. The message names the flag or the value and fits on one line (exit status 2)."""


class RunError(RuntimeError):
    """The run cannot go on (e.g. the disk filled up while writing a checkpoint). The message says what failed
    and what is still intact, on one line (exit status 1)."""


def describe_exception(e: BaseException) -> str:
    """``"TypeName: first line of the message"`` — an exception squeezed onto one line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _close_progress_bars() -> None:
    """Closes open tqdm bars, so an error line starts on a line of its own instead of after a bar's ``\\r``."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def exits_on_usage_error(main):
    """Decorates a script's entry point: a :class:`UsageError` prints ``error: <message>`` on one line to
    stderr and exits with status 2, a :class:`RunError` the same with status 1, instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UsageError, RunError) as e:
            _close_progress_bars()
            message = " ".join(str(e).split())
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2 if isinstance(e, UsageError) else 1)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors (unknown flag, bad choice, missing value) are
    :class:`UsageError` s, so they print as the same one line as every other bad input. A negative number in
    exponent form after a flag (``--learning_rate -1e-4``) is read as that flag's value (argparse would take it
    for a flag and say "expected one argument"), so the value's own check names the problem."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        takes_value = {option for action in self._actions if action.nargs is None and action.option_strings
                       for option in action.option_strings}
        joined = []
        for arg in args:
            if joined and joined[-1] in takes_value and _NUMBER.match(arg):
                joined[-1] = f"{joined[-1]}={arg}"
            else:
                joined.append(arg)
        return super().parse_known_args(joined, namespace)

    def error(self, message):
        raise UsageError(message)
