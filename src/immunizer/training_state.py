"""Where a training run is, kept apart from what its steps do: the position it reached, its metrics log and
its checkpoint (checkpoint.py writes the file). Shared by immunize.py and baselines/train.py.

A checkpoint records how many lines metrics.jsonl held when it was written; a resumed run cuts the log back
to that many lines, so that the steps it runs again are logged once."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from immunizer.checkpoint import save_checkpoint, set_rng_state
from immunizer.parallel import DataParallel
from immunizer.paths import atomic_path
from immunizer.sharding import load_sharded, save_sharded

SHARDED = "sharded"  # the checkpoint's folder for an FSDP run's weights and moments


@dataclass(frozen=True, order=True)
class Position:
    """The next step to run: `step` of `phase` (1 or 2) of `cycle`."""
    cycle: int = 0
    phase: int = 1
    step: int = 0


class MetricsLog:
    """metrics.jsonl: one JSON record a line, and how many lines it holds."""

    def __init__(self, path: Path, keep_lines: int | None):
        """`keep_lines` None: a new run, any earlier log removed; else a resumed one, the log cut back to that many lines."""
        self.path = path
        if keep_lines is None:
            path.unlink(missing_ok=True)
            self.lines = 0
            return
        kept = path.read_text().splitlines(keepends=True)[:keep_lines] if path.exists() else []
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept))
        self.lines = len(kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1


class TrainingState:
    """An output directory's resumable state: `saved` is the checkpoint the run resumes from (checked by the
    caller against its own config), or None for a new run."""

    def __init__(self, out_dir: Path, saved: dict | None, writer: bool = True, dp: DataParallel | None = None):
        """`writer` False: a data-parallel run's other processes, which read the checkpoint but never touch the
        directory (the main process writes the log and the checkpoints). `dp`: the job (under FSDP the weights
        and moments are gathered from the processes' pieces and handed back to them)."""
        self.out_dir, self.saved, self.dp = Path(out_dir), saved, dp or DataParallel.single()
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", None if saved is None else saved["metrics_lines"]) \
            if writer else None

    @property
    def resumed(self) -> bool:
        return self.saved is not None

    @property
    def position(self) -> Position:
        """Where the checkpoint stopped (the start for a new run)."""
        return Position(**self.saved["position"]) if self.saved is not None else Position()

    def log(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Back to the checkpoint: the weights, every random generator and (when given) the optimizer's moments."""
        if self.sharded_saved:
            load_sharded(self.sharded_saved, model, optimizer)
        else:
            self.dp.load_state_dicts(model, self.saved["model"], optimizer, self.saved["optimizer"] if optimizer else None)
        set_rng_state(self.saved["rng"])

    @property
    def sharded_saved(self) -> Path | None:
        """Where the checkpoint keeps the weights and moments an FSDP run wrote piece by piece (None: they are in
        the state file, whole)."""
        return Path(self.saved["found_in"]) / SHARDED if self.saved and self.saved.get("sharded") else None

    def resume_step(self, cycle: int, phase: int, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> int:
        """The step `phase` of `cycle` starts from: the checkpoint's, with its optimizer moments loaded into
        `optimizer` (which steps `model`), when the run stopped inside that phase; else 0. A phase's first step
        starts from a fresh optimizer: nothing is loaded then (under FSDP, torch's state-dict helpers would first
        give the empty optimizer moments by a zero step, and Adam would count that step)."""
        at = self.position
        if self.saved is None or (at.cycle, at.phase) != (cycle, phase) or at.step == 0:
            return 0
        if self.sharded_saved:
            load_sharded(self.sharded_saved, model, optimizer, weights=False)
        else:
            self.dp.load_moments(model, optimizer, self.saved["optimizer"])
        return at.step

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, position: Position | None = None,
             **fields) -> None:
        """Write a checkpoint: `fields` (what the caller needs to check or resume), the position, the metrics
        log's length, the weights and the optimizer's moments (none at a phase's start, which begins with a fresh
        optimizer; checkpoint.py adds the random generators). Every
        process of a job calls it; the writer writes. Under FSDP every process writes its pieces of the weights and
        moments into the checkpoint's `sharded/` (sharding.py); the state file holds the rest."""
        def write_pieces(tmp: Path | None) -> None:  # every process, into the directory the writer is assembling
            tmp = Path(self.dp.broadcast(None if tmp is None else str(tmp)))
            save_sharded(tmp / SHARDED, model, optimizer)

        if self.metrics is None:  # another process of the job: under FSDP it writes its pieces, else nothing
            if self.dp.sharded:
                write_pieces(None)
            return
        state = {**fields, "metrics_lines": self.metrics.lines}
        if position is not None:
            state["position"] = asdict(position)
        if self.dp.sharded:
            save_checkpoint(self.out_dir, {**state, "sharded": True}, write_more=write_pieces)
        else:
            save_checkpoint(self.out_dir, {**state, "model": model.state_dict(),
                                           "optimizer": None if optimizer is None else optimizer.state_dict()})

    def finish(self) -> None:
        """The run wrote its outputs: the checkpoint is no longer needed."""
        shutil.rmtree(self.out_dir / "checkpoint", ignore_errors=True)
