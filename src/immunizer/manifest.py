"""The canary manifest: `canaries.safetensors` (per parameter P: `P::index`, flat int64 indices,
ascending; `P::value`, released fp32 values) and `manifest.json` (what was selected, from which
model, config and data, with hashes over everything). Loading verifies all of it."""
from __future__ import annotations

import hashlib
import hmac as hmac_lib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from immunizer.canaries import canary_values
from immunizer.errors import ImmunizerError
from immunizer.models.hashing import model_dir_sha256
from immunizer.paths import atomic_path, write_json_atomic

FORMAT = "immunizer.canaries/v1"
CANARY_FILE = "canaries.safetensors"
MANIFEST_FILE = "manifest.json"
HMAC_ENV = "IMMUNIZER_MANIFEST_KEY"
REQUIRE_HMAC_ENV = "IMMUNIZER_REQUIRE_HMAC"
"""Set to 1 to make every manifest read (scan, Breaker, load_guarded, the guard) require a verified HMAC."""
_SELF_FIELDS = ("manifest_sha256", "hmac")


@dataclass
class Manifest:
    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    directory: Path | None = None

    @property
    def num_canaries(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(meta: dict, without: tuple[str, ...]) -> bytes:
    return json.dumps({k: v for k, v in meta.items() if k not in without}, sort_keys=True, separators=(",", ":")).encode()


def signing_key(hmac_key: bytes | str | None) -> bytes | None:
    """The key given, else $IMMUNIZER_MANIFEST_KEY, else None. An empty key is refused: it would sign
    (and verify) anything, and an empty variable usually means a secret that failed to load."""
    if hmac_key is not None:
        key, where = hmac_key, "the HMAC key given"
    elif HMAC_ENV in os.environ:
        key, where = os.environ[HMAC_ENV], f"${HMAC_ENV}"
    else:
        return None
    key = key.encode() if isinstance(key, str) else bytes(key)
    if not key.strip():
        raise ImmunizerError(f"{where} is empty; an empty key signs nothing. Give the publisher's key "
                             f"(--hmac-key-file or ${HMAC_ENV}), or unset ${HMAC_ENV} to read the manifest unsigned")
    return key


def hmac_required(require_hmac: bool | None) -> bool:
    """An explicit choice, else $IMMUNIZER_REQUIRE_HMAC (a deployment sets it once for every reader)."""
    if require_hmac is not None:
        return require_hmac
    return os.environ.get(REQUIRE_HMAC_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_reseal(meta: dict, directory: Path, hmac_key: bytes | str | None) -> None:
    """Refuse to re-seal a signed manifest without its key: that would silently strip its signature."""
    if "hmac" in meta and signing_key(hmac_key) is None:
        raise ImmunizerError(f"the manifest in {directory} is signed; re-sealing it without its key would drop the "
                             f"signature. Pass the key (--hmac-key-file or ${HMAC_ENV})")


def seal(meta: dict, hmac_key: bytes | str | None = None) -> dict:
    """Recompute `manifest_sha256` (and `hmac` when a key is given or set in $IMMUNIZER_MANIFEST_KEY)."""
    meta = {k: v for k, v in meta.items() if k not in _SELF_FIELDS}
    meta["manifest_sha256"] = hashlib.sha256(_canonical(meta, _SELF_FIELDS)).hexdigest()
    key = signing_key(hmac_key)
    if key is not None:
        meta["hmac"] = hmac_lib.new(key, _canonical(meta, ("hmac",)), hashlib.sha256).hexdigest()
    return meta


def write_manifest(out_dir: Path, indices: dict[str, torch.Tensor], values: dict[str, torch.Tensor], *,
                   k_percent: float, num_parameters: int, model_sha256: str, extra: dict | None = None,
                   hmac_key: bytes | str | None = None) -> dict:
    out_dir = Path(out_dir)
    tensors = {}
    for name in sorted(indices):
        idx = indices[name].to(torch.int64).cpu().contiguous()
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"canary indices for {name} must be strictly ascending")
        tensors[f"{name}::index"] = idx
        tensors[f"{name}::value"] = values[name].to(torch.float32).cpu().contiguous()
    with atomic_path(out_dir / CANARY_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "k_percent": k_percent,
        "num_canaries": sum(int(i.numel()) for i in indices.values()),
        "num_parameters": num_parameters,
        "model_sha256": model_sha256,
        "canary_file": CANARY_FILE,
        "sha256": file_sha256(out_dir / CANARY_FILE),
        "parameters": {n: int(indices[n].numel()) for n in sorted(indices)},
        **(extra or {}),
    }
    meta = seal(meta, hmac_key)
    write_json_atomic(out_dir / MANIFEST_FILE, meta)
    return meta


def update_manifest(directory: Path, updates: dict, hmac_key: bytes | str | None = None) -> dict:
    """Add or replace fields (e.g. calibration results) and re-seal. The manifest is verified first."""
    current = load_manifest(directory, hmac_key=hmac_key)
    check_reseal(current.meta, directory, hmac_key)
    meta = seal({**current.meta, **updates}, hmac_key)
    write_json_atomic(Path(directory) / MANIFEST_FILE, meta)
    return meta


def _fail(directory: Path, problem: str, fix: str) -> ImmunizerError:
    return ImmunizerError(f"canary manifest in {directory}: {problem}. {fix}")


def load_manifest(directory: Path, hmac_key: bytes | str | None = None, require_hmac: bool | None = None) -> Manifest:
    """Read and verify a manifest. Raises ImmunizerError naming the problem for anything missing,
    truncated, edited or forged. A forger who rewrites both files can recompute the SHA-256s; only
    the HMAC (a key held by the publisher) detects that. `require_hmac` None: $IMMUNIZER_REQUIRE_HMAC."""
    directory = Path(directory)
    mpath, cpath = directory / MANIFEST_FILE, directory / CANARY_FILE
    again = "Re-run `immunizer immunize` or restore the published files."
    if not mpath.is_file():
        raise _fail(directory, f"{MANIFEST_FILE} is missing", "Pass the output directory of `immunizer immunize`.")
    try:
        meta = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(directory, f"{MANIFEST_FILE} is not valid JSON ({exc}); it may be truncated", again) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(directory, f"format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}",
                    "This file was not written by this version of immunizer.")
    expected = hashlib.sha256(_canonical(meta, _SELF_FIELDS)).hexdigest()
    if meta.get("manifest_sha256") != expected:
        raise _fail(directory, "manifest.json does not match its own manifest_sha256 (it was edited or corrupted)", again)
    if "hmac" in meta and not (isinstance(meta["hmac"], str) and re.fullmatch(r"[0-9a-f]{64}", meta["hmac"])):
        raise _fail(directory, f"its hmac field {str(meta['hmac'])[:80]!r} is not a hex SHA-256 HMAC (edited or corrupted)",
                    "Fetch the signed manifest from the publisher.")
    key = signing_key(hmac_key)
    if key is not None or hmac_required(require_hmac):
        if "hmac" not in meta:
            raise _fail(directory, "the manifest carries no HMAC but one is required", "Ask the publisher for a signed manifest.")
        if key is None:
            raise _fail(directory, "a verified HMAC is required but no key was given",
                        f"Set ${HMAC_ENV} or pass the key (--hmac-key-file).")
        good = hmac_lib.new(key, _canonical(meta, ("hmac",)), hashlib.sha256).hexdigest()
        if not hmac_lib.compare_digest(good, str(meta["hmac"])):
            raise _fail(directory, "HMAC mismatch: the manifest was forged or signed with another key",
                        "Do not trust these canaries; fetch the manifest from the publisher.")
    if not cpath.is_file():
        raise _fail(directory, f"{CANARY_FILE} is missing", again)
    if file_sha256(cpath) != meta.get("sha256"):
        raise _fail(directory, f"{CANARY_FILE} does not match the sha256 in manifest.json (truncated, corrupted or swapped)", again)
    try:
        with safe_open(str(cpath), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(directory, f"{CANARY_FILE} cannot be read ({exc})", again) from exc
    indices, values = {}, {}
    for key_name, tensor in tensors.items():
        name, _, kind = key_name.rpartition("::")
        (indices if kind == "index" else values if kind == "value" else {})[name] = tensor
    problems = []
    for name in sorted(set(indices) | set(values)):
        idx, val = indices.get(name), values.get(name)
        if idx is None or val is None:
            problems.append(f"{name} lacks its {'index' if idx is None else 'value'} tensor")
        elif idx.dtype != torch.int64 or val.dtype != torch.float32 or idx.shape != val.shape or idx.dim() != 1:
            problems.append(f"{name}: index must be 1-D int64 and value fp32 of the same length")
        elif idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            problems.append(f"{name}: indices are not strictly ascending")
    counted = sum(int(i.numel()) for i in indices.values())
    if counted != meta.get("num_canaries"):
        problems.append(f"it holds {counted} canaries but manifest.json says {meta.get('num_canaries')}")
    if problems:
        raise _fail(directory, "; ".join(problems[:5]), again)
    return Manifest(indices, values, meta, directory)


def check_against_parameters(manifest: Manifest, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every canary parameter must exist in the candidate with room for its indices."""
    problems = []
    for name, idx in manifest.indices.items():
        if name not in shapes:
            problems.append(f"parameter {name} is missing from the model")
            continue
        numel = 1
        for d in shapes[name]:
            numel *= d
        if idx.numel() and int(idx[-1]) >= numel:
            problems.append(f"{name} has {numel} elements but a canary index {int(idx[-1])}")
    if problems:
        raise ImmunizerError(
            "the model does not match the canary manifest: " + "; ".join(problems[:5])
            + ". Is this the same base model the manifest was written for?"
        )


def write_release(out_dir: Path, model: torch.nn.Module, tokenizer, canaries: dict[str, torch.Tensor], *,
                  k_percent: float, extra: dict, hmac_key: bytes | str | None = None) -> tuple[Path, dict]:
    """Save a trained model as OUT/model and seal its canaries in OUT/manifest.json (immunize and the
    harness's baseline defences write the same layout, so scan, eval and calibrate read either)."""
    model_dir = Path(out_dir) / "model"
    model.eval()
    with atomic_path(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    model_sha = model_dir_sha256(model_dir)
    num_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meta = write_manifest(out_dir, canaries, canary_values(model, canaries), k_percent=k_percent,
                          num_parameters=num_parameters, model_sha256=model_sha,
                          extra={**extra, "model_dir": "model"}, hmac_key=hmac_key)
    return model_dir, meta
