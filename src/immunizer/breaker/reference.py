"""What a candidate is compared with: the manifest's canaries plus a fixed, seeded sample of
non-canary weights of the released model (`reference.safetensors`, listed and hashed in the
manifest), so that scanning reads only the candidate, never the released model again."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from immunizer.breaker.safetensors_reader import safetensors_tensors
from immunizer.errors import ImmunizerError
from immunizer.manifest import Manifest, check_reseal, file_sha256, load_manifest, update_manifest
from immunizer.paths import atomic_path

REFERENCE_FILE = "reference.safetensors"
SAMPLE_SHARE = 0.0025
"""Share of each parameter's non-canary weights in the sample: 0.25% of 135M is 336k weights (4 MB), which
pins the RMS to ~0.2% (its standard error is ~1/√n times the drift's kurtosis factor)."""
MIN_SAMPLES = 64
"""Small parameters (norms, biases) still get this many samples, or all their weights."""


@dataclass
class Reference:
    canary_index: dict[str, torch.Tensor]
    canary_value: dict[str, torch.Tensor]
    sample_index: dict[str, torch.Tensor]
    sample_value: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    direction: dict[str, torch.Tensor] | None = None
    """Per canary, ±1: the sign of the step a harmful fine-tune takes there (direction.py); None until calibrated."""
    statistic_name: str = "canary_drift_ratio"
    sample_direction: dict[str, torch.Tensor] | None = None
    """The same signs at the non-canary sample (`sample_harm_ratio`); None for references written before it."""

    @property
    def names(self) -> list[str]:
        return sorted(self.canary_index)


def _seed(seed: int, name: str) -> int:
    # Per-parameter seeds: the sample does not depend on the order parameters are visited in.
    return int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def sample_indices(numel: int, canaries: torch.Tensor, share: float, seed: int, name: str) -> torch.Tensor:
    """Ascending flat indices of a seeded uniform sample of the parameter's non-canary weights."""
    want = min(numel, max(MIN_SAMPLES, round(numel * share)))
    g = torch.Generator().manual_seed(_seed(seed, name))
    if want * 4 >= numel:  # small tensors: all non-canary weights, or a permutation prefix
        picked = torch.randperm(numel, generator=g)[: want + canaries.numel()]
    else:  # large tensors: draw with replacement, deduplicate (collisions are rare at this share)
        picked = torch.randint(0, numel, (want + want // 8 + canaries.numel(),), generator=g)
    picked = torch.unique(picked)
    picked = picked[~torch.isin(picked, canaries)]
    if picked.numel() > want:  # keep a seeded subset of the right size, independent of order
        keep = torch.randperm(picked.numel(), generator=g)[:want]
        picked = picked[keep].sort().values
    return picked


def build_reference(manifest: Manifest, tensors: Iterator[tuple[str, torch.Tensor]], share: float = SAMPLE_SHARE,
                    seed: int = 0, where: str | Path = "the released model") -> Reference:
    """Sample the released model's non-canary weights (every floating-point parameter, canaries or not),
    one tensor at a time. The model must hold the
    manifest's released values at the canaries (else it is not the released model)."""
    canary_index, canary_value = _with_empty(manifest, [])
    sample_index, sample_value, shapes = {}, {}, {}
    for name, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        canary_index.setdefault(name, torch.zeros(0, dtype=torch.int64))
        canary_value.setdefault(name, torch.zeros(0))
        flat = tensor.detach().reshape(-1)
        if not torch.equal(flat[canary_index[name].to(flat.device)].float().cpu(), canary_value[name]):
            raise ImmunizerError(f"{where} is not the released model of this manifest: its values at the canaries of "
                                 f"{name} differ from the released ones. Pass the model `immunizer immunize` wrote")
        idx = sample_indices(flat.numel(), canary_index[name], share, seed, name)
        sample_index[name] = idx
        sample_value[name] = flat[idx.to(flat.device)].float().cpu()
        shapes[name] = tuple(tensor.shape)
    missing = sorted(set(manifest.indices) - set(shapes))
    if missing:
        raise ImmunizerError(f"the released model lacks {len(missing)} canary parameters (e.g. {missing[0]}); "
                             "is it the model the manifest was written for?")
    return Reference(canary_index, canary_value, sample_index, sample_value, shapes)


def _with_empty(manifest: Manifest, names) -> tuple[dict, dict]:
    """Canary indices and values for `names` and every manifest parameter; empty where a parameter has none."""
    index, value = dict(manifest.indices), dict(manifest.values)
    for name in names:
        index.setdefault(name, torch.zeros(0, dtype=torch.int64))
        value.setdefault(name, torch.zeros(0))
    return index, value


def write_reference(directory: Path, reference: Reference, share: float, seed: int,
                    hmac_key: bytes | str | None = None, direction_meta: dict | None = None) -> dict:
    """Write reference.safetensors and list it (with its hash) in the manifest, which is re-sealed."""
    directory = Path(directory)
    tensors = {}
    for name in sorted(reference.sample_index):
        tensors[f"{name}::sample_index"] = reference.sample_index[name].contiguous()
        tensors[f"{name}::sample_value"] = reference.sample_value[name].contiguous()
    for name, signs in (reference.direction or {}).items():
        tensors[f"{name}::direction"] = signs.to(torch.int8).contiguous()
    for name, signs in (reference.sample_direction or {}).items():
        tensors[f"{name}::sample_direction"] = signs.to(torch.int8).contiguous()
    with atomic_path(directory / REFERENCE_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"shapes": json.dumps({k: list(v) for k, v in reference.shapes.items()})})
    entry = {"file": REFERENCE_FILE, "sha256": file_sha256(directory / REFERENCE_FILE), "share": share, "seed": seed,
             "num_samples": sum(int(v.numel()) for v in reference.sample_index.values()),
             "direction": reference.direction is not None, "sample_direction": reference.sample_direction is not None,
             **(direction_meta or {})}
    return update_manifest(directory, {"reference": entry}, hmac_key=hmac_key)


def read_reference(manifest: Manifest) -> Reference | None:
    """The reference sample listed in a verified manifest, or None when it has none yet."""
    entry = manifest.meta.get("reference")
    if not entry:
        return None
    path = Path(manifest.directory) / entry["file"]
    again = "Re-run `immunizer calibrate` (it rewrites the reference sample) or restore the published files."
    if not path.is_file():
        raise ImmunizerError(f"{path} is listed in the manifest but missing. {again}")
    if file_sha256(path) != entry["sha256"]:
        raise ImmunizerError(f"{path} does not match the sha256 in manifest.json (corrupted or swapped). {again}")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(v) for k, v in json.loads(f.metadata()["shapes"]).items()}
            index = {k.rpartition("::")[0]: f.get_tensor(k) for k in f.keys() if k.endswith("::sample_index")}
            value = {k.rpartition("::")[0]: f.get_tensor(k) for k in f.keys() if k.endswith("::sample_value")}
            direction = {k.rpartition("::")[0]: f.get_tensor(k).float() for k in f.keys() if k.endswith("::direction")}
            sample_direction = {k.rpartition("::")[0]: f.get_tensor(k).float() for k in f.keys()
                                if k.endswith("::sample_direction")}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise ImmunizerError(f"{path} cannot be read ({exc}). {again}") from exc
    if not set(manifest.indices) <= set(index) or set(value) != set(index):
        raise ImmunizerError(f"{path} does not cover the manifest's canary parameters. {again}")
    if direction and any(direction[n].numel() != manifest.indices[n].numel() for n in direction):
        raise ImmunizerError(f"{path}: the harmful direction does not match the canaries. {again}")
    if any(name not in index or signs.numel() != index[name].numel() for name, signs in sample_direction.items()):
        raise ImmunizerError(f"{path}: the harmful direction at the sample does not match the sample. {again}")
    default = "harm_drift_ratio" if direction else "canary_drift_ratio"
    return Reference(*_with_empty(manifest, index), index, value, shapes, direction or None,
                     (manifest.meta.get("breaker") or {}).get("statistic", default), sample_direction or None)


def load_reference(directory: Path, hmac_key: bytes | str | None = None, write: bool = False,
                   base: str | Path | None = None, require_hmac: bool | None = None) -> tuple[Manifest, Reference]:
    """Verify the manifest in `directory` and return it with its reference. A manifest without a
    reference sample gets one built from the released model, `base` or else DIR/model (and written
    into the manifest when `write`)."""
    manifest = load_manifest(directory, hmac_key=hmac_key, require_hmac=require_hmac)
    reference = read_reference(manifest)
    if reference is not None:
        return manifest, reference
    model_dir = Path(base) if base else Path(directory) / manifest.meta.get("model_dir", "model")
    if not model_dir.is_dir():
        raise ImmunizerError(f"the manifest in {directory} has no reference sample and {model_dir} is missing; "
                             "pass the complete `immunizer immunize` output directory, or the released model as --release-model")
    if write:
        check_reseal(manifest.meta, directory, hmac_key)
    reference = build_reference(manifest, safetensors_tensors(model_dir), where=model_dir)
    if write:
        meta = write_reference(directory, reference, SAMPLE_SHARE, 0, hmac_key=hmac_key)
        manifest = Manifest(manifest.indices, manifest.values, meta, manifest.directory)
    return manifest, reference
