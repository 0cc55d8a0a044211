"""Label shift (rubric drift): do reviewers' labels shift between rubric versions or over time? Not the
breaker's weight drift (breaker/drift.py).

The test is Pearson's chi-square on the label-by-group contingency table (scipy); a small p-value
says the label distribution changed. When a rubric changes, a seeded random sample of items
closed under the old version is re-reviewed under the new one, so the shift is measured on the
same items rather than on whatever arrived later.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter


def label_counts(labels) -> dict[str, int]:
    return dict(sorted(Counter(labels).items()))


def period_key(time: dt.datetime) -> str:
    """ISO week, e.g. 2026-W47."""
    year, week, _ = time.isocalendar()
    return f"{year}-W{week:02d}"


def shift_test(before: dict[str, int], after: dict[str, int]) -> dict | None:
    """Chi-square test of homogeneity between two label distributions; None without data on both sides."""
    from scipy.stats import chi2_contingency  # imported here: only the statistics need it

    labels = sorted(set(before) | set(after))
    if sum(before.values()) == 0 or sum(after.values()) == 0 or len(labels) < 2:
        return None
    table = [[before.get(label, 0) for label in labels], [after.get(label, 0) for label in labels]]
    result = chi2_contingency(table)
    return {"chi2": round(float(result.statistic), 4), "p_value": round(float(result.pvalue), 6),
            "dof": int(result.dof), "n_before": sum(before.values()), "n_after": sum(after.values())}


def rereview_sample(item_ids: list[int], fraction: float, seed: int) -> list[int]:
    """A reproducible sample of ceil(fraction·n) items: ordered by a seeded hash, not by arrival."""
    if not item_ids or fraction <= 0:
        return []
    n = max(1, min(len(item_ids), round(fraction * len(item_ids) + 0.4999)))
    ranked = sorted(item_ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return sorted(ranked[:n])
