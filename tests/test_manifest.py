"""Manifest round trip and every way it can be broken: missing, truncated, edited, forged."""
import json

import pytest
import torch

from immunizer.errors import ImmunizerError
from immunizer.manifest import (CANARY_FILE, MANIFEST_FILE, check_against_parameters, load_manifest, update_manifest,
                                write_manifest)


def write_example(directory, key=None):
    indices = {"w": torch.tensor([0, 3, 7]), "b": torch.tensor([1])}
    values = {"w": torch.tensor([0.1, 0.2, 0.3]), "b": torch.tensor([-1.0])}
    return write_manifest(directory, indices, values, k_percent=20.0, num_parameters=20, model_sha256="ab" * 32,
                          extra={"config_sha256": "cd" * 32, "data_sha256": "ef" * 32}, hmac_key=key)


def test_round_trip(tmp_path):
    meta = write_example(tmp_path)
    m = load_manifest(tmp_path)
    assert meta["format"] == "immunizer.canaries/v1" and m.num_canaries == 4 == meta["num_canaries"]
    assert m.indices["w"].tolist() == [0, 3, 7] and m.indices["w"].dtype == torch.int64
    assert torch.equal(m.values["w"], torch.tensor([0.1, 0.2, 0.3]))
    for field in ("k_percent", "num_parameters", "model_sha256", "config_sha256", "data_sha256", "sha256"):
        assert field in m.meta


def test_missing_files(tmp_path):
    with pytest.raises(ImmunizerError, match="manifest.json is missing"):
        load_manifest(tmp_path)
    write_example(tmp_path)
    (tmp_path / CANARY_FILE).unlink()
    with pytest.raises(ImmunizerError, match="canaries.safetensors is missing"):
        load_manifest(tmp_path)


def test_truncated_files(tmp_path):
    write_example(tmp_path)
    data = (tmp_path / CANARY_FILE).read_bytes()
    (tmp_path / CANARY_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ImmunizerError, match="does not match the sha256"):
        load_manifest(tmp_path)
    text = (tmp_path / MANIFEST_FILE).read_text()
    (tmp_path / MANIFEST_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ImmunizerError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_edited_json_is_caught_by_its_own_hash(tmp_path):
    write_example(tmp_path)
    meta = json.loads((tmp_path / MANIFEST_FILE).read_text())
    meta["k_percent"] = 50.0
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(meta))
    with pytest.raises(ImmunizerError, match="edited or corrupted"):
        load_manifest(tmp_path)


def test_wrong_format(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": "something/v9"}))
    with pytest.raises(ImmunizerError, match="expected 'immunizer.canaries/v1'"):
        load_manifest(tmp_path)


def forge(directory, key=None):
    """Rewrite both files consistently with different canary values, as an attacker could."""
    old = load_manifest(directory, hmac_key=key) if key else load_manifest(directory)
    meta = {k: v for k, v in old.meta.items() if k not in ("sha256", "manifest_sha256", "hmac", "parameters",
                                                           "num_canaries", "format", "k_percent", "num_parameters",
                                                           "model_sha256", "canary_file")}
    write_manifest(directory, old.indices, {n: v + 1 for n, v in old.values.items()}, k_percent=20.0,
                   num_parameters=20, model_sha256="ab" * 32, extra=meta)


def test_forgery_needs_the_hmac_key_to_be_caught(tmp_path):
    write_example(tmp_path, key=b"secret")
    load_manifest(tmp_path, hmac_key=b"secret")
    with pytest.raises(ImmunizerError, match="HMAC mismatch"):
        load_manifest(tmp_path, hmac_key=b"other key")
    forge(tmp_path, key=b"secret")  # re-sealed without the key: no hmac field any more
    with pytest.raises(ImmunizerError, match="carries no HMAC"):
        load_manifest(tmp_path, hmac_key=b"secret")
    with pytest.raises(ImmunizerError, match="carries no HMAC"):
        load_manifest(tmp_path, require_hmac=True)
    assert load_manifest(tmp_path).values["b"].item() == 0.0  # without a key a careful forgery passes: documented


def test_hmac_fields_tampered_with(tmp_path, monkeypatch):
    monkeypatch.setenv("IMMUNIZER_MANIFEST_KEY", "k1")
    write_example(tmp_path)
    meta = json.loads((tmp_path / MANIFEST_FILE).read_text())
    meta["hmac"] = "0" * 64
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(meta))
    with pytest.raises(ImmunizerError, match="HMAC mismatch"):
        load_manifest(tmp_path)


