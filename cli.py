"""The command lines' common ground: flags whose values are checked as they are read, bad input as
one line (UsageError, exit 2), paths told from hub ids, and the stops a script makes on purpose
(StopRequested with its exit status; StopFlag: Ctrl-C and SIGTERM finish the work in progress).
"""
import argparse
import math
import signal
import sys
from pathlib import Path

import parallel

# the exit status of a run stopped by --stop-on-degeneration
DEGENERATED = 4


class UsageError(argparse.ArgumentTypeError, ValueError):
    """A bad flag, or an output folder in the way: one line, exit code 2. Raised by an argparse
    `type=`, its message is the one argparse shows."""


class StopRequested(Exception):
    """The run stopped on purpose (signal, divergence, out of memory): message and exit code."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with defaults, except None and False (off, or decided at run time)."""

    def _get_help_string(self, action):
        off = action.default is None or action.default is False
        return action.help if off else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with --help showing defaults, and a bad flag as one line (UsageError), not usage."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        raise UsageError(message)


def names(text):
    """--lora-target: "all-linear", or module names separated by commas ("q_proj, v_proj")."""
    listed = [name.strip() for name in text.split(",") if name.strip()]
    if not listed:
        raise argparse.ArgumentTypeError(f"names no module: {text!r}")
    return ",".join(listed)


def checked(rule, test):
    """An argparse `type=` that reads a number and refuses one that fails `test` (NaN fails all)."""
    def read(text):
        value = (int if rule.startswith("a whole") else float)(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text}")
        return value
    read.__name__ = rule
    return read


positive_int = checked("a whole number >= 1", lambda v: v >= 1)
count = checked("a whole number >= 0", lambda v: v >= 0)
positive = checked("a number > 0", lambda v: math.isfinite(v) and v > 0)
non_negative = checked("a number >= 0", lambda v: math.isfinite(v) and v >= 0)
unit_interval = checked("in [0, 1)", lambda v: 0 <= v < 1)


class StopFlag:
    """Inside `with`, SIGINT (Ctrl-C) and SIGTERM (preemption) only set a flag, so the work in
    progress finishes first; a second Ctrl-C changes nothing."""

    def __init__(self, announce):
        self.announce = announce
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._set) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *_):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _set(self, signum, _frame):
        if self.signal is None and parallel.rank() == 0:
            print(f"\n{signal.Signals(signum).name}: {self.announce}", file=sys.stderr, flush=True)
        self.signal = signum


def looks_local(name):
    """A path, not a hub id ("org/name"): it starts with . / ~, has more than one /, or its parent
    folder exists here."""
    name, path = str(name), Path(name)
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or (path.parent != Path(".") and path.parent.is_dir()))


def missing_folder(flag, name):
    """The one-line error of a local path that is not there (the hub would answer "couldn't
    connect"), or None."""
    if looks_local(name) and not Path(name).expanduser().exists():
        return UsageError(f"{flag} {name}: no such folder")
    return None
