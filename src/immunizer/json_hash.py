"""The fingerprint of a JSON value: what configs, data sets, caches, rows and reports are named and checked by."""
from __future__ import annotations

import hashlib
import json


def json_sha256(value, *, sort_keys: bool = True, default=None) -> str:
    """Hex SHA-256 of `json.dumps(value, sort_keys=sort_keys, default=default)`.

    The arguments are part of every hash already written down (config_sha256 and data_sha256 in manifests
    and checkpoints, cache keys, dataset versions): a call site keeps the ones it was written with, or the
    runs and caches it fingerprinted stop matching."""
    return hashlib.sha256(json.dumps(value, sort_keys=sort_keys, default=default).encode()).hexdigest()
