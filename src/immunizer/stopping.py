"""Stopping a long command at its next safe point instead of in the middle of a piece of work.

`GracefulStop` turns a first Ctrl-C (SIGINT) or SIGTERM into a request that the command reads between pieces
(`stop()` returns the signal's name); a second one acts as it would have without it (Ctrl-C raises
KeyboardInterrupt, SIGTERM ends the process). Nothing is lost either way, since every result is written
atomically; the first signal only saves the piece in progress (an attack and its evaluations can take an hour
on a CPU)."""
from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_FILE = "STOP"
"""OUT/STOP (`touch OUT/STOP`) asks the `bench` or `immunize` writing to OUT to stop, as a first Ctrl-C does: the
way to reach a job started elsewhere (nohup, another shell, shards on several machines, `accelerate launch`,
whose launcher kills its processes soon after passing them a Ctrl-C)."""


def stop_file_asked(out: str | Path, since: float) -> str | None:
    """OUT/STOP's path when it was created or touched at or after `since` (`time.time()` when the job started),
    else None: an older file is a finished job's. Its time is the file system's, compared with this machine's
    clock: shards on several machines sharing OUT need their clocks in step."""
    path = Path(out) / STOP_FILE
    try:
        return str(path) if path.stat().st_mtime >= since else None
    except FileNotFoundError:
        return None


class Stopped(Exception):
    """A long run stopped at a safe point because a stop was asked for; what it had done is saved, and its
    message says which command continues it."""


class GracefulStop:
    """`stop()`: the first signal's name, else (given `out`) OUT/STOP's path once it is touched after this
    started, else None. `clear_stop_file()` removes OUT/STOP when the work is done, so that it does not carry over."""

    def __init__(self, what: str = "the current piece", out: str | Path | None = None):
        self.what = what
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self.out, self.started = out, time.time()

    def __call__(self) -> str | None:
        if self.received or self.out is None:
            return self.received
        return stop_file_asked(self.out, self.started)

    def clear_stop_file(self) -> None:
        if self.out is not None:
            (Path(self.out) / STOP_FILE).unlink(missing_ok=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.received is not None:  # the second one: what it would have done without us
            self._restore()
            signal.raise_signal(number)
            return
        self.received = name
        print(f"\n{name}: stopping after {self.what} (its results are kept; the same command continues). "
              f"Send it again to stop now.", file=sys.stderr, flush=True)
