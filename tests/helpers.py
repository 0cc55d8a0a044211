"""Helpers the tests import (conftest.py holds the fixtures): the CLI as a user runs it, and a released
tiny model with a canary manifest."""
import io
import os
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout

CLI = [sys.executable, "-m", "immunizer"]


def run_cli(*args, check=True, fresh=False):
    """Run the `immunizer` command line; fail with its output unless it exits 0 (or check=False).

    In this process by default, through the same entry point (`immunizer.cli.main`: its exit codes, its
    stdout and stderr): a new interpreter spends ~9 s importing torch and transformers per call, which was most
    of the suite's time. `fresh=True` starts one, as a shell does (the entry-point tests, and whatever must not
    share this process's state). An exception that escapes is exit 1 with its traceback on stderr, as Python's."""
    if fresh:
        proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=os.environ.copy())
    else:
        from immunizer.cli import main

        out, err, code = io.StringIO(), io.StringIO(), 0
        argv, sys.argv = sys.argv, ["immunizer", *map(str, args)]
        try:
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    main()
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
                    if isinstance(exc.code, str):
                        print(exc.code, file=sys.stderr)
                except Exception:  # noqa: BLE001 (what the interpreter would print before exiting 1)
                    traceback.print_exc()
                    code = 1
        finally:
            sys.argv = argv
        proc = subprocess.CompletedProcess([*CLI, *args], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr[-3000:]}")
    return proc


def make_release(directory, seed: int = 0, k_percent: float = 2.0, model=None):
    """A 'released' tiny model with a manifest whose canaries are the top-K% of random scores:
    what the breaker needs, without running immunization (tests of immunize do that)."""
    import torch

    from immunizer.canaries import ScoreShard, canary_values, select_top_percent
    from immunizer.manifest import write_manifest
    from immunizer.models.hashing import model_dir_sha256
    from immunizer.models.tiny import tiny_model, tiny_tokenizer

    model = model if model is not None else tiny_model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    shards = [ScoreShard(n, torch.rand(p.numel(), generator=g)) for n, p in model.named_parameters()]
    canaries = select_top_percent(shards, k_percent)
    model.save_pretrained(directory / "model")
    tiny_tokenizer().save_pretrained(directory / "model")
    write_manifest(directory, canaries, canary_values(model, canaries), k_percent=k_percent,
                   num_parameters=sum(p.numel() for p in model.parameters()),
                   model_sha256=model_dir_sha256(directory / "model"), extra={"model_dir": "model"})
    return model
