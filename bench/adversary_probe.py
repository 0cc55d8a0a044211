"""Phase 1's adversary (`phase1.adversary`: lat, sign, inner) measured where it matters: immunize with the quick
preset and the given overrides, then the figures before any attack and along the standard attack (steps 10, 20,
39; bench/probe_common.py).

    python bench/adversary_probe.py --candidate "phase1.adversary=sign,phase1.sign_epsilon=2e-4"
    python bench/adversary_probe.py --method sft --candidate "data.imperative_rephrasings=true"   # the baseline, same change
    python bench/adversary_probe.py --start bench/results/bench_quick/methods/immunizer/seed0 --candidate ""
        # immunize a release again (as the feedback loop does; both teachers stay the base model)

Each candidate trains into runs/adversary-probe/<name>/ (interrupted trainings resume; finished pieces are
kept: rerun the same command to continue). Results: bench/results/adversary_probe.json."""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from probe_common import BASE_MODEL, before_and_after

from immunizer.baselines import METHOD_CONFIGS
from immunizer.config import load_config, split_overrides
from immunizer.immunize import immunize
from immunizer.models import resolve_model


METHOD_CONFIG_NAMES = {path.stem for path in METHOD_CONFIGS.glob("*.yaml")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidate", action="append", required=True, help="Comma-separated key=value overrides (repeat).")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--method", default="immunizer", choices=["immunizer", *sorted(METHOD_CONFIG_NAMES)],
                        help="immunizer (the preset as is) or a method config of presets/methods/ under it (sft, ...).")
    parser.add_argument("--work", default="runs/adversary-probe")
    parser.add_argument("--out", default="bench/results/adversary_probe.json")
    parser.add_argument("--no-attack", action="store_true", help="Only the figures before any attack.")
    parser.add_argument("--start", help="Immunize this release (or model directory) instead of the base model, as the "
                        "feedback loop does; the harmful and helpful teachers stay the base model.")
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for candidate in args.candidate:
        overrides = split_overrides(candidate)
        name = re.sub(r"[^\w.-]+", "_", "_".join(overrides)) or "preset"
        name = name if args.method == "immunizer" else f"{args.method}:{name}"
        name = f"from-{'-'.join(Path(args.start).parts[-2:])}:{name}" if args.start else name
        directory = Path(args.work) / name.replace(":", "-")
        entry = results.setdefault(name, {"overrides": overrides, "preset": args.preset})
        if not (directory / "manifest.json").is_file():
            started = time.perf_counter()
            method = None if args.method == "immunizer" else METHOD_CONFIGS / f"{args.method}.yaml"
            config = load_config(args.preset, method, overrides)
            if args.start:
                config.teachers.harmful = config.teachers.helpful = BASE_MODEL
            immunize(resolve_model(args.start) if args.start else BASE_MODEL, directory, config,
                     resume=(directory / "checkpoint").is_dir())
            entry["train_seconds"] = time.perf_counter() - started
        before_and_after(name, directory, directory / "probe", entry, results, out, attack=not args.no_attack)


if __name__ == "__main__":
    main()
