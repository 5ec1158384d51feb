"""Ctrl-C in the command-line tools: an interrupt never splits a write, and the message says what was written.

Every place that makes a result visible on disk (`runtime.atomic.staged_files` renaming its files into
place, deploy renaming the finished workspace) does so inside `held()` and then `record`s what it wrote.
A command that catches KeyboardInterrupt asks `written()` what is complete and prints one line

    interrupted: <what was written and what was not>

returning 0 when everything it was asked for had already been written (the interrupt came too late to
change anything) and 130 (128 + SIGINT, the shell's convention) otherwise.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_INTERRUPTED = 130
_written: list[str] = []  # what this process has finished writing, in order


def reset() -> None:
    """Forget earlier writes (a command calls this first; tests run several commands in one process)."""
    _written.clear()


def record(what: str) -> None:
    _written.append(what)


def written() -> list[str]:
    return list(_written)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then deliver it: the block runs whole or, if it fails, not at
    all. Off the main thread (where no handler can be set) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    requested = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: requested.append(signum))
    if previous is None:  # a handler installed outside Python: Python's default is the closest we can restore
        previous = signal.default_int_handler
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if requested:  # deliver it as the outer handler would have (default: KeyboardInterrupt)
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def interrupted(message: str, complete: bool = False) -> int:
    """Print the one-line interrupt message; the exit code says whether the command's output is complete."""
    print(f"interrupted: {message}", file=sys.stderr)
    return 0 if complete else EXIT_INTERRUPTED
