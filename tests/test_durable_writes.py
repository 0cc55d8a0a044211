"""Durable, atomic writes: new content reaches the disk before the rename and the rename before the
call returns; a run killed between the two renames of a directory swap resumes from the old copy;
and a promotion never overwrites a release another cycle promoted in the meantime."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from immunizer.checkpoint import load_checkpoint, save_checkpoint
from immunizer.errors import ImmunizerError
from immunizer.loop.releases import POINTER, Release, promote, resolve_release
from immunizer.paths import atomic_path, write_json_atomic


def test_atomic_writes_flush_the_file_and_the_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):  # the real fsync, recording what it flushed
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_json_atomic(tmp_path / "out" / "a.json", {"x": 1})
    assert any(path.endswith("/a.json") for path in synced), synced  # the content, before the rename
    assert str(tmp_path / "out") in synced  # the rename itself
    synced.clear()
    with atomic_path(tmp_path / "out" / "model") as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"w")
    assert any(path.endswith("/weights.bin") for path in synced) and str(tmp_path / "out") in synced


CHILD = textwrap.dedent("""
    import os, signal, sys
    from immunizer.checkpoint import save_checkpoint
    out = sys.argv[1]
    save_checkpoint(out, {"step": 1})
    real_replace, calls = os.replace, []
    def replace_then_die(src, dst):  # the kill -9 lands right after the swap's first rename
        real_replace(src, dst)
        calls.append(dst)
        if str(dst).endswith(".checkpoint.old"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace_then_die
    save_checkpoint(out, {"step": 2})
""")


def test_a_kill_between_the_two_renames_resumes_from_the_old_checkpoint(tmp_path):
    out = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr
    assert not (out / "checkpoint").exists() and (out / ".checkpoint.old" / "state.pt").is_file()
    assert load_checkpoint(out)["step"] == 1  # the last complete save, not a fresh start
    save_checkpoint(out, {"step": 3})
    assert load_checkpoint(out)["step"] == 3
    assert not (out / ".checkpoint.old").exists()


def _release(directory, sha):
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"model_sha256": sha * 64}))
    return directory


def test_promote_refuses_to_overwrite_a_release_promoted_since_the_cycle_began(tmp_path):
    home = tmp_path / "releases"
    _release(home / "v1", "1")
    verdict = {"summary": "PASS", "policy": {"name": "release"}}
    first = promote(resolve_release(home / "v1"), _release(tmp_path / "cand-a", "a"), {}, verdict)
    assert first["release"] == "release-aaaaaaaaaaaa"
    # two cycles start from the same current release
    cycle_b, cycle_c = resolve_release(home), resolve_release(home)
    promote(cycle_b, _release(tmp_path / "cand-b", "b"), {}, verdict)
    with pytest.raises(ImmunizerError, match="changed since this cycle began: it pointed at release-aaaaaaaaaaaa "
                                             "and now points at release-bbbbbbbbbbbb"):
        promote(cycle_c, _release(tmp_path / "cand-c", "c"), {}, verdict)
    assert json.loads((home / POINTER).read_text())["release"] == "release-bbbbbbbbbbbb"
    # a resumed cycle whose promotion already happened gets its own pointer back
    resumed = Release(cycle_b.directory, home, cycle_b.pointer)
    assert promote(resumed, tmp_path / "cand-b", {}, verdict)["release"] == "release-bbbbbbbbbbbb"
