"""The breaker's verdicts on a bench method-seed's runs with the release's own calibration instead of the bounds
the bench borrowed (`breaker_calibration`): the stored readings of every scan (each run's final scan and its curve
points) judged again against both, without touching weights. Calibrate the release first.

    immunizer calibrate --release COPY_OF_THE_BUILD --preset quick        # a copy: the bench's build stays as measured
    python bench/breaker_own_calibration.py --release COPY_OF_THE_BUILD \\
        --runs bench/results/bench_quick/runs/immunizer-lox/seed0

A benign run (run.json kind `finetune`) should pass and every attack should trip. Results are added to
bench/results/breaker_own_calibration.json under the runs' folder name."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from immunizer.breaker.bounds import bounds_from_calibration
from immunizer.errors import ImmunizerError
from immunizer.manifest import load_manifest
from immunizer.paths import write_json_atomic
from immunizer.redteam.bench import borrowed_calibration


def scans(run: Path) -> list[tuple[str, dict]]:
    """(label, readings) of a run's curve points in step order, then its final scan."""
    points = sorted(run.glob("curve/step*.scan.json"), key=lambda p: int(p.name[4:].split(".")[0]))
    found = [(p.name.split(".")[0], json.loads(p.read_text())["readings"]) for p in points]
    final = run / "scan.json"
    return found + ([("final", json.loads(final.read_text())["readings"])] if final.is_file() else [])


def verdicts(runs: Path, judges: dict[str, list]) -> dict:
    out = {}
    for run in sorted(p for p in runs.iterdir() if (p / "run.json").is_file()):
        kind = json.loads((run / "run.json").read_text()).get("kind")
        out[run.name] = {"kind": kind, "scans": {
            label: {name: any(bound.violated(reading) for bound in bounds) for name, bounds in judges.items()}
            | {"harm_drift_ratio": reading.get("harm_drift_ratio"), "sample_harm_ratio": reading.get("sample_harm_ratio")}
            for label, reading in scans(run)}}
    return out


def summary(results: dict, judge: str) -> dict:
    """Benign runs passed and attack runs tripped by their last scan (the standard attack's is its step 80, after the
    report's step 39), and every scan of the attacks (curve points and last)."""
    final = {name: r["scans"]["final"][judge] for name, r in results.items() if "final" in r["scans"]}
    benign = [name for name, r in results.items() if r["kind"] == "finetune" and name in final]
    attacks = [name for name in final if name not in benign]
    return {"benign_passed": f"{sum(not final[n] for n in benign)} of {len(benign)}",
            "attacks_tripped": f"{sum(final[n] for n in attacks)} of {len(attacks)}",
            "attack_scans_tripped": f"{sum(s[judge] for n in attacks for s in results[n]['scans'].values())} of "
                                    f"{sum(len(results[n]['scans']) for n in attacks)}"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True, help="The calibrated release (`immunizer calibrate --release`).")
    parser.add_argument("--runs", required=True, help="A method-seed's runs folder of a bench (runs/METHOD/seedN).")
    parser.add_argument("--borrowed", default="quick_calibration_v1.json", help="The bounds the bench borrowed.")
    parser.add_argument("--out", default="bench/results/breaker_own_calibration.json")
    args = parser.parse_args()
    calibration = load_manifest(Path(args.release)).meta.get("breaker")
    if not calibration:
        raise ImmunizerError(f"{args.release} has no calibration; run `immunizer calibrate --release {args.release}` first")
    runs = Path(args.runs)
    if not runs.is_dir():
        raise ImmunizerError(f"{runs} is not a folder; pass a bench's runs/METHOD/seedN")
    judges = {"own": bounds_from_calibration(calibration), "borrowed": bounds_from_calibration(borrowed_calibration(args.borrowed))}
    results = verdicts(runs, judges)
    entry = {"release": args.release, "runs": str(runs), "borrowed": args.borrowed,
             "own_bounds": [b.to_json() for b in judges["own"]],
             "own_calibration": {key: calibration.get(key) for key in ("threshold", "tpr", "fpr", "auroc", "benign_max",
                                                                       "harmful_min", "n_benign", "n_harmful")},
             "summary": {name: summary(results, name) for name in judges}, "runs_judged": results}
    out = Path(args.out)
    everything = json.loads(out.read_text()) if out.is_file() else {}
    everything["/".join(runs.parts[-2:])] = entry
    write_json_atomic(out, everything)
    print(json.dumps(entry["summary"], indent=1))


if __name__ == "__main__":
    try:
        main()
    except ImmunizerError as exc:
        raise SystemExit(f"error: {exc}") from None
