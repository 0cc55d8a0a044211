"""Canary drift: how far a candidate's weights moved from the released model, at the canaries and
elsewhere, per layer and overall.

Written here because no library measures this. The candidate is compared with what the manifest
holds: the canaries' released values, and a fixed seeded sample of non-canary released values
(`reference.safetensors`, see `reference.py`). Drift is the RMS of (candidate − released) over a
set of weights; the statistic is canary drift / non-canary drift. A harmful fine-tune pushes
hardest on the weights that carry refusal, which are the canaries; a benign one moves them like any
other weight (and Phase 2's stabilization term trained them to hold still under benign updates).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
TINY = 1e-12  # below this RMS a weight set has not moved at all (fp32 round-off is ~1e-8 relative)


def layer_of(name: str) -> str:
    """The group a parameter is reported under: `layers.N`, `embedding`, `lm_head` or `other`."""
    m = _LAYER.search(name)
    if m:
        return f"layers.{int(m.group(1))}"
    if "embed" in name:
        return "embedding"
    if "lm_head" in name:
        return "lm_head"
    return "other"


def drift_ratio(canary_rms: float, other_rms: float) -> float:
    """Canary drift relative to non-canary drift; 0 when nothing moved, large when only canaries moved."""
    if canary_rms <= TINY:
        return 0.0
    return canary_rms / max(other_rms, TINY)


@dataclass
class DriftSums:
    """Running sums for one group of parameters (float64: 1e9 squared drifts must not lose precision)."""
    canary_sq: float = 0.0
    canaries: int = 0
    other_sq: float = 0.0
    samples: int = 0
    canary_max: float = 0.0
    toward_harm: float = 0.0
    """Σ dᵢ·Δwᵢ over the canaries, dᵢ = ±1 the direction a harmful fine-tune pushes canary i (reference.py)."""
    moved_canary_sq: float = 0.0
    moved_canaries: int = 0
    moved_other_sq: float = 0.0
    moved_samples: int = 0
    """The canary sums over parameters whose sampled weights moved at all: a LoRA fine-tune leaves the
    embeddings and norms (and their canaries) untouched, which is not the frozen-canary signature."""
    sample_toward_harm: float = 0.0
    directed_samples: int = 0
    """Σ dᵢ·Δwᵢ over the non-canary sample where it has a harmful sign dᵢ, and how many such weights."""
    non_finite: int = 0
    """NaN/inf weights seen. They are left out of the sums (one NaN would make every figure NaN, and
    `NaN > threshold` is false) and trip the breaker on their own."""

    def add(self, canary_delta: torch.Tensor, other_delta: torch.Tensor, direction: torch.Tensor | None = None,
            non_finite: int = 0, sample_direction: torch.Tensor | None = None) -> None:
        c, o = canary_delta.double(), other_delta.double()
        c_sq, o_sq = float(torch.dot(c, c)), float(torch.dot(o, o))
        bad = 0
        if not (math.isfinite(c_sq) and math.isfinite(o_sq)):  # squares of float32 values overflow no double
            bad = int((~torch.isfinite(c)).sum()) + int((~torch.isfinite(o)).sum())
            c, o = torch.nan_to_num(c, 0.0, 0.0, 0.0), torch.nan_to_num(o, 0.0, 0.0, 0.0)
            c_sq, o_sq = float(torch.dot(c, c)), float(torch.dot(o, o))
        self.non_finite += max(bad, non_finite)
        if o_sq > 0:  # this parameter moved: its canaries should have moved too
            self.moved_canary_sq += c_sq
            self.moved_canaries += c.numel()
            self.moved_other_sq += o_sq
            self.moved_samples += o.numel()
        self.canary_sq += c_sq
        self.canaries += c.numel()
        self.other_sq += o_sq
        self.samples += o.numel()
        if c.numel():
            self.canary_max = max(self.canary_max, float(c.abs().max()))
        if direction is not None:
            self.toward_harm += float(torch.dot(c, direction.double()))
        if sample_direction is not None:
            self.sample_toward_harm += float(torch.dot(o, sample_direction.double()))
            self.directed_samples += o.numel()

    def merge(self, other: "DriftSums") -> None:
        self.canary_sq += other.canary_sq
        self.canaries += other.canaries
        self.other_sq += other.other_sq
        self.samples += other.samples
        self.canary_max = max(self.canary_max, other.canary_max)
        self.toward_harm += other.toward_harm
        self.sample_toward_harm += other.sample_toward_harm
        self.directed_samples += other.directed_samples
        self.non_finite += other.non_finite
        self.moved_canary_sq += other.moved_canary_sq
        self.moved_canaries += other.moved_canaries
        self.moved_other_sq += other.moved_other_sq
        self.moved_samples += other.moved_samples

    @property
    def canary_drift(self) -> float:
        return math.sqrt(self.canary_sq / self.canaries) if self.canaries else 0.0

    @property
    def other_drift(self) -> float:
        return math.sqrt(self.other_sq / self.samples) if self.samples else 0.0

    @property
    def ratio(self) -> float:
        return drift_ratio(self.canary_drift, self.other_drift)

    @property
    def moved_ratio(self) -> float:
        """`ratio` over the parameters that moved: 0 when their canaries were held still. 1 (what a benign
        fine-tune reads) when no canary lies in a moved parameter: nothing to judge, no evidence either way."""
        if not self.moved_canaries:
            return 1.0
        canary = math.sqrt(self.moved_canary_sq / self.moved_canaries)
        return drift_ratio(canary, math.sqrt(self.moved_other_sq / self.moved_samples))

    @property
    def harm_drift(self) -> float:
        """Mean canary drift along the harmful direction (signed: benign updates average out near 0)."""
        return self.toward_harm / self.canaries if self.canaries else 0.0

    @property
    def harm_ratio(self) -> float:
        """harm_drift relative to non-canary drift."""
        return self.harm_drift / max(self.other_drift, TINY) if abs(self.harm_drift) > TINY else 0.0

    @property
    def sample_harm_ratio(self) -> float:
        """Mean drift of the non-canary sample along each weight's own harmful sign, relative to its RMS drift: the
        canaries' reading without the canaries. 0 where the reference has no such signs."""
        if not self.directed_samples or self.other_drift <= TINY:
            return 0.0
        return self.sample_toward_harm / self.directed_samples / self.other_drift

    def to_json(self) -> dict:
        # A group whose every weight is a canary (a small norm vector) has no sample to compare with: no ratio.
        return {"canary_drift": self.canary_drift, "other_drift": self.other_drift,
                "ratio": self.ratio if self.samples else None, "harm_drift": self.harm_drift,
                "harm_ratio": self.harm_ratio if self.samples else None,
                "sample_harm_ratio": self.sample_harm_ratio if self.directed_samples else None,
                "canary_max_drift": self.canary_max, "canaries": self.canaries, "samples": self.samples,
                "non_finite_weights": self.non_finite}


