"""Resumable run state: one `checkpoint/state.pt` in the output directory, replaced atomically and
durably (fsync), so a run killed at any moment (kill -9 included) resumes from the last checkpoint."""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch

from immunizer.errors import ImmunizerError
from immunizer.paths import atomic_path, existing_copy

STATE_FILE = "state.pt"


def rng_state() -> dict:
    # numpy's state as plain lists, so that the checkpoint loads with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(directory: Path, state: dict, write_more=None) -> None:
    """`write_more(tmp)`: writes more files into the checkpoint being assembled at `tmp` before it replaces the
    last one (an FSDP run's sharded weights and moments, training_state.py)."""
    with atomic_path(Path(directory) / "checkpoint") as tmp:
        tmp.mkdir()
        if write_more is not None:
            write_more(tmp)
        torch.save({**state, "rng": rng_state()}, tmp / STATE_FILE)


def load_checkpoint(directory: Path) -> dict | None:
    """The last saved state, or None. A run killed in the middle of replacing the checkpoint leaves
    only the previous one (paths.atomic_path's `.checkpoint.old`): that is loaded, one save behind."""
    found = existing_copy(Path(directory) / "checkpoint")
    path = found / STATE_FILE if found else None
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from a checkpoint
        state["found_in"] = str(found)  # where an FSDP run's sharded weights and moments are (training_state.py)
        return state
    except pickle.UnpicklingError as exc:
        found = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
        raise ImmunizerError(f"checkpoint {path} holds more than tensors and plain values, and loading it could run "
                             f"code ({found or 'refused by weights_only'}); delete {path.parent} to start over") from None
    except Exception as exc:
        raise ImmunizerError(f"checkpoint {path} cannot be read ({exc}); delete {path.parent} to start over") from exc
