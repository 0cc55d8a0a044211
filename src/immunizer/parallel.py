"""Data parallelism for the training loop, on accelerate's process group (issue 18).

Launched the usual way, every process holds the whole model and takes an equal, contiguous share of every
batch:

    accelerate launch --num_processes 8 -m immunizer immunize ...      (GPUs: NCCL)
    accelerate launch --multi_gpu --num_processes 2 -m immunizer ...   (no GPU: gloo over CPU processes; accelerate's
                                                                        own `--cpu` launcher needs MPI)

accelerate (`PartialState`) reads the launcher's environment, picks the backend and the device and sets up the
process group. What DDP's wrapper does we do by hand, in `average_gradients`: one step of immunization runs
several backward passes (the adversary's harmful gradient through `torch.autograd.grad`, the refusal loss at the
displaced weights, the anchor terms) and DDP's hook-driven reducer fires on every `.backward()` and never on
`autograd.grad`. So each pass's gradients are averaged once, in buckets, where the single-process loop reads them.

The step is the single-process step, not an approximation of it: every loss is a mean over sequences (equal
shares: the mean of the shares' means) or a mean over response tokens, whose denominator is the whole batch's
token count (`token_normalizer`), so the averaged gradient is the full batch's, up to summation order.
Canary scores are kept sharded (each process a slice of every parameter) and read by the existing distributed
top-K% selection (canaries.py)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from immunizer.errors import ImmunizerError
from immunizer.launch import launched_distributed, split_evenly

BUCKET_ELEMENTS = 1 << 24  # 64 MiB of fp32 per all-reduce


@dataclass
class DataParallel:
    """One process's place in the job. `DataParallel.single()` is the one-process job: every method a no-op."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    distributed_type: str = "NO"
    _state: object = None

    @classmethod
    def single(cls, device: torch.device | None = None) -> "DataParallel":
        return cls(device=device)

    @classmethod
    def from_environment(cls, device: torch.device | None = None) -> "DataParallel":
        """The launcher's job when there is one (accelerate sets up the process group), else one process on
        `device`."""
        if not launched_distributed():
            return cls.single(device)
        sharded = [name for name in ("FSDP", "DEEPSPEED")
                   if os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() in ("1", "true", "yes")]
        if sharded:
            raise ImmunizerError(f"this job was launched with {sharded[0]} sharding, which immunizer's commands do not "
                                 "support yet: every process must hold the whole model. Launch data-parallel instead "
                                 "(`accelerate launch --multi_gpu --num_processes N -m immunizer ...`, or an accelerate "
                                 "config with distributed_type MULTI_GPU; configs/accelerate/ has examples)")
        from accelerate import PartialState  # imported here: a one-process run never needs it

        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, state.device, str(state.distributed_type.value), state)

    # -- who does what
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def describe(self) -> dict:
        """What metrics.jsonl and the manifest record about how the run was spread."""
        return {"engine": "accelerate" if self.active else "single-process", "world_size": self.world_size,
                "distributed_type": self.distributed_type}

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """The main process runs the block first (model conversion, teacher generations: it fills the caches),
        then the others, which read what it cached."""
        if not self.active:
            yield
            return
        with self._state.main_process_first():
            yield

    # -- the batch
    def share(self, items: list, what: str = "batch") -> list:
        """This process's contiguous share of a batch's items."""
        if not self.active:
            return items
        n = split_evenly(len(items), self.world_size, f"a {what} of", "--set ...batch_size=N")
        return items[self.rank * n:(self.rank + 1) * n]

    def token_normalizer(self, labels: torch.Tensor) -> float | None:
        """The denominator that makes this share's summed token loss, once gradients are averaged, the whole
        batch's mean token loss: the batch's response tokens / world size (None: one process, a plain mean)."""
        if not self.active:
            return None
        count = (labels[:, 1:] != -100).sum().reshape(1).to(torch.float64)
        dist.all_reduce(count)
        return max(float(count), 1.0) / self.world_size

    # -- gradients and figures
    @torch.no_grad()
    def average(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Average `tensors` over the processes in place (None stays None on every process: parameters
        without a gradient are the same on all of them), bucketed to bound the extra memory."""
        if not self.active:
            return tensors
        bucket: list[torch.Tensor] = []
        filled = 0
        for t in [t for t in tensors if t is not None] + [None]:  # None: flush the last bucket
            if t is not None:
                bucket.append(t)
                filled += t.numel()
            if bucket and (t is None or filled >= BUCKET_ELEMENTS):
                flat = torch.cat([b.reshape(-1).float() for b in bucket])
                dist.all_reduce(flat)
                flat /= self.world_size
                start = 0
                for b in bucket:
                    b.copy_(flat[start:start + b.numel()].view_as(b))
                    start += b.numel()
                bucket, filled = [], 0
        return tensors

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """p.grad averaged over the processes. A parameter without a gradient keeps none (AdamW skips it, as in one
        process): every process runs the same graph, so which parameters have one is the same everywhere."""
        if self.active:
            self.average([p.grad for p in params])

    def total(self, count: int) -> int:
        """`count` summed over the processes (e.g. the tokens of a whole batch)."""
        if not self.active:
            return int(count)
        value = torch.tensor([int(count)], dtype=torch.int64)
        dist.all_reduce(value)
        return int(value)

    def mean_figures(self, figures: dict) -> dict:
        """The processes' mean of each float in `figures` (what metrics.jsonl records for the step: for the
        losses, the whole batch's value)."""
        if not self.active:
            return figures
        keys = [k for k, v in figures.items() if isinstance(v, float)]  # counts and positions are the same everywhere
        values = torch.tensor([float(figures[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return {**figures, **{k: float(v) / self.world_size for k, v in zip(keys, values)}}

    # -- sharded canary scores (canaries.CanaryScores keeps this process's slice of each parameter)
    def gather_slices(self, slices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole tensors from every process's slice (for a checkpoint any world size can resume from)."""
        if not self.active:
            return slices
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, {k: v.cpu() for k, v in slices.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in slices}
