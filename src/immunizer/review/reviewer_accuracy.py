"""Reviewer accuracy on gold items and inter-rater agreement (not the breaker's calibration, which sets
the scan threshold: breaker/calibrate.py).

Agreement uses the field's implementations: Krippendorff's α (nominal) from the `krippendorff`
package, Cohen's κ per reviewer pair from scikit-learn.
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np


@dataclass
class ReviewerAccuracyConfig:
    accuracy_threshold: float = 0.7
    """Reviewers whose accuracy on gold items is below this are flagged."""
    min_gold_reviews: int = 3
    """A reviewer is judged only after this many gold items."""
    min_pair_overlap: int = 5
    """Cohen's κ is reported for reviewer pairs who labelled at least this many common items."""


def reviewer_accuracy(gold_reviews: list[tuple[str, str, str]]) -> dict[str, dict]:
    """(reviewer, label, gold label) triples → {reviewer: {"n": …, "accuracy": …}}."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for reviewer, label, gold in gold_reviews:
        hits[reviewer].append(label == gold)
    return {r: {"n": len(h), "accuracy": round(sum(h) / len(h), 4)} for r, h in sorted(hits.items())}


def flagged_reviewers(accuracy: dict[str, dict], config: ReviewerAccuracyConfig) -> list[str]:
    return sorted(r for r, a in accuracy.items()
                  if a["n"] >= config.min_gold_reviews and a["accuracy"] < config.accuracy_threshold)


def krippendorff_alpha(ratings: dict) -> float | None:
    """Nominal α over {unit: {reviewer: label}}; None when undefined (fewer than two paired
    ratings, or a single label used throughout)."""
    import krippendorff  # imported here: only the statistics need it

    units = [r for r in ratings.values() if len(r) >= 2]
    labels = sorted({label for r in units for label in r.values()})
    if len(units) < 1 or len(labels) < 2:
        return None
    reviewers = sorted({name for r in units for name in r})
    code = {label: i for i, label in enumerate(labels)}
    data = np.full((len(reviewers), len(units)), np.nan)
    for j, unit in enumerate(units):
        for name, label in unit.items():
            data[reviewers.index(name), j] = code[label]
    alpha = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
    return None if math.isnan(alpha) else round(float(alpha), 4)


def cohen_kappa_pairs(ratings: dict, min_overlap: int) -> list[dict]:
    """Cohen's κ for every reviewer pair with at least `min_overlap` common units."""
    from sklearn.metrics import cohen_kappa_score  # imported here: scikit-learn takes a second to load

    by_reviewer: dict[str, dict] = defaultdict(dict)
    for unit, unit_ratings in ratings.items():
        for name, label in unit_ratings.items():
            by_reviewer[name][unit] = label
    pairs = []
    for a, b in itertools.combinations(sorted(by_reviewer), 2):
        common = sorted(set(by_reviewer[a]) & set(by_reviewer[b]), key=str)
        if len(common) < min_overlap:
            continue
        la = [by_reviewer[a][u] for u in common]
        lb = [by_reviewer[b][u] for u in common]
        if len(set(la) | set(lb)) < 2:
            kappa = None  # one label throughout: κ is undefined
        else:
            kappa = float(cohen_kappa_score(la, lb))
            kappa = None if math.isnan(kappa) else round(kappa, 4)
        pairs.append({"reviewers": [a, b], "n": len(common), "kappa": kappa})
    return pairs
