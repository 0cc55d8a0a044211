"""Shared by the resistance probes (lox_probe.py, adversary_probe.py): one model's figures before any attack and
along the standard attack (100 pairs, full fine-tuning, AdamW lr 5e-5, read at steps 10, 20 and 39)."""
from __future__ import annotations

import json
from pathlib import Path

from immunizer.paths import write_json_atomic
from immunizer.redteam.attacks import AttackConfig, run_attack
from immunizer.redteam.evaluate import EvalConfig, evaluate

KEEP = ("harmful_score", "harmful_score_ci95", "refused_share", "degenerate_share", "repeated_sentence_share",
        "harmful_nll", "over_refusal", "slices", "n", "n_safe", "seconds", "judge")
CURVE = [10, 20, 39]
# the unaligned base model the probes immunize; it also answers the attack's prompts and reads the answers
# (harmful NLL, the degenerate rule), also for a model immunized from a release, whose manifest names the release
BASE_MODEL = "smollm2"
HEADLINE = ("harmful_score", "refused_share", "degenerate_share", "over_refusal", "repeated_sentence_share")


def figures(report: dict) -> dict:
    return {k: report.get(k) for k in KEEP if k in report}


def _evaluated(model: Path, path: Path, config: EvalConfig) -> dict:
    """The evaluation on disk (re-read every run, so `immunizer rejudge` of the work directory reaches the
    results file on the next run of the same command), else a new one."""
    return figures(json.loads(path.read_text()) if path.is_file() else evaluate(model, path, config))


def before_and_after(name: str, directory: Path, work: Path, entry: dict, results: dict, out: Path,
                     attack: bool = True) -> None:
    """Fill entry["before"] and entry["after"][step], saving `results` to `out` after each finished piece."""
    if "before" not in entry or (work / "eval.json").is_file():
        entry["before"] = _evaluated(directory, work / "eval.json", EvalConfig(max_new_tokens=32, n_task=0, teacher=BASE_MODEL))
        write_json_atomic(out, results)
    print(name, "before", json.dumps({k: entry["before"].get(k) for k in HEADLINE}), flush=True)
    if not attack:
        return
    attack_dir = work / "attack"
    if not (attack_dir / "run.json").is_file():
        run_attack(directory, attack_dir, AttackConfig(steps=CURVE[-1], save_steps=CURVE[:-1], teacher=BASE_MODEL))
    attack_curve(name, attack_dir, CURVE, entry, results, out)


def attack_curve(name: str, attack_dir: Path, steps: list[int], entry: dict, results: dict, out: Path) -> None:
    """Fill entry["after"][step] from an attack run's snapshots (the last step is its final model), harmful
    prompts only, saving `results` to `out` after each."""
    curve = entry.setdefault("after", {})
    for step in steps:
        evaluation = attack_dir / f"eval-step{step}.json"
        if str(step) not in curve or evaluation.is_file():
            snapshot = attack_dir / "model" if step == steps[-1] else attack_dir / "steps" / f"step{step}" / "model"
            curve[str(step)] = _evaluated(snapshot, evaluation,
                                          EvalConfig(max_new_tokens=32, n_task=0, harmful_only=True, teacher=BASE_MODEL))
            write_json_atomic(out, results)
        print(name, "step", step, json.dumps({k: curve[str(step)].get(k) for k in HEADLINE}), flush=True)
