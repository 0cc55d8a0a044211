"""Pieces of a bench claimed by the process measuring them, so that any number of processes given the same
command (on one machine, or on several sharing a file system with working locks) measure one OUT together,
piece by piece, and never measure a piece twice.

A piece is a method-seed's build (training, breaker bounds, the evaluation before any attack) or one of its
attacks or fine-tunes with every evaluation of it. Its claim is an OS file lock (filelock) on
OUT/claims/PIECE.lock: the kernel drops it when the holding process ends, however it ends, so a killed process
leaves no claim behind and the next process takes the piece over (it resumes from the piece's checkpoint or
starts it again). Beside the lock, PIECE.json says who holds it, for `immunizer bench --status`."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from immunizer.paths import write_json_atomic

CLAIMS_DIR = "claims"
_held: dict[Path, FileLock] = {}  # this process's claims, by lock path


def piece(method: str, seed: int, part: str) -> str:
    """A piece's name: `part` is "build" or a run's name (e.g. "sft-seed1-harmful-sft")."""
    return f"{method}-seed{seed}-{part}"


def _paths(out: Path, piece: str) -> tuple[Path, Path]:
    folder = Path(out) / CLAIMS_DIR
    return folder / f"{piece}.lock", folder / f"{piece}.json"


def take(out: Path, piece: str) -> bool:
    """Claim `piece` for this process: True when it is now this process's to measure, False when another process
    holds it (it is measuring it now)."""
    lock_path, info_path = _paths(out, piece)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return False
    _held[lock_path] = lock
    write_json_atomic(info_path, {"piece": piece, "host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return True


def release(out: Path, piece: str) -> None:
    """Give `piece` back (done, or stopped with what it saved): its holder's note goes first, then the lock."""
    lock_path, info_path = _paths(out, piece)
    info_path.unlink(missing_ok=True)
    lock = _held.pop(lock_path, None)
    if lock is not None:
        lock.release()


def holder(out: Path, piece: str) -> dict | None:
    """Who measures `piece` now ({"host", "pid", "since"}), read without touching the lock (trying it would make a
    worker that tries at the same moment think the piece taken). A note a killed process left is ignored when
    its process is gone from this machine; one from another machine is believed."""
    import psutil

    try:
        info = json.loads(_paths(out, piece)[1].read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("host") == socket.gethostname() and not psutil.pid_exists(int(info.get("pid", -1))):
        return None
    return info


def holders(out: Path) -> dict[str, dict]:
    """Every piece of OUT claimed now, by piece name."""
    found = {}
    for path in sorted((Path(out) / CLAIMS_DIR).glob("*.json")):
        info = holder(out, path.stem)
        if info is not None:
            found[path.stem] = info
    return found
