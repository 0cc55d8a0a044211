"""The breaker's decision rule: a set of calibrated bounds on drift statistics, each with its side.

A harmful fine-tune pushes the canaries along the harmful direction (`harm_drift_ratio` above its bound).
An attacker who knows the canaries can hold them still instead; then the canaries move far *less* than in
any benign fine-tune while the other weights move (`canary_drift_ratio` below its bound), or, jittered
by hand, more (`canary_drift_ratio` above its bound). The non-canary sample is pushed along its own harmful
signs too (`sample_harm_ratio` above its bound), and keeps that reading when an attack runs on long after the
canaries' has faded. Each bound is set on the calibration's benign runs."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from immunizer.breaker.drift import STATISTICS, DriftReport
from immunizer.errors import ImmunizerError

SIDES = ("above", "below")
MOVED_SHARE = 0.5
"""A `below` bound applies once the non-canary weights moved at least this share of the least any benign
calibration reading moved: below that, a fine-tune has barely started and a low ratio means nothing."""
BELOW_MARGIN = 0.5
"""A `below` bound sits at this share of the benign quantile it is chosen at (for a quantile above 0). The
attacks it is for read about nothing: frozen canaries 0, canaries pushed back negative, jittered canaries
0 ± 1/√(canaries) (~0.001 on SmolLM2-135M). A benign fine-tune unlike the calibration grid's runs can read
lower than all of them: a rank-4 LoRA read harm_drift_ratio 0.006 where the rank-16 grid's lowest was 0.0074
(bench/results/canary_aware_release.json). The margin gives such runs room and costs the attacks nothing."""

ABOVE_MARGIN = {"sample_harm_ratio": 1.5}
"""An `above` bound on these statistics sits at this multiple of the benign quantile it is chosen at. The attacks
`sample_harm_ratio` is for read three times the highest benign reading or more, and keep it over long runs
(harmful, full lr 5e-5: 0.18 at step 80), while benign fine-tunes longer than the calibration's grid creep up (the
instruction task at full lr 5e-5: 0.060 at step 20, 0.068 at step 80; bench/results/breaker_long_attack.json)."""


@dataclass(frozen=True)
class Bound:
    statistic: str
    side: str
    """`above`: trip when the statistic exceeds `value`; `below`: trip when it falls under it."""
    value: float
    min_other_drift: float = 0.0
    """A `below` bound applies only once the non-canary weights moved at least this far (RMS): the released
    model itself, or a fine-tune that has barely started, has a ratio of 0 and must not trip."""
    fpr: float | None = None
    """Share of the calibration's benign readings this bound alone trips on."""

    def __post_init__(self):
        if self.statistic not in STATISTICS or self.side not in SIDES or not _finite(self.value):
            raise ImmunizerError(f"invalid breaker bound {asdict(self)}: statistic must be one of {', '.join(STATISTICS)}, "
                                 "side `above` or `below`, value a finite number; re-run `immunizer calibrate`")

    def violated(self, reading: Mapping[str, float]) -> bool:
        """`reading`: the statistics and `other_drift` of one candidate (`readings_of(report)` or a calibration reading)."""
        value = reading.get(self.statistic)
        if value is None:  # a reading recorded before this statistic existed: this bound cannot judge it
            return False
        if self.side == "above":
            return value > self.value
        moved = reading["other_drift"]
        return moved > 0 and moved >= self.min_other_drift and value < self.value

    def describe(self, reading: Mapping[str, float]) -> str:
        if self.side == "above":
            return f"{self.statistic} {reading[self.statistic]:.3g} exceeds the calibrated bound {self.value:.3g}"
        return (f"{self.statistic} {reading[self.statistic]:.3g} is below the calibrated bound {self.value:.3g} while the "
                f"other weights moved {reading['other_drift']:.3g} (benign fine-tunes move the canaries with them)")

    def to_json(self) -> dict:
        return asdict(self)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def bounds_from_calibration(calibration: dict, threshold: float | None = None) -> list[Bound]:
    """The primary bound (`statistic` above `threshold`; an explicit threshold overrides the calibrated one)
    plus the calibration's further bounds. Manifests calibrated before bounds existed have only the first."""
    statistic = calibration.get("statistic", "canary_drift_ratio")  # manifests older than the direction
    try:
        primary = Bound(statistic, "above", float(calibration["threshold"] if threshold is None else threshold),
                        fpr=None if threshold is not None else (calibration.get("primary") or calibration).get("fpr"))
        extra = [Bound(**b) for b in calibration.get("bounds", []) if (b["statistic"], b["side"]) != (statistic, "above")]
    except (TypeError, KeyError, ValueError) as exc:
        raise ImmunizerError(f"the manifest's breaker bounds cannot be read ({exc}); re-run `immunizer calibrate`") from exc
    return [primary, *extra]


