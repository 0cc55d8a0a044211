"""Data parallelism for the training loop, on accelerate's process group (issue 18).

Launched the usual way, every process holds the whole model and takes an equal, contiguous share of every
batch:

    accelerate launch --num_processes 8 -m immunizer immunize ...      (GPUs: NCCL)
    accelerate launch --multi_gpu --num_processes 2 -m immunizer ...   (no GPU: gloo over CPU processes; accelerate's
                                                                        own `--cpu` launcher needs MPI)

accelerate (`PartialState`) reads the launcher's environment, picks the backend and the device and sets up the
process group. What DDP's wrapper does we do by hand, in `average_gradients`: one step of immunization runs
several backward passes (the adversary's harmful gradient, the refusal loss at the displaced weights, the anchor
terms) and reads the gradients between them, which DDP's hook-driven reducer, built for one backward per step,
does not allow for. So each pass's gradients are averaged once, in buckets, where the single-process loop reads them.

The step is the single-process step, not an approximation of it: every loss is a mean over sequences (equal
shares: the mean of the shares' means) or a mean over response tokens, whose denominator is the whole batch's
token count (`token_normalizer`), so the averaged gradient is the full batch's, up to summation order.
Canary scores are kept sharded (each process a slice of every parameter) and read by the existing distributed
top-K% selection (canaries.py).

Launched with FSDP (`accelerate launch --use_fsdp ...`), the job is still data-parallel, and the models are also
sharded (sharding.py, FSDP2): FSDP's backward averages the gradients into each process's piece of them, so
`average_gradients` has nothing left to do, and every figure read from weights or gradients (norms, canary drift)
is summed over the pieces with `all_sum`."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from immunizer.errors import ImmunizerError
from immunizer.launch import launch_flag, launched_distributed, split_evenly
from immunizer.sharding import full_state, is_sharded, load_full_state, local, shard_model

BUCKET_ELEMENTS = 1 << 24  # 64 MiB of fp32 per all-reduce


@dataclass
class DataParallel:
    """One process's place in the job. `DataParallel.single()` is the one-process job: every method a no-op."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    distributed_type: str = "NO"
    _state: object = None
    sharded: bool = False  # FSDP: parameters and gradients are DTensors, each process holding a piece
    offload: bool = False  # FSDP's CPU offload of the sharded parameters

    @classmethod
    def single(cls, device: torch.device | None = None) -> "DataParallel":
        return cls(device=device)

    @classmethod
    def from_environment(cls, device: torch.device | None = None) -> "DataParallel":
        """The launcher's job when there is one (accelerate sets up the process group), else one process on
        `device`."""
        if not launched_distributed():
            return cls.single(device)
        if launch_flag("ACCELERATE_USE_DEEPSPEED"):
            raise ImmunizerError("this job was launched with DeepSpeed, which immunizer's commands do not support: "
                                 "launch with FSDP (`accelerate launch --use_fsdp ...`, configs/accelerate/eight-gpus-"
                                 "fsdp.yaml) or data-parallel (`--multi_gpu`)")
        from accelerate import PartialState  # imported here: a one-process run never needs it

        # The group's timeout bounds every wait, including the others' wait while the main process alone evaluates
        # (bench) or writes a release: torch's default (10 to 30 minutes) is shorter than one evaluation of a large model.
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=process_group_timeout())
        if launch_flag("ACCELERATE_USE_FSDP"):
            return cls(state.process_index, state.num_processes, state.device, "FSDP", state, sharded=True,
                       offload=launch_flag("FSDP_OFFLOAD_PARAMS"))
        return cls(state.process_index, state.num_processes, state.device, str(state.distributed_type.value), state)

    # -- who does what
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def describe(self, trained: torch.nn.Module | None = None) -> dict:
        """What metrics.jsonl, the manifest and run.json record about how the run was spread. `trained`: the model
        a trainer returned, whose parameters say whether it really was sharded (accelerate shards on GPUs only:
        under an FSDP launch on CPU processes TRL's trainer runs data-parallel)."""
        sharded = self.sharded and (trained is None or any(is_sharded(p) for p in trained.parameters()))
        described = {"engine": "accelerate" if self.active else "single-process", "world_size": self.world_size,
                     "distributed_type": self.distributed_type}
        if self.sharded and not sharded:  # launched with FSDP, run data-parallel
            described["distributed_type"] = "MULTI_CPU" if self.device.type == "cpu" else "MULTI_GPU"
        if sharded:
            described["sharding"] = {"engine": "fsdp2", "offload_params": self.offload}
        return described

    # -- the models
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard `model` over the processes under FSDP (sharding.py); as it is otherwise."""
        return shard_model(model, offload=self.offload) if self.sharded else model

    def whole_weights(self, model: torch.nn.Module) -> dict | None:
        """`model`'s state dict; under FSDP gathered from the pieces, on the main process only (None elsewhere;
        every process must call it)."""
        return full_state(model) if self.sharded else model.state_dict()

    def load_state_dicts(self, model: torch.nn.Module, weights: dict, optimizer=None, moments: dict | None = None) -> None:
        """Load a one-process checkpoint's state dicts; under FSDP each process keeps its piece."""
        if self.sharded:
            load_full_state(model, weights, optimizer, moments)
            return
        model.load_state_dict(weights)
        if optimizer is not None:
            optimizer.load_state_dict(moments)

    def load_moments(self, model: torch.nn.Module, optimizer, moments: dict) -> None:
        """Only the optimizer's moments (`model`: the one it steps)."""
        if self.sharded:
            load_full_state(model, None, optimizer, moments)
        else:
            optimizer.load_state_dict(moments)

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
        without a gradient are the same on all of them), bucketed to bound the extra memory. Under FSDP the
        gradients are each process's piece, averaged by FSDP's backward already."""
        if not self.active or self.sharded:
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

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """A sum over the pieces of sharded tensors (a float64 copy; in a data-parallel run without sharding
        every process holds the whole tensor, so its own sum is the total)."""
        value = value.detach().to(torch.float64).reshape(-1).clone()
        if self.sharded:
            dist.all_reduce(value)
        return value

    @torch.no_grad()
    def norm(self, tensors) -> float:
        """The L2 norm of `tensors` together (None and empty entries skipped); under FSDP, of the whole tensors
        whose pieces these are. Reads one tensor at a time (`tensors` may be a generator)."""
        squares = None
        for t in tensors:
            if t is not None and t.numel():
                part = (local(t).float() ** 2).sum().double()
                squares = part if squares is None else squares + part.to(squares.device)
        return float(self.all_sum(torch.zeros(()) if squares is None else squares.cpu())) ** 0.5

    @torch.no_grad()
    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """torch's `clip_grad_norm_`, returning the norm before clipping; under FSDP over the whole gradients."""
        if not self.sharded:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        norm = self.norm(p.grad for p in params)
        scale = max_norm / (norm + 1e-6)
        if scale < 1.0:
            for p in params:
                if p.grad is not None:
                    local(p.grad).mul_(scale)
        return norm

    def broadcast(self, value):
        """The main process's `value` (any picklable object), on every process."""
        if not self.active:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def on_main(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` run by the main process alone (an evaluation, a scan, a file written), its result on
        every process. An error there is raised on every process, so that none waits for a result that never comes
        (the others get an ImmunizerError naming it: an exception need not pickle)."""
        if not self.active:
            return fn(*args, **kwargs)
        outcome, error = None, None
        if self.is_main:
            try:
                outcome = ("ok", fn(*args, **kwargs))
            except Exception as exc:  # noqa: BLE001 (re-raised below, on every process)
                error, outcome = exc, ("error", f"{type(exc).__name__}: {exc}")
        kind, value = self.broadcast(outcome)
        if error is not None:
            raise error
        if kind == "error":
            raise ImmunizerError(f"the main process stopped: {value}")
        return value

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

    def join_pieces(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        """Under FSDP, each entry joined from every process's piece of it (the pieces in process order, as FSDP
        lays out dim 0); as they are otherwise."""
        if not self.sharded:
            return pieces
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, [p.cpu() for p in pieces])
        return [torch.cat([part[i] for part in parts]).to(piece.device) for i, piece in enumerate(pieces)]

    # -- sharded canary scores (canaries.CanaryScores keeps this process's slice of each parameter)
    def gather_slices(self, slices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole tensors from every process's slice (for a checkpoint any world size can resume from)."""
        if not self.active:
            return slices
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, {k: v.cpu() for k, v in slices.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in slices}


def process_group_timeout():
    """How long a process waits for the others: $IMMUNIZER_PROCESS_GROUP_TIMEOUT minutes, 180 by default."""
    text = os.environ.get("IMMUNIZER_PROCESS_GROUP_TIMEOUT", "180")
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not 0 < minutes < float("inf"):
        raise ImmunizerError(f"IMMUNIZER_PROCESS_GROUP_TIMEOUT={text!r} is not a positive number of minutes; "
                             "set it to e.g. 180, or unset it")
    return datetime.timedelta(minutes=minutes)


def exit_launched_process(code: int = 0) -> NoReturn:
    """End a launched job's process with exit status `code` once its work is written: the process group
    torn down, the output flushed, and the interpreter left without its exit-time destructors. With those, about
    one launch in six on 2 CPU processes aborted after destroy_process_group had returned on both ("terminate
    called without an active exception": a gloo thread still joinable when its owner is destroyed at exit), which
    turned a finished run into a failed one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
