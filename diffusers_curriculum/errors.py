"""One kind of error for bad flags and bad input, shown to the user as one line."""

from __future__ import annotations

import argparse
import functools
import sys


class UsageError(ValueError):
    """Bad flag, value or input. The message names the flag or the value and fits on one line."""


def describe_exception(e: BaseException) -> str:
    """``"TypeName: first line of the message"`` — an exception squeezed onto one line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def exits_on_usage_error(main):
    """Decorates a script's entry point: a :class:`UsageError` prints ``error: <message>`` on one line to
    stderr and exits with status 2 instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            message = " ".join(str(e).split())
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors (unknown flag, bad choice, missing value) are
    :class:`UsageError` s, so they print as the same one line as every other bad input."""

    def error(self, message):
        raise UsageError(message)
