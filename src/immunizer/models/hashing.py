"""Content hashes of model weights, independent of how the weights are sharded into files."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

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


def safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ImmunizerError(
            f"{model_dir} holds no *.safetensors weights; save the model with "
            "`model.save_pretrained(dir)` (safetensors is the default) or pass a .gguf file."
        )
    return files


def model_dir_sha256(model_dir: Path) -> str:
    """The same hash as `state_dict_sha256(model.state_dict())` for what is on disk, read one tensor at a time."""
    index: dict[str, Path] = {}
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                index[k] = f
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
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes
