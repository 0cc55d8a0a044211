"""Helpers the tests import (conftest.py holds the fixtures): the CLI as a user runs it, and a released
tiny model with a canary manifest."""
import os
import subprocess
import sys

CLI = [sys.executable, "-m", "immunizer"]


def run_cli(*args, check=True):
    """Run the `immunizer` command the way a user does; fail with its output unless it exits 0 (or check=False)."""
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=os.environ.copy())
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
