"""Releases: immunize output directories side by side in a releases directory, and `current.json`, the
pointer to the one that ships. Only a PASS verdict moves the pointer; a FAIL leaves it where it was,
which is the rollback: the last release stays current and the rejected candidate stays in the cycle's
output for inspection. A promotion moves the pointer only if it still points where it did when the
cycle began (compare and swap under a file lock): two cycles never overwrite each other's release.

    releases/
      current.json          {"release": "release-1a2b3c4d5e6f", "model_sha256", "promoted_at", "verdict", "history": [...]}
      v1/                   the first release (any immunize output)
      release-1a2b3c4d5e6f/ model/, manifest.json, canaries.safetensors, report.json (its bench),
                            verdict.json, dataset.json (what it was trained on), refresh.json, reward_model/
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from immunizer.errors import ImmunizerError
from immunizer.paths import atomic_path, write_json_atomic

POINTER = "current.json"
LOCK = ".current.json.lock"
REPORT = "report.json"


@dataclass(frozen=True)
class Release:
    directory: Path
    home: Path
    """The releases directory whose current.json points at the current release."""
    pointer: dict | None
    """current.json as it is (None before the first promotion)."""

    @property
    def report(self) -> Path | None:
        path = self.directory / REPORT
        return path if path.is_file() else None


def resolve_release(path: str | Path) -> Release:
    """`path` is a releases directory with current.json, or a release (an immunize output) itself,
    whose parent then holds the releases."""
    path = Path(path)
    pointer_file = path / POINTER
    if pointer_file.is_file():
        pointer = json.loads(pointer_file.read_text())
        directory = path / pointer["release"]
        if not (directory / "manifest.json").is_file():
            raise ImmunizerError(f"{pointer_file} points at {directory}, which holds no release (no manifest.json); "
                                 "restore that directory or fix current.json")
        return Release(directory, path, pointer)
    if (path / "manifest.json").is_file():
        home = path.parent
        if (home / POINTER).is_file():
            current = home / json.loads((home / POINTER).read_text())["release"]
            if current.resolve() != path.resolve():
                raise ImmunizerError(f"{path} is not the current release of {home} (that is {current}); pass "
                                     f"--release {home} to start from the current one")
            return resolve_release(home)
        return Release(path, home, None)
    raise ImmunizerError(f"{path} is neither a release (an `immunizer immunize` output with manifest.json) nor a "
                         f"releases directory with {POINTER}")


def _link_or_copy(src: str, dst: str) -> None:
    """Hard links where the filesystem allows (a release is hundreds of MB and never edited in place)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def promote(release: Release, candidate: Path, extras: dict[str, Path], verdict: dict) -> dict:
    """Copy `candidate` (plus `extras`: name in the release → file or directory) into the releases
    directory as a new release and move current.json to it; return the new pointer."""
    meta = json.loads((candidate / "manifest.json").read_text())
    name = f"release-{meta['model_sha256'][:12]}"
    target = release.home / name
    if not (target / "manifest.json").is_file():
        with atomic_path(target) as tmp:
            shutil.copytree(candidate, tmp, copy_function=_link_or_copy,
                            ignore=shutil.ignore_patterns("checkpoint", ".*"))
            for rel_name, src in extras.items():
                if Path(src).is_dir():
                    shutil.copytree(src, tmp / rel_name, copy_function=_link_or_copy)
                elif Path(src).is_file():
                    shutil.copy2(src, tmp / rel_name)
    with _pointer_lock(release.home):
        # compare and swap: another cycle (or this one, resumed) may have moved the pointer since this
        # cycle read it; promoting over that would silently replace a newer release
        now = _read_pointer(release.home)
        if now and now["release"] == name:  # promoted already (a resumed cycle)
            return now
        if now != release.pointer:
            raise ImmunizerError(
                f"{release.home / POINTER} changed since this cycle began: it pointed at "
                f"{(release.pointer or {}).get('release', 'no release')} and now points at "
                f"{(now or {}).get('release', 'no release')}. Another cycle promoted a release; the candidate "
                f"is kept in {target}. Start a new cycle with --release {release.home} to build on the current one")
        previous = dict(release.pointer or {"release": os.path.relpath(release.directory, release.home),
                                            "promoted_at": None})
        history = [*previous.pop("history", []), previous]
        pointer = {"release": name, "model_sha256": meta["model_sha256"],
                   "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "verdict": verdict["summary"], "policy": verdict["policy"], "history": history}
        write_json_atomic(release.home / POINTER, pointer)
    return pointer


def _read_pointer(home: Path) -> dict | None:
    path = home / POINTER
    return json.loads(path.read_text()) if path.is_file() else None


@contextlib.contextmanager
def _pointer_lock(home: Path):
    """An exclusive lock on the releases directory's pointer, held across read, compare and write."""
    with open(home / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
