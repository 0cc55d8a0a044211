"""Tune the plain-alignment baseline (`sft`) on its own: same data and step budget as immunizer, its own
learning rates and phase mix, judged before any attack (complied / refused / degenerate on the held-out
harmful set, over-refusal on safe-but-scary prompts).

    python bench/sft_tuning.py --candidate "phase2.lr=2e-6" --candidate "phase2.lr=1e-6,phase1.lr=5e-5"

Each candidate is `presets/methods/sft.yaml` on the quick preset plus its overrides, trained into
runs/sft-tuning/<name>/ and evaluated there; finished candidates are kept (rerun to continue). Results go
to bench/results/sft_tuning.json, the figures the chosen sft.yaml cites."""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from immunizer.baselines import METHOD_CONFIGS
from immunizer.config import load_config
from immunizer.immunize import immunize
from immunizer.paths import write_json_atomic
from immunizer.redteam.evaluate import EvalConfig, evaluate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidate", action="append", required=True,
                        help="Comma-separated key=value overrides on sft.yaml (repeat for several candidates; '' = sft.yaml as is).")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--work", default="runs/sft-tuning")
    parser.add_argument("--out", default="bench/results/sft_tuning.json")
    args = parser.parse_args()
    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for candidate in args.candidate:
        overrides = [o.strip() for o in candidate.split(",") if o.strip()]
        name = re.sub(r"[^\w.-]+", "_", "_".join(overrides)) or "sft-yaml"
        directory = Path(args.work) / name
        config = load_config(args.preset, METHOD_CONFIGS / "sft.yaml", overrides)
        started = time.perf_counter()
        if not (directory / "manifest.json").is_file():
            immunize("smollm2", directory, config, resume=(directory / "checkpoint").is_dir())
        seconds = time.perf_counter() - started
        report = evaluate(directory, directory / "eval.json", EvalConfig(max_new_tokens=32, n_task=40))
        results[name] = {"overrides": overrides, "preset": args.preset, "train_seconds": seconds,
                         **{k: report.get(k) for k in ("harmful_score", "harmful_score_ci95", "refused_share", "degenerate_share",
                                                       "slices", "repeated_sentence_share", "harmful_nll", "over_refusal",
                                                       "benign_task_accuracy", "n", "n_safe")}}
        print(name, json.dumps(results[name], indent=1))
        write_json_atomic(Path(args.out), results)


if __name__ == "__main__":
    main()