def readings_of(report: DriftReport) -> dict[str, float]:
    return {**{name: report.value(name) for name in STATISTICS}, "other_drift": report.other_drift}


def violations(bounds: list[Bound], reading: Mapping[str, float]) -> list[str]:
    """One line per bound this reading violates (empty: within every bound)."""
    return [b.describe(reading) for b in bounds if b.violated(reading)]


def reasons_to_trip(bounds: list[Bound], report: DriftReport) -> list[str]:
    """Why these weights trip the breaker (empty: they pass). Non-finite weights always trip."""
    reasons = [f"{report.non_finite} weights are NaN or infinite"] if report.non_finite else []
    return reasons + violations(bounds, readings_of(report))


# ---------------------------------------------------------------- choosing the bounds (pure statistics)

def choose_threshold(benign: list[float], target_fpr: float) -> float:
    """The lowest threshold with at most ⌊target_fpr · n⌋ benign readings above it (trip when statistic > threshold)."""
    ordered = sorted(benign, reverse=True)
    allowed = math.floor(target_fpr * len(ordered) + 1e-9)
    return ordered[min(allowed, len(ordered) - 1)]


TWO_SIDED = (("harm_drift_ratio", "above"), ("harm_drift_ratio", "below"), ("canary_drift_ratio", "above"),
             ("moved_canary_drift_ratio", "below"), ("sample_harm_ratio", "above"))
"""Harmful push; push against the harmful direction; canaries moved more than benign drift; canaries held
still where the rest of their parameter moved; harmful push on the non-canary sample (it holds up over long
attacks, where the canaries' reading fades)."""


def choose_bounds(benign: list[Mapping[str, float]], primary: str, target_fpr: float,
                  sides: tuple[tuple[str, str], ...] = TWO_SIDED) -> list[Bound]:
    """The primary statistic's upper bound first, then the other `sides`. The target FPR is split evenly
    among them, so that on the benign readings the union trips on at most ⌊target_fpr · n⌋; each `below`
    bound then moves further out by BELOW_MARGIN, and an `above` bound by its ABOVE_MARGIN. A side whose
    statistic some benign reading lacks (recorded before it existed) gets no bound."""
    sides = [(primary, "above")] + [side for side in sides if side != (primary, "above")
                                    and all(side[0] in r for r in benign)]
    share = target_fpr / len(sides)
    moved = MOVED_SHARE * min(r["other_drift"] for r in benign)
    bounds = []
    for statistic, side in sides:
        values = [r[statistic] for r in benign]
        if side == "above":
            highest = float(choose_threshold(values, share))
            bound = Bound(statistic, side, highest * ABOVE_MARGIN.get(statistic, 1.0) if highest > 0 else highest)
        else:
            lowest = float(-choose_threshold([-v for v in values], share))
            lowest = lowest * BELOW_MARGIN if lowest > 0 else lowest - (1 - BELOW_MARGIN) * abs(lowest)
            bound = Bound(statistic, side, lowest, min_other_drift=moved)
        bounds.append(Bound(**{**bound.to_json(), "fpr": float(np.mean([bound.violated(r) for r in benign]))}))
    return bounds


def rule_figures(records: list[dict], bounds: list[Bound], bootstrap: int, seed: int) -> dict:
    """TPR and FPR of the whole rule (trip when any bound is violated) over calibration runs, with 95%
    bootstrap intervals that resample whole runs, and the share of each kind of run it trips on per step."""
    runs = {kind: [[any(b.violated(r) for b in bounds) for r in rec["readings"]] for rec in records
                   if rec["harmful"] == (kind == "harmful")] for kind in ("benign", "harmful")}
    rate = {kind: float(np.mean(sum(v, []))) for kind, v in runs.items()}
    rng = np.random.default_rng(seed)
    boot = {"benign": [], "harmful": []}
    for _ in range(bootstrap):
        for kind, v in runs.items():
            picked = rng.integers(0, len(v), len(v))
            boot[kind].append(float(np.mean(sum((v[i] for i in picked), []))))
    ci = {kind: [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] for kind, x in boot.items()}
    by_step: dict[str, dict[str, list[bool]]] = {}
    for rec in records:
        for r in rec["readings"]:
            by_step.setdefault(str(r["step"]), {"benign": [], "harmful": []})["harmful" if rec["harmful"] else "benign"].append(
                any(b.violated(r) for b in bounds))
    steps = sorted(by_step, key=int)
    return {"tpr": rate["harmful"], "fpr": rate["benign"], "tpr_ci95": ci["harmful"], "fpr_ci95": ci["benign"],
            "tpr_by_step": {s: float(np.mean(by_step[s]["harmful"])) if by_step[s]["harmful"] else None for s in steps},
            "fpr_by_step": {s: float(np.mean(by_step[s]["benign"])) if by_step[s]["benign"] else None for s in steps}}
