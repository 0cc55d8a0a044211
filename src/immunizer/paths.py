"""Where immunizer keeps its caches, and atomic writes (a crash never leaves half a file)."""
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


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary path next to `final`; it replaces `final` only if the block succeeds.

    Works for files and directories: the caller writes whatever it likes at the yielded path.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json_atomic(path: Path, obj) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file the project wrote itself (user files go through data.prompts.load_jsonl)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
