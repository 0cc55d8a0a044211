"""Tune a baseline on its own (issue 13's competent baselines): the same data and step budget as immunizer, its
own learning rates, phase mix or hyperparameters, judged before any attack as the quick bench judges it
(complied / refused / degenerate on the 154 held-out harmful prompts, over-refusal on safe-but-scary prompts, the
extraction task).

    python bench/baseline_tuning.py --candidate "phase2.lr=2e-6" --candidate "phase2.lr=1e-6,phase1.lr=5e-5"
    python bench/baseline_tuning.py --method booster --candidate "" --candidate "phase1.lr=2e-4,baseline.booster_lambda=1"

Each candidate is the method's file (presets/methods/METHOD.yaml, where it has one) on the quick preset plus the
candidate's overrides; `baseline.KEY=VALUE` sets a published defence's own hyperparameter (baselines/train.py,
BaselineConfig). It trains into runs/METHOD-tuning/<name>/ and is evaluated there; finished candidates are kept
(rerun to continue, an interrupted training resumes). Results: bench/results/METHOD_tuning.json, the figures the
chosen method file cites."""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from immunizer.baselines import METHOD_CONFIGS, PUBLISHED, method_baseline, train_baseline
from immunizer.config import apply_override, load_config, split_overrides
from immunizer.immunize import immunize
from immunizer.paths import write_json_atomic
from immunizer.redteam.evaluate import EvalConfig, evaluate

KEEP = ("harmful_score", "harmful_score_ci95", "refused_share", "degenerate_share", "slices", "repeated_sentence_share",
        "harmful_nll", "over_refusal", "benign_task_accuracy", "n", "n_safe")


def train(method: str, preset: str, overrides: list[str], directory: Path) -> None:
    """The candidate's model in `directory` (trained, or the rest of an interrupted training)."""
    method_file = METHOD_CONFIGS / f"{method}.yaml"
    config = load_config(preset, method_file if method_file.is_file() else None,
                         [o for o in overrides if not o.startswith("baseline.")])
    if method not in PUBLISHED:
        immunize("smollm2", directory, config, resume=(directory / "checkpoint").is_dir())
        return
    baseline = method_baseline(method)  # the paper's values, then the method file's tuned `baseline:` section
    for override in overrides:
        if override.startswith("baseline."):
            apply_override(baseline, override.removeprefix("baseline."))
    train_baseline(method, "smollm2", directory, config, baseline, resume=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="sft", help="sft, a published defence (booster, vaccine, repnoise) or "
                        "another method file of presets/methods/.")
    parser.add_argument("--candidate", action="append", required=True,
                        help="Comma-separated key=value overrides (repeat for several candidates; '' = the method as is).")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--work", help="Default: runs/METHOD-tuning.")
    parser.add_argument("--out", help="Default: bench/results/METHOD_tuning.json.")
    args = parser.parse_args()
    work = Path(args.work or f"runs/{args.method}-tuning")
    out = Path(args.out or f"bench/results/{args.method}_tuning.json")
    results = json.loads(out.read_text()) if out.is_file() else {}
    for candidate in args.candidate:
        overrides = split_overrides(candidate)
        name = re.sub(r"[^\w.-]+", "_", "_".join(overrides)) or f"{args.method}-as-is"
        directory = work / name
        started = time.perf_counter()
        if not (directory / "manifest.json").is_file():
            train(args.method, args.preset, overrides, directory)
        seconds = time.perf_counter() - started
        report = evaluate(directory, directory / "eval.json", EvalConfig(max_new_tokens=32, n_task=40))
        results[name] = {"method": args.method, "overrides": overrides, "preset": args.preset, "train_seconds": seconds,
                         **{k: report.get(k) for k in KEEP}}
        print(name, json.dumps(results[name], indent=1), flush=True)
        write_json_atomic(out, results)


if __name__ == "__main__":
    main()
