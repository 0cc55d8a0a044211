"""Repair from the candidate's own changes (breaker/repair.py), measured where it matters:

- the standard attack on `sft` (compliance-only, 39 steps): complied share after repair, against the release's
  own pre-attack share (issue 15's target: at most 5 points above it);
- a mixed fine-tune (the benign extraction task with 10% harmful pairs): complied share and the task's
  accuracy after repair, against the unrepaired fine-tune (target: within 5 points).

    python bench/repair_probe.py --release runs/sft-tuning/phase2.lr_2e-6 \\
        --attacked runs/attack-data-probe/sft-refusals-resampled/model

Each piece is saved to bench/results/repair_probe.json as it finishes; rerun the same command to continue."""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from probe_common import HEADLINE, figures

from immunizer.breaker.repair import RepairConfig, repair
from immunizer.data.tasks import GENERATED
from immunizer.data.teacher import Teacher
from immunizer.paths import write_json_atomic
from immunizer.redteam.attacks import AttackConfig, FinetuneConfig, harmful_rows, run_finetune
from immunizer.redteam.evaluate import EvalConfig, evaluate

VARIANTS = [("contribution", 20.0), ("contribution", 5.0), ("contribution", 2.0), ("magnitude", 20.0)]
"""Run in this order: the revert-share curve on the attacked model first (20% over-refused), then the mixed
fine-tune, then the direction-blind comparison."""


def evaluate_into(results: dict, key: str, model_dir: Path, report: Path, out: Path, with_task: bool) -> None:
    if key not in results:
        # over-refusal is always read: a repair that refuses everything is not a repair
        config = EvalConfig(max_new_tokens=32, n_task=40 if with_task else 0, teacher="smollm2")
        found = evaluate(model_dir, report, config)
        results[key] = {**figures(found), **({"benign_task_accuracy": found.get("benign_task_accuracy")} if with_task else {})}
        write_json_atomic(out, results)
    print(key, json.dumps({k: results[key].get(k) for k in (*HEADLINE, "benign_task_accuracy")}), flush=True)


def repaired(results: dict, key: str, candidate: Path, release: Path, work: Path, config: RepairConfig, out: Path) -> Path:
    directory = work / key
    if not (directory / "repair.json").is_file():
        record = repair(candidate, release, directory, config)
        results.setdefault("repairs", {})[key] = record
        write_json_atomic(out, results)
    return directory / "model"


def mixed_finetune(release: Path, work: Path, harmful: int, benign: int, epochs: float) -> Path:
    """The benign extraction task with `harmful` standard-attack pairs mixed in, fine-tuned like the attack."""
    directory = work / "mixed"
    if not (directory / "run.json").is_file():
        rows = harmful_rows(AttackConfig(samples=harmful), Teacher("smollm2"))
        rows += [{"prompt": r["prompt"], "response": r["response"]} for r in GENERATED["extraction"](benign, 0, split="train")]
        random.Random(0).shuffle(rows)
        data = work / "mixed.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        run_finetune(release, directory, FinetuneConfig(data=str(data), epochs=epochs))
    return directory / "model"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", required=True, help="The release the attacked model was fine-tuned from.")
    parser.add_argument("--attacked", required=True, help="The release after the standard attack (a model directory).")
    parser.add_argument("--work", default="runs/repair-probe")
    parser.add_argument("--out", default="bench/results/repair_probe.json")
    parser.add_argument("--mixed-harmful", type=int, default=20)
    parser.add_argument("--mixed-benign", type=int, default=180)
    parser.add_argument("--mixed-epochs", type=float, default=2.0)
    parser.add_argument("--mixed-revert-percent", type=float, default=2.0,
                        help="The share reverted on the mixed fine-tune (the attacked curve says which to use).")
    args = parser.parse_args()
    out, work, release = Path(args.out), Path(args.work), Path(args.release)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update(release=str(release), attacked=str(args.attacked))
    def attacked(score: str, percent: float) -> None:
        key = f"attacked+repair-{score}-{percent:g}"
        model = repaired(results, key, Path(args.attacked), release, work, RepairConfig(score=score, revert_percent=percent), out)
        evaluate_into(results, key, model, work / f"{key}.eval.json", out, with_task=False)

    for variant in VARIANTS[:3]:
        attacked(*variant)
    mixed = mixed_finetune(release, work, args.mixed_harmful, args.mixed_benign, args.mixed_epochs)
    evaluate_into(results, "mixed", mixed, work / "mixed.eval.json", out, with_task=True)
    key = f"mixed+repair-contribution-{args.mixed_revert_percent:g}"
    model = repaired(results, key, mixed, release, work, RepairConfig(revert_percent=args.mixed_revert_percent), out)
    evaluate_into(results, key, model, work / f"{key}.eval.json", out, with_task=True)
    attacked(*VARIANTS[3])


if __name__ == "__main__":
    main()
