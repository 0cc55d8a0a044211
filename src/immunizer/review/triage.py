"""Triage: how urgent an item is and how many reviewers it needs.

priority = w_severity·severity + w_uncertainty·(1 − judge confidence) + w_novelty·novelty,
each term in [0, 1]. An unsure judge and an item unlike anything seen before both deserve a
human sooner; a missing judge confidence counts as fully unsure.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

SEVERITY_SCORE = {"low": 0.25, "medium": 0.5, "high": 0.75, "critical": 1.0}


@dataclass
class TriageConfig:
    severity_weight: float = 0.6
    """Weight of the severity score (low 0.25, medium 0.5, high 0.75, critical 1)."""
    uncertainty_weight: float = 0.2
    """Weight of 1 − judge confidence."""
    novelty_weight: float = 0.2
    """Weight of novelty (1 − the highest word-set Jaccard similarity to a recent item of the same kind)."""
    reviewers_by_severity: dict = field(default_factory=lambda: {"low": 1, "medium": 2, "high": 3, "critical": 3})
    """Independent reviews an item gets before its labels are compared."""
    queue_size: int = 10
    """Open assignments a reviewer holds at once; the queue is topped up to this size."""
    gold_every: int = 5
    """After every N triage assignments a reviewer gets one gold item (0 = no gold items)."""
    novelty_window: int = 500
    """How many recent items of the same kind novelty is measured against."""


def priority(severity: str, judge_confidence: float | None, novelty: float, config: TriageConfig) -> float:
    uncertainty = 1.0 if judge_confidence is None else 1.0 - judge_confidence
    return round(config.severity_weight * SEVERITY_SCORE[severity] + config.uncertainty_weight * uncertainty
                 + config.novelty_weight * novelty, 6)


def reviewers_needed(severity: str, config: TriageConfig) -> int:
    return int(config.reviewers_by_severity[severity])


def text_tokens(payload) -> frozenset[str]:
    """Lower-case words of every string (and key) in a JSON payload."""
    words: set[str] = set()
    stack = [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            words.update(re.findall(r"[a-z0-9_]+", value.lower()))
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return frozenset(words)


def novelty(tokens: frozenset[str], previous: Iterable[frozenset[str]]) -> float:
    """1 − max Jaccard similarity to the previous items: 1 for the first of its kind, 0 for an exact repeat."""
    best = 0.0
    for other in previous:
        union = len(tokens | other)
        if union:
            best = max(best, len(tokens & other) / union)
    return round(1.0 - best, 6)
