"""The review workflows' settings in one typed config, loadable from YAML:

    triage: {queue_size: 20, reviewers_by_severity: {low: 1, medium: 2, high: 3, critical: 3}}
    escalation: {severities: [high, critical], on_disagreement: true}
    calibration: {accuracy_threshold: 0.8}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from immunizer.errors import ImmunizerError
from immunizer.review.calibration import CalibrationConfig
from immunizer.review.escalation import EscalationRules
from immunizer.review.triage import TriageConfig


@dataclass
class ReviewConfig:
    triage: TriageConfig = field(default_factory=TriageConfig)
    escalation: EscalationRules = field(default_factory=EscalationRules)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


def load_review_config(path: str | Path | None) -> ReviewConfig:
    config = ReviewConfig()
    if path is None:
        return config
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ImmunizerError(f"{path}: expected a mapping with keys triage, escalation, calibration")
    for section, values in data.items():
        if section not in {f.name for f in dataclasses.fields(config)}:
            raise ImmunizerError(f"{path}: unknown section {section!r}; use triage, escalation or calibration")
        target = getattr(config, section)
        known = {f.name for f in dataclasses.fields(target)}
        for key, value in (values or {}).items():
            if key not in known:
                raise ImmunizerError(f"{path}: unknown key {section}.{key}; known: {', '.join(sorted(known))}")
            setattr(target, key, value)
    return config