def test_update_re_seals(tmp_path):
    write_example(tmp_path, key="k")
    update_manifest(tmp_path, {"threshold": 3.5}, hmac_key="k")
    assert load_manifest(tmp_path, hmac_key="k").meta["threshold"] == 3.5


def test_indices_must_ascend(tmp_path):
    with pytest.raises(ValueError, match="ascending"):
        write_manifest(tmp_path, {"w": torch.tensor([3, 1])}, {"w": torch.tensor([0.0, 0.0])}, k_percent=1,
                       num_parameters=10, model_sha256="x")


def test_model_shape_mismatch_is_explained(tmp_path):
    write_example(tmp_path)
    m = load_manifest(tmp_path)
    check_against_parameters(m, {"w": (2, 4), "b": (2,)})
    with pytest.raises(ImmunizerError, match="w has 4 elements but a canary index 7"):
        check_against_parameters(m, {"w": (4,), "b": (2,)})
    with pytest.raises(ImmunizerError, match="parameter b is missing"):
        check_against_parameters(m, {"w": (8,)})


def test_a_signed_manifest_is_never_re_sealed_without_its_key(tmp_path):
    write_example(tmp_path, key="k")
    with pytest.raises(ImmunizerError, match="is signed; re-sealing it without its key would drop the signature"):
        update_manifest(tmp_path, {"threshold": 3.5})
    assert "hmac" in json.loads((tmp_path / MANIFEST_FILE).read_text())  # untouched
    load_manifest(tmp_path, hmac_key="k", require_hmac=True)


@pytest.mark.parametrize("empty", ["", b"", "  \n"])
def test_empty_keys_are_refused(tmp_path, monkeypatch, empty):
    write_example(tmp_path, key="k")
    with pytest.raises(ImmunizerError, match="is empty; an empty key signs nothing"):
        load_manifest(tmp_path, hmac_key=empty)
    with pytest.raises(ImmunizerError, match="is empty"):
        write_example(tmp_path / "new", key=empty)
    monkeypatch.setenv("IMMUNIZER_MANIFEST_KEY", "")
    with pytest.raises(ImmunizerError, match=r"\$IMMUNIZER_MANIFEST_KEY is empty"):
        load_manifest(tmp_path)


def test_require_hmac_from_the_environment(tmp_path, monkeypatch):
    write_example(tmp_path)  # unsigned
    load_manifest(tmp_path)
    monkeypatch.setenv("IMMUNIZER_REQUIRE_HMAC", "1")
    with pytest.raises(ImmunizerError, match="carries no HMAC but one is required"):
        load_manifest(tmp_path)
    load_manifest(tmp_path, require_hmac=False)  # an explicit choice wins
    write_example(tmp_path / "signed", key="k")
    with pytest.raises(ImmunizerError, match="no key was given"):
        load_manifest(tmp_path / "signed")
    assert load_manifest(tmp_path / "signed", hmac_key="k").meta["hmac"]


@pytest.mark.parametrize("value", [12, "é" * 64, "zz", None, ["a"]])
def test_a_malformed_hmac_is_a_message_not_a_crash(tmp_path, value):
    write_example(tmp_path, key="k")
    meta = json.loads((tmp_path / MANIFEST_FILE).read_text())
    meta["hmac"] = value  # the hmac field is outside manifest_sha256: this edit passes the hash check
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(meta))
    for key in ("k", None):
        with pytest.raises(ImmunizerError, match="is not a hex SHA-256 HMAC"):
            load_manifest(tmp_path, hmac_key=key)
