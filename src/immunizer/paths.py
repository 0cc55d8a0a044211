"""Where immunizer keeps its caches, and atomic, durable writes (a crash or a power cut never leaves
half a file, and a finished write survives both)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Converted models and teacher generations. IMMUNIZER_CACHE points it elsewhere (tests do)."""
    root = os.environ.get("IMMUNIZER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "immunizer"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (the names created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and directory under a directory, to disk."""
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        return
    for root, _, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                with open(os.path.join(root, name), "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(Path(root))


def old_copy(final: Path) -> Path:
    """Where a directory swap parks the previous copy of `final` between its two renames."""
    return final.with_name(f".{final.name}.old")


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary path next to `final`; it replaces `final` only if the block succeeds.

    Works for files and directories: the caller writes whatever it likes at the yielded path. The new
    content is on disk before the rename and the rename is on disk before this returns. A directory
    is replaced by two renames (`final` → `.final.old`, new → `final`); a crash between them leaves
    only the old copy, which `existing_copy` finds.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield tmp
        fsync_tree(tmp)
        if final.is_dir() and not final.is_symlink():
            old = old_copy(final)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_dir(final.parent)
            # a crash in an earlier swap left the previous copy parked: it is stale now
            shutil.rmtree(old_copy(final), ignore_errors=True)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def existing_copy(final: Path) -> Path | None:
    """`final`, or the previous copy a crash in the middle of a directory swap left behind, or None."""
    final = Path(final)
    if final.exists():
        return final
    old = old_copy(final)
    return old if old.is_dir() else None


def write_json_atomic(path: Path, obj) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file the project wrote itself (user files go through data.prompts.load_jsonl)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
