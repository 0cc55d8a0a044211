"""The review workflows' settings in one typed config, loadable from YAML like every other config
(config.load_layers: defaults < the file; unknown keys and wrong types are named):

    triage: {queue_size: 20, reviewers_by_severity: {low: 1, medium: 2, high: 3, critical: 3}}
    escalation: {severities: [high, critical], on_disagreement: true}
    reviewer_accuracy: {accuracy_threshold: 0.8}

A mapping such as reviewers_by_severity merges into the defaults (the severities it leaves out keep theirs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from immunizer.config import load_layers
from immunizer.review.escalation import EscalationRules
from immunizer.review.reviewer_accuracy import ReviewerAccuracyConfig
from immunizer.review.triage import TriageConfig


@dataclass
class ReviewConfig:
    triage: TriageConfig = field(default_factory=TriageConfig)
    escalation: EscalationRules = field(default_factory=EscalationRules)
    reviewer_accuracy: ReviewerAccuracyConfig = field(default_factory=ReviewerAccuracyConfig,
                                                      metadata={"aliases": ("calibration",)})
    """Reviewers' accuracy on gold items and agreement; `calibration:` is its old name, still read."""


def load_review_config(path: str | Path | None) -> ReviewConfig:
    return load_layers(ReviewConfig(), config_file=path)