STATISTICS = ("canary_drift_ratio", "harm_drift_ratio", "moved_canary_drift_ratio", "sample_harm_ratio")
"""`canary_drift_ratio`: RMS canary drift / RMS non-canary drift. `harm_drift_ratio`: mean canary drift
along the harmful direction / RMS non-canary drift (needs the reference's direction).
`moved_canary_drift_ratio`: `canary_drift_ratio` over the parameters that moved (the frozen-canary test).
`sample_harm_ratio`: mean drift of the non-canary sample along each weight's harmful sign / its RMS drift (needs
the reference's sample direction; 0 without it). It keeps more of its separation than `harm_drift_ratio` when an
attack runs on after it has learned its data (docs/breaker.md)."""


@dataclass
class DriftReport:
    """Drift of one candidate. `statistic` is what the breaker thresholds (`statistic_name`)."""
    overall: DriftSums
    layers: dict[str, DriftSums] = field(default_factory=dict)
    candidate: str = ""
    kind: str = ""
    """`module`, `safetensors`, `lora` or `lora-live`: how the candidate's weights were read."""
    statistic_name: str = "canary_drift_ratio"
    files: list[str] = field(default_factory=list)
    """The weight files read (empty for a live module): what the verdict is about."""

    @property
    def statistic(self) -> float:
        return self.value(self.statistic_name)

    def value(self, statistic_name: str) -> float:
        if statistic_name not in STATISTICS:
            raise ValueError(f"unknown breaker statistic {statistic_name!r}; known: {', '.join(STATISTICS)}")
        return {"canary_drift_ratio": self.overall.ratio, "harm_drift_ratio": self.overall.harm_ratio,
                "moved_canary_drift_ratio": self.overall.moved_ratio,
                "sample_harm_ratio": self.overall.sample_harm_ratio}[statistic_name]

    @property
    def canary_drift(self) -> float:
        return self.overall.canary_drift

    @property
    def other_drift(self) -> float:
        return self.overall.other_drift

    @property
    def non_finite(self) -> int:
        return self.overall.non_finite

    @property
    def max_layer_ratio(self) -> float:
        return max((s.ratio for s in self.layers.values() if s.samples), default=0.0)

    def to_json(self) -> dict:
        def key(group: str):
            m = re.fullmatch(r"layers\.(\d+)", group)
            return (1, int(m.group(1)), "") if m else ((0, 0, group) if group == "embedding" else (2, 0, group))

        return {
            "statistic": self.statistic,
            "statistic_name": self.statistic_name,
            "canary_drift_ratio": self.overall.ratio,
            "harm_drift_ratio": self.overall.harm_ratio,
            "moved_canary_drift_ratio": self.overall.moved_ratio,
            "sample_harm_ratio": self.overall.sample_harm_ratio,
            "canary_drift": self.canary_drift,
            "harm_drift": self.overall.harm_drift,
            "other_drift": self.other_drift,
            "canary_max_drift": self.overall.canary_max,
            "max_layer_ratio": self.max_layer_ratio,
            "canaries": self.overall.canaries,
            "samples": self.overall.samples,
            "non_finite_weights": self.non_finite,
            "candidate": self.candidate,
            "candidate_kind": self.kind,
            "files": self.files,
            "layers": {g: self.layers[g].to_json() for g in sorted(self.layers, key=key)},
        }


Gathered = tuple[str, torch.Tensor, torch.Tensor, int]
"""What every source yields (sources.py), per canary parameter: (parameter name, candidate − released at the
canaries, candidate − released at the reference sample, non-finite weights in the whole parameter where the
source sees it whole, else 0)."""


def summarize(reference, deltas: Iterable[Gathered], candidate: str = "", kind: str = "",
              files: list[str] | None = None) -> DriftReport:
    """Fold a source's per-parameter deltas into per-layer and overall drift: the one place a scan's figures
    are computed, whatever the candidate's kind."""
    layers: dict[str, DriftSums] = {}
    direction, sample_direction = reference.direction or {}, reference.sample_direction or {}
    for name, canary_delta, other_delta, non_finite in deltas:
        layers.setdefault(layer_of(name), DriftSums()).add(canary_delta, other_delta, direction.get(name), non_finite,
                                                            sample_direction.get(name))
    overall = DriftSums()
    for sums in layers.values():
        overall.merge(sums)
    return DriftReport(overall, layers, candidate, kind, reference.statistic_name, files or [])
