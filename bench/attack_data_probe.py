"""What the standard attack's data does: the same attack (100 pairs, full fine-tuning, AdamW lr 5e-5, 39 steps)
trained on the teacher's answers with its refusals answered again by sampling (the default since issue 13) or
kept as they were (`--keep-refusals`), read on the 154 held-out harmful prompts at the given steps.

    python bench/attack_data_probe.py --model sft=runs/sft-tuning/phase2.lr_2e-6 --model none=smollm2

Each (model, data) pair works in runs/attack-data-probe/<name>-<data>/ and keeps every finished piece: rerun the
same command to continue. Results: bench/results/attack_data_probe.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from probe_common import attack_curve

from immunizer.paths import write_json_atomic
from immunizer.redteam.attacks import AttackConfig, run_attack


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append", required=True, help="name=model spec or directory (repeat).")
    parser.add_argument("--steps", default="20,39", help="Comma-separated steps to read; the last is the run's length.")
    parser.add_argument("--keep-refusals", action="store_true", help="Train on the teacher's greedy answers, refusals included.")
    parser.add_argument("--work", default="runs/attack-data-probe")
    parser.add_argument("--out", default="bench/results/attack_data_probe.json")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    data = "keep-refusals" if args.keep_refusals else "refusals-resampled"
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for spec in args.model:
        name, model = spec.split("=", 1)
        work = Path(args.work) / f"{name}-{data}"
        entry = results.setdefault(f"{name}/{data}", {"model": model, "data": data})
        if not (work / "run.json").is_file():
            record = run_attack(model, work, AttackConfig(steps=steps[-1], save_steps=steps[:-1], keep_refusals=args.keep_refusals))
            entry["teacher_refusals"], entry["attack_seconds"] = record.get("teacher_refusals"), record["seconds"]
            write_json_atomic(out, results)
        attack_curve(f"{name} {data}", work, steps, entry, results, out)


if __name__ == "__main__":
    main()
