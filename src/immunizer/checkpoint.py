"""Resumable run state: one `checkpoint/state.pt` in the output directory, replaced atomically and
durably (fsync), so a run killed at any moment (kill -9 included) resumes from the last checkpoint."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from immunizer.errors import ImmunizerError
from immunizer.paths import atomic_path, existing_copy

STATE_FILE = "state.pt"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(directory: Path, state: dict) -> None:
    with atomic_path(Path(directory) / "checkpoint") as tmp:
        tmp.mkdir()
        torch.save({**state, "rng": rng_state()}, tmp / STATE_FILE)


def load_checkpoint(directory: Path) -> dict | None:
    """The last saved state, or None. A run killed in the middle of replacing the checkpoint leaves
    only the previous one (paths.atomic_path's `.checkpoint.old`): that is loaded, one save behind."""
    found = existing_copy(Path(directory) / "checkpoint")
    path = found / STATE_FILE if found else None
    if path is None or not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ImmunizerError(f"checkpoint {path} cannot be read ({exc}); delete {path.parent} to start over") from exc
