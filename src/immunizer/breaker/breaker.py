"""The circuit breaker: compare a candidate with a manifest and decide. The threshold comes from
`immunizer calibrate` (stored in the manifest); the breaker never invents one."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from immunizer.breaker.bounds import Bound, bounds_from_calibration, reasons_to_trip
from immunizer.breaker.drift import DriftReport
from immunizer.breaker.reference import Reference, load_reference
from immunizer.breaker.sources import module_tensors, scan_module, scan_path, lora_layers, live_lora_delta
from immunizer.errors import ImmunizerError
from immunizer.manifest import Manifest


@dataclass
class Verdict:
    tripped: bool
    statistic: float
    threshold: float
    report: DriftReport
    manifest: Manifest
    reasons: list[str] = field(default_factory=list)
    """Why it tripped, one line per violated bound (empty when clean)."""
    bounds: list[Bound] = field(default_factory=list)

    def to_json(self) -> dict:
        return finite_json({"tripped": self.tripped, "threshold": self.threshold, **self.report.to_json(),
                            "reasons": self.reasons, "bounds": [b.to_json() for b in self.bounds],
                            "manifest": str(self.manifest.directory), "model_sha256": self.manifest.meta.get("model_sha256"),
                            "manifest_sha256": self.manifest.meta.get("manifest_sha256")})


def finite_json(value):
    """`value` with every NaN/inf float replaced by None: `json.dumps` would write bare `NaN`, which is not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


class BreakerTripped(ImmunizerError):
    """Raised by the `raise` policy and by the plain-loop guard; carries the verdict."""

    def __init__(self, verdict: Verdict, what: str):
        self.verdict = verdict
        report = verdict.report  # the calibrated statistic first: the drifts below are what it is made of
        super().__init__(f"circuit breaker tripped on {what}: {'; '.join(verdict.reasons)} ({report.statistic_name} "
                         f"{report.statistic:.3g}; canary drift {report.canary_drift:.3g}, other drift "
                         f"{report.other_drift:.3g}). These weights look harmfully fine-tuned or tampered with; use the "
                         "released model, or send the incident for review")


def calibrated_bounds(manifest: Manifest, statistic: str, threshold: float | None = None) -> list[Bound]:
    """The manifest's calibrated bounds; an explicit `threshold` replaces the primary one (on `statistic`)."""
    calibration = manifest.meta.get("breaker") or {}
    if "threshold" in calibration:
        return bounds_from_calibration(calibration, threshold)
    if threshold is None:
        raise ImmunizerError(
            f"the manifest in {manifest.directory} has no calibrated threshold; run "
            f"`immunizer calibrate --release {manifest.directory}` first (or pass an explicit --threshold)")
    return [Bound(statistic, "above", float(threshold))]


class Breaker:
    """`Breaker(DIR).scan(candidate)` for a module, a model directory, a .safetensors file or a LoRA adapter.
    `require_hmac` (default: $IMMUNIZER_REQUIRE_HMAC) refuses a manifest whose HMAC is absent or unverified."""

    def __init__(self, manifest_dir: str | Path, threshold: float | None = None, hmac_key: bytes | str | None = None,
                 manifest: Manifest | None = None, reference: Reference | None = None,
                 require_hmac: bool | None = None):
        if manifest is None or reference is None:
            manifest, reference = load_reference(Path(manifest_dir), hmac_key=hmac_key, require_hmac=require_hmac)
        self.manifest, self.reference = manifest, reference
        self.bounds = calibrated_bounds(manifest, reference.statistic_name, threshold)
        self.threshold = self.bounds[0].value

    def judge(self, report: DriftReport) -> Verdict:
        reasons = reasons_to_trip(self.bounds, report)
        return Verdict(bool(reasons), report.statistic, self.threshold, report, self.manifest, reasons, self.bounds)

    def scan(self, candidate: torch.nn.Module | str | Path, view: tuple[dict, dict] | None = None) -> Verdict:
        if isinstance(candidate, torch.nn.Module):
            return self.judge(scan_module(self.reference, candidate, view))
        return self.judge(scan_path(self.reference, Path(candidate)))

    @torch.no_grad()
    def restore(self, model: torch.nn.Module) -> int:
        """Write the released values back into the canaries of a live model (for an unmerged LoRA
        model, into the base weights so that base + ΔW equals the released value). Returns how many."""
        tensors, lora = module_tensors(model), lora_layers(model)
        count = 0
        for name in self.reference.names:
            weight = tensors[name]
            flat = weight.data.view(-1)
            idx = self.reference.canary_index[name].to(flat.device)
            target = self.reference.canary_value[name].to(flat.device)
            if name in lora:
                target = target - live_lora_delta(lora[name], idx, weight.shape[-1])
            flat[idx] = target.to(flat.dtype)
            count += idx.numel()
        return count
