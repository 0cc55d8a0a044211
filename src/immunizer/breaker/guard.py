"""The fine-tuning guard: watch a fine-tune as it runs (a `transformers.TrainerCallback`, or an
optimizer step hook for plain PyTorch loops). Every `every` optimizer steps it scans the live
weights; a clean check becomes the new rollback point, a tripped one stops training, puts the
last clean weights back (so nothing saved afterwards holds the tripped state), blocks the
pending save and records an incident."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from immunizer.breaker.breaker import Breaker, BreakerTripped, Verdict
from immunizer.breaker.incidents import record_incident
from immunizer.breaker.sources import check_coverage, check_no_lora_bias, lora_layers, module_tensors
from immunizer.launch import main_process

DEFAULT_EVERY = 10
"""Steps between checks. The standard attack (100 pairs, 3 epochs, batch 8) is 38 steps long; checks at
10, 20, 30 and at the end see it several times, at a cost measured in bench/guard_overhead.py."""


class FinetuneGuard:
    """The check, the rollback point and the incident, shared by the callback and the step hook."""

    def __init__(self, breaker: Breaker, model: torch.nn.Module, every: int = DEFAULT_EVERY,
                 incidents: str | Path | None = None, name: str = "fine-tune"):
        if every < 1:
            raise ValueError("the guard's check interval must be at least 1 step")
        self.breaker, self.model, self.every, self.incidents, self.name = breaker, model, every, incidents, name
        self.clean_state: dict[str, torch.Tensor] = {}
        self.clean_step = 0
        self.tripped: Verdict | None = None
        self.history: list[dict] = []
        self._view = None

    def _trainable(self) -> dict[str, torch.Tensor]:
        # Only what the optimizer can move needs a copy: a LoRA run snapshots megabytes, not the model.
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def _snapshot(self, step: int) -> None:
        for name, p in self._trainable().items():
            if name in self.clean_state:
                self.clean_state[name].copy_(p.detach())
            else:
                self.clean_state[name] = p.detach().clone()
        self.clean_step = step

    @torch.no_grad()
    def rollback(self) -> None:
        for name, p in self._trainable().items():
            if name in self.clean_state:
                p.copy_(self.clean_state[name])

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def check(self, step: int) -> Verdict:
        """Scan now. Clean: remember these weights. Tripped: roll back and record the incident."""
        if self._view is None:  # the model's structure does not change during a fine-tune: walk it once
            tensors = module_tensors(self.model)
            check_coverage(self.breaker.reference, {n: tuple(p.shape) for n, p in tensors.items()}, self.name)
            self._view = (tensors, lora_layers(self.model))
            check_no_lora_bias(self._view[1])
        verdict = self.breaker.scan(self.model, self._view)
        self.history.append({"step": step, "statistic": verdict.statistic, "tripped": verdict.tripped})
        if not verdict.tripped:
            self._snapshot(step)
            return verdict
        self.tripped = verdict
        self.rollback()
        if main_process():  # under DDP every process holds the same weights and trips alike: one record
            record_incident(verdict, source="guard", action="stop", path=self.incidents, step=step,
                            extra={"candidate": self.name, "rolled_back_to_step": self.clean_step})
        return verdict


class BreakerCallback(TrainerCallback):
    """Add to any `transformers.Trainer` (TRL's trainers included):
    `trainer.add_callback(BreakerCallback(Breaker(DIR), every=10))`."""

    def __init__(self, breaker: Breaker, every: int = DEFAULT_EVERY, incidents: str | Path | None = None,
                 name: str = "fine-tune"):
        self.breaker, self.every, self.incidents, self.name = breaker, every, incidents, name
        self.guard: FinetuneGuard | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.guard = FinetuneGuard(self.breaker, model, self.every, self.incidents, self.name)
        self.guard.check(state.global_step)  # the starting point is the first rollback target
        if self.guard.tripped:  # resumed from (or started on) tripped weights: do not train on
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        # A save about to happen is always checked first, so no unchecked state reaches disk.
        if self.guard.tripped is None and (self.guard.due(state.global_step) or control.should_save):
            self.guard.check(state.global_step)
        if self.guard.tripped is not None:
            control.should_training_stop = True
            control.should_save = False
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.guard.tripped is None and self.guard.clean_step != state.global_step:
            self.guard.check(state.global_step)  # the final weights are what the user saves next


def guard_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, breaker: Breaker,
                    every: int = DEFAULT_EVERY, incidents: str | Path | None = None,
                    name: str = "fine-tune") -> FinetuneGuard:
    """For plain PyTorch loops: check after every `every`-th `optimizer.step()`. On a trip the weights are
    rolled back and `BreakerTripped` is raised out of `optimizer.step()`, which ends the loop before
    anything can be saved. Call `guard.check(step)` once more before saving the final weights."""
    guard = FinetuneGuard(breaker, model, every, incidents, name)
    guard.check(0)
    steps = {"n": 0}

    def hook(opt, args, kwargs):
        steps["n"] += 1
        if guard.tripped is not None or guard.due(steps["n"]):
            verdict = guard.tripped or guard.check(steps["n"])
            if verdict.tripped:
                raise BreakerTripped(verdict, f"{name} at step {steps['n']}")

    guard.hook_handle = optimizer.register_step_post_hook(hook)
    return guard
