"""Escalation rules: when the reviewers' labels are not enough and an adjudicator must decide.
Every rule that fires adds a reason in words; the reasons are stored with the escalation."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class EscalationRules:
    severities: list = field(default_factory=lambda: ["critical"])
    """Items of these severities always go to an adjudicator, whatever the reviewers said."""
    on_disagreement: bool = True
    """Escalate when any two reviewers of an item chose different labels."""
    min_majority_share: float = 0.5
    """Escalate when the most common label has no more than this share of the reviews (a tie at 0.5)."""
    escalate_flagged_reviewers: bool = True
    """Escalate when a reviewer below the calibration threshold labelled the item."""


def majority(labels: list[str]) -> tuple[str, float]:
    """The most common label (ties: alphabetical) and its share."""
    counts = Counter(labels)
    label, n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return label, n / len(labels)


def escalation_reasons(severity: str, labels: list[str], flagged_reviewers: list[str],
                       rules: EscalationRules) -> list[str]:
    """Why an item whose review round is complete must go to an adjudicator (empty: it need not)."""
    reasons = []
    if severity in rules.severities:
        reasons.append(f"severity {severity} always goes to an adjudicator")
    counts = Counter(labels)
    if rules.on_disagreement and len(counts) > 1:
        spread = ", ".join(f"{label}×{n}" for label, n in sorted(counts.items()))
        reasons.append(f"reviewers disagree: {spread}")
    _, share = majority(labels)
    if len(labels) > 1 and share <= rules.min_majority_share:
        reasons.append(f"low agreement: the most common label has {share:.0%} of {len(labels)} reviews")
    if rules.escalate_flagged_reviewers and flagged_reviewers:
        reasons.append("labelled by reviewers below the calibration threshold: " + ", ".join(sorted(flagged_reviewers)))
    return reasons
