import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "immunizer"]


def run_cli(*args, check=True):
    """Run the `immunizer` command the way a user does; fail with its output unless it exits 0 (or check=False)."""
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=os.environ.copy())
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr[-3000:]}")
    return proc

# Tests never touch a user's cache: converted models and teacher generations go to a temp dir
# shared by the session (the embedded model is converted once per test session).
@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    if not os.environ.get("IMMUNIZER_TEST_KEEP_CACHE"):
        os.environ["IMMUNIZER_CACHE"] = str(tmp_path_factory.mktemp("immunizer-cache"))
    os.environ.pop("IMMUNIZER_MANIFEST_KEY", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["IMMUNIZER_INCIDENTS"] = str(tmp_path_factory.mktemp("incidents") / "incidents.jsonl")
    yield


@pytest.fixture
def tiny():
    from immunizer.models.tiny import tiny_model, tiny_tokenizer

    return tiny_model(), tiny_tokenizer()


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


@pytest.fixture
def release(tmp_path):
    """(directory, model) of a released tiny model with a canary manifest."""
    directory = tmp_path / "release"
    return directory, make_release(directory)


# Review store: a PostgreSQL server for the session, a fresh database per test (review_fixtures.py).
from review_fixtures import db_url, pg_cluster  # noqa: E402,F401
