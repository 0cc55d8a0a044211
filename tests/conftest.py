import os

import pytest

from helpers import make_release


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


@pytest.fixture
def release(tmp_path):
    """(directory, model) of a released tiny model with a canary manifest."""
    directory = tmp_path / "release"
    return directory, make_release(directory)


# Review store: a PostgreSQL server for the session, a fresh database per test (review_fixtures.py).
from review_fixtures import db_url, pg_cluster  # noqa: E402,F401
