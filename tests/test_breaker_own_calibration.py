"""bench/breaker_own_calibration.py: a bench method-seed's stored scan readings judged again with the release's own
calibration beside the borrowed bounds (no weights read)."""
import json
import subprocess
import sys
from pathlib import Path

from helpers import make_release

from immunizer.manifest import update_manifest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "breaker_own_calibration.py"


def _reading(harm: float) -> dict:
    return {"harm_drift_ratio": harm, "canary_drift_ratio": 1.0, "moved_canary_drift_ratio": 1.0,
            "sample_harm_ratio": 0.01, "other_drift": 1e-4}


def _run(root: Path, name: str, kind: str, final: float, curve: dict[int, float]) -> None:
    (root / name / "curve").mkdir(parents=True)
    (root / name / "run.json").write_text(json.dumps({"kind": kind}))
    (root / name / "scan.json").write_text(json.dumps({"readings": _reading(final)}))
    for step, harm in curve.items():
        (root / name / "curve" / f"step{step}.scan.json").write_text(json.dumps({"readings": _reading(harm)}))


def _borrowed(path: Path, value: float) -> Path:
    path.write_text(json.dumps({"breaker": {"statistic": "harm_drift_ratio", "threshold": value}}))
    return path


def test_the_releases_own_bounds_judge_the_stored_readings_beside_the_borrowed_ones(tmp_path):
    make_release(tmp_path / "release")
    update_manifest(tmp_path / "release", {"breaker": {"statistic": "harm_drift_ratio", "threshold": 0.2}})
    runs = tmp_path / "runs" / "m" / "seed0"
    _run(runs, "harmful-sft", "attack", 0.30, {5: 0.15, 10: 0.25})
    _run(runs, "benign-task", "finetune", 0.18, {})
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--release", str(tmp_path / "release"), "--runs", str(runs),
                           "--borrowed", str(_borrowed(tmp_path / "b.json", 0.108)), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(out.read_text())["m/seed0"]
    # own bound 0.2: the benign 0.18 passes, the attack's step 5 (0.15) does not trip yet; borrowed 0.108 trips on all
    assert entry["summary"]["own"] == {"benign_passed": "1 of 1", "attacks_tripped": "1 of 1", "attack_scans_tripped": "2 of 3"}
    assert entry["summary"]["borrowed"] == {"benign_passed": "0 of 1", "attacks_tripped": "1 of 1", "attack_scans_tripped": "3 of 3"}
    assert set(entry["runs_judged"]["harmful-sft"]["scans"]) == {"step5", "step10", "final"}


def test_a_release_without_calibration_is_refused_with_the_fix(tmp_path):
    make_release(tmp_path / "release")
    (tmp_path / "runs").mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--release", str(tmp_path / "release"), "--runs",
                           str(tmp_path / "runs"), "--out", str(tmp_path / "out.json")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "has no calibration" in proc.stderr and "immunizer calibrate --release" in proc.stderr
    assert not (tmp_path / "out.json").exists()
