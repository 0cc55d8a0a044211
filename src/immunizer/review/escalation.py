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
    """Escalate when a reviewer below the reviewer accuracy threshold (accuracy on gold items) labelled the item."""


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
        reasons.append("labelled by reviewers below the accuracy threshold on gold items: " + ", ".join(sorted(flagged_reviewers)))
    return reasons


HARMFUL_VERDICTS = {"harmful", "unsafe"}
HARMFUL_SEVERITIES = {"high", "critical"}


def harm_signals(severity: str, payload: dict) -> list[str]:
    """What marks an item's prompt as harmful besides the reviewers: the triage severity, the evaluation
    set it came from, or any judge's verdict. An `over_refusal` label would turn the model's compliance
    with such a prompt into a training target, so a person with the adjudicator role must confirm it."""
    signals = []
    if severity in HARMFUL_SEVERITIES:
        signals.append(f"triage severity {severity}")
    if payload.get("set") == "harmful":
        signals.append("from the harmful evaluation set")
    verdicts = {"label": payload.get("label"), "judge_label": payload.get("judge_label")}
    verdicts |= {f"judges.{k}": v for k, v in (payload.get("judges") or {}).items()} \
        if isinstance(payload.get("judges"), dict) else {}
    signals += [f"judge verdict {key}={value}" for key, value in verdicts.items()
                if isinstance(value, str) and value.lower() in HARMFUL_VERDICTS]
    if payload.get("harmful") is True:
        signals.append("a judge marked it harmful (harmful: true)")
    return signals


def over_refusal_reasons(label: str, severity: str, payload: dict) -> list[str]:
    """The escalation reason for an `over_refusal` consensus on a prompt marked harmful (empty: none)."""
    signals = harm_signals(severity, payload) if label == "over_refusal" else []
    return [f"over_refusal on a prompt marked harmful ({'; '.join(signals)}): an adjudicator decides"] if signals else []
