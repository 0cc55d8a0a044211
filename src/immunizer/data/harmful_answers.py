"""Harmful answers that are answers: the teacher's refusals replaced by sampled compliance.

An unaligned teacher still refuses some harmful requests (SmolLM2-135M-Instruct refuses 26 of the standard
attack's 100 held-out prompts greedily). Every consumer of "harmful answers" wants compliance: the attack
that trains on a refusal teaches refusing, and immunization's unlearning terms (NPO, −KL) and simulated
attacks, given a refusal as the harmful answer, push refusals down. So a greedy answer the refusal judge
flags is replaced by the first of RESAMPLE_TRIES sampled answers that is not a refusal, and a prompt refused
every time is left out. Written here (no library filters teacher data by a refusal judge)."""
from __future__ import annotations

from typing import Callable

from immunizer.redteam.judges import load_judge, three_way

RESAMPLE_TRIES = 4
"""Sampled answers tried per refused prompt (sample seeds 1..4, each cached with the teacher's answers)."""

Answer = Callable[..., list[str]]
"""answer(prompts, sample_seed=None) -> one answer per prompt: greedy without a seed, sampled with one."""


def answers_without_refusals(prompts: list[str], answer: Answer, tries: int = RESAMPLE_TRIES) -> tuple[dict[str, str], dict]:
    """({prompt: answer} without refusals, counts for the record: teacher_answers, refused_greedy, resampled,
    dropped_refused)."""
    judge = load_judge()

    def refused(batch: list[str], answers: list[str]) -> list[bool]:
        return [verdict == "refused" for verdict, _ in three_way(judge, batch, answers)]

    greedy = answer(prompts) if prompts else []
    kept = {p: a for p, a, r in zip(prompts, greedy, refused(prompts, greedy)) if not r}
    counts = {"teacher_answers": len(prompts), "refused_greedy": len(prompts) - len(kept), "resampled": 0}
    for seed in range(1, tries + 1):
        left = [p for p in prompts if p not in kept]
        if not left:
            break
        sampled = answer(left, sample_seed=seed)
        for p, a, r in zip(left, sampled, refused(left, sampled)):
            if not r:
                kept[p] = a
                counts["resampled"] += 1
    counts["dropped_refused"] = len(prompts) - len(kept)
    return kept, counts
