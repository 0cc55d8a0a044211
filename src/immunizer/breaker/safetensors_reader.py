"""Reading safetensors without loading them: the header checked against the file, then the wanted
tensors mapped from it one at a time (no copy). The breaker reads candidates this way (sources.py), and the released
model when it builds the reference sample (reference.py)."""
from __future__ import annotations

import json
import math
import mmap
from collections.abc import Iterator
from pathlib import Path

import torch

from immunizer.errors import ImmunizerError
from immunizer.models.hashing import safetensors_files

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit; a header claiming more is refused before anything is allocated."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:  # json.loads would silently keep the last of two same-named tensors
            raise ValueError(f"tensor {key!r} is listed twice in the header")
        seen.add(key)
    return dict(pairs)


def _check_entry(name: str, v: dict, data_bytes: int) -> None:
    shape, offsets = v["shape"], v["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"{name}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise ValueError(f"{name}: data_offsets {offsets!r} lie outside the file's {data_bytes} data bytes")
    if v["dtype"] not in _DTYPES:
        raise ValueError(f"{name}: unsupported dtype {v['dtype']!r}")
    if offsets[1] - offsets[0] != math.prod(shape) * _DTYPES[v["dtype"]].itemsize:
        raise ValueError(f"{name}: {offsets[1] - offsets[0]} bytes cannot hold a {v['dtype']} tensor of shape {shape}")


def read_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(data start, {name: {dtype, shape, data_offsets}}) from a .safetensors header (8-byte little-endian
    length, then JSON): one small read, where asking the library tensor by tensor cost a third of a scan.
    Every entry is checked against the file before anything is read: a crafted header (offsets out of range
    or overlapping, a length past the end of the file, a shape its bytes cannot hold) is refused."""
    try:
        file_bytes = Path(path).stat().st_size
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= min(MAX_HEADER_BYTES, file_bytes - 8):
                raise ValueError(f"header length {size} in a file of {file_bytes} bytes")
            header = json.loads(f.read(size), object_pairs_hook=_unique_keys)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, v in entries.items():
            _check_entry(name, v, file_bytes - 8 - size)
            v["shape"] = tuple(v["shape"])
        spans = sorted((v["data_offsets"][0], v["data_offsets"][1], n) for n, v in entries.items())
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise ValueError(f"tensors {first} and {second} overlap in the file")
        return 8 + size, entries
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        raise ImmunizerError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or crafted. "
                             "Save the model again with `save_pretrained`") from exc


def _files(path: Path) -> list[Path]:
    """A single .safetensors file, or exactly what `from_pretrained` loads from a directory (hashing.py)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return safetensors_files(path)
    raise ImmunizerError(f"candidate {path} does not exist")


def safetensors_index(path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name -> (file, shape), for one .safetensors file or the shards of a model directory."""
    index: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in _files(path):
        for name, v in read_header(f)[1].items():
            if name in index:
                raise ImmunizerError(f"tensor {name} is in both {index[name][0].name} and {f.name}; which one a "
                                     "loader takes is arbitrary. Save the model again with `save_pretrained`")
            index[name] = (f, v["shape"])
    return index


def safetensors_tensors(path: Path, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for `names` (default: all), in file order, each a view of the file mapped into memory
    (private and copy-on-write: writing to a tensor never touches the file).

    Nothing is copied: from the page cache a scan costs about what reading the file does (a sequential read
    into a buffer cost as much again). From a cold disk the kernel is asked to read the wanted span ahead at
    once (MADV_WILLNEED: 0.90x of reading the file, where asking tensor by tensor gave 1.05x and MADV_SEQUENTIAL
    2.1x), and the caller's first pass over each tensor is sequential (sources.tensor_deltas checks every value
    for NaN before gathering the canaries), so pages are not faulted in at random. A file shrunk after its
    header was checked is refused; one truncated while its tensors are in use cannot be (SIGBUS): scan files
    nothing writes to."""
    for f in _files(path):
        start, entries = read_header(f)
        wanted = sorted((v["data_offsets"][0], n) for n, v in entries.items() if names is None or n in names)
        if not wanted:
            continue
        with open(f, "rb") as handle:  # the mapping keeps its own reference to the file
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        end = start + max(entries[n]["data_offsets"][1] for _, n in wanted)
        if len(mapped) < end:  # shrunk since its header was checked: touching the missing pages would be SIGBUS
            raise ImmunizerError(f"{f} was truncated while being read ({len(mapped)} of {end} bytes); scan it again "
                                 "once nothing writes to it")
        if hasattr(mapped, "madvise"):  # Linux and macOS: start reading the wanted span now, in the background
            first = (start + wanted[0][0]) // mmap.PAGESIZE * mmap.PAGESIZE
            mapped.madvise(mmap.MADV_WILLNEED, first, end - first)
        for begin, name in wanted:
            entry = entries[name]
            length, dtype = entry["data_offsets"][1] - begin, _DTYPES[entry["dtype"]]
            if not length:
                yield name, torch.zeros(entry["shape"], dtype=dtype)
                continue
            tensor = torch.frombuffer(mapped, dtype=dtype, count=length // dtype.itemsize, offset=start + begin)
            yield name, tensor.reshape(entry["shape"])
