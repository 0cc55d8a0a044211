"""Content hashes of model weights, independent of how the weights are sharded into files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from immunizer.errors import ImmunizerError


def _update(h, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def state_dict_sha256(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda kv: kv[0]):
        _update(h, name, tensor)
    return h.hexdigest()


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """Exactly the weight files `from_pretrained` loads: `model.safetensors`, or the shards that
    `model.safetensors.index.json` lists. Any other *.safetensors beside them is refused: a reader that
    took every file would let decoy copies of the released weights dilute (or fake) a verdict."""
    model_dir = Path(model_dir)
    present = sorted(model_dir.glob("*.safetensors"))
    if (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    elif (model_dir / INDEX_FILE).is_file():
        files = _shards(model_dir)
    elif present:
        raise ImmunizerError(f"{model_dir} holds {', '.join(p.name for p in present)} but neither {SINGLE_FILE} nor "
                             f"{INDEX_FILE}, so `from_pretrained` would load none of it; save the model with "
                             "`model.save_pretrained(dir)` or pass the .safetensors file itself")
    else:
        raise ImmunizerError(
            f"{model_dir} holds no *.safetensors weights; save the model with "
            "`model.save_pretrained(dir)` (safetensors is the default) or pass a .gguf file."
        )
    stray = [p.name for p in present if p not in files]
    if stray:
        raise ImmunizerError(f"{model_dir} holds weight files that `from_pretrained` does not load: {', '.join(stray)} "
                             f"(it loads {', '.join(f.name for f in files)}). Remove them, or pass one .safetensors "
                             "file to check that file alone")
    return files


def _shards(model_dir: Path) -> list[Path]:
    try:
        weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImmunizerError(f"{model_dir / INDEX_FILE} is not a readable shard index ({exc}); save the model "
                             "again with `save_pretrained`") from exc
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or not (model_dir / n).is_file()]
    if bad:
        raise ImmunizerError(f"{model_dir / INDEX_FILE} lists shards that are not files in {model_dir}: {bad[:3]}; "
                             "save the model again with `save_pretrained`")
    return [model_dir / n for n in names]


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, over `safetensors_files`; a name held twice is refused."""
    index: dict[str, Path] = {}
    for f in safetensors_files(model_dir):
        try:
            with safe_open(str(f), framework="pt") as sf:
                keys = list(sf.keys())
        except (SafetensorError, OSError) as exc:
            raise ImmunizerError(f"{f} is not a readable safetensors file ({exc}); it may be truncated") from exc
        for k in keys:
            if k in index:
                raise ImmunizerError(f"tensor {k} is in both {index[k].name} and {f.name} in {model_dir}; "
                                     "which one a loader takes is arbitrary. Save the model again with `save_pretrained`")
            index[k] = f
    return index


def model_dir_sha256(model_dir: Path) -> str:
    """The same hash as `state_dict_sha256(model.state_dict())` for what is on disk, read one tensor at a time."""
    index = tensor_files(model_dir)
    h = hashlib.sha256()
    handles = {}
    try:
        for name in sorted(index):
            f = index[name]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt").__enter__()
            _update(h, name, handles[f].get_tensor(name))
    finally:
        for sf in handles.values():
            sf.__exit__(None, None, None)
    return h.hexdigest()


def safetensors_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes from the file headers only (no tensor is read)."""
    shapes = {}
    for k, f in tensor_files(model_dir).items():
        with safe_open(str(f), framework="pt") as sf:
            shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes
