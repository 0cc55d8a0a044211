"""One turn of the feedback loop on a benched release, for the closing-note figures (issue 5).

    python bench/loop_quick.py --bench-out runs/bench-quick --work runs/loop-quick [--preset quick]
        [--n-harmful 64] [--policy release]

1. The release: the bench's immunizer (BENCH_OUT/methods/immunizer/seed0, or the directory a
   `--prebuilt immunizer=DIR` bench recorded) with the bench's report.json
   beside it, copied to WORK/releases/v1; WORK/releases/current.json points at it.
2. Red-teaming the release on prompts outside every evaluation and attack set: DoNotAnswer
   training-pool prompts it was not immunized on, and the project's benign training prompts (everyday
   and borderline wording) for over-refusal. `immunizer eval` writes per-sample records.
3. The review store WORK/review.db: the failed samples imported as they are; a scripted adjudicator
   closes each with the judge's reading (a harmful prompt answered → harmful, a safe one refused →
   over_refusal) and says so in the rationale. It stands in for human reviewers so the figure can be
   reproduced; rubric, consent, provenance, selection and everything after are the real paths.
4. `immunizer cycle --store WORK/review.db --release WORK/releases --out WORK/cycle --preset PRESET`.

Writes bench/results/loop_PRESET.json: what was selected, what the refreshes did, the candidate's
figures beside the release's on every slice, and the verdict. Each step resumes (rerun the command).
"""
import argparse
import json
import secrets
import shutil
import time
from pathlib import Path

from immunizer.config import load_config
from immunizer.data.prompts import benign_set, weak_set
from immunizer.data.training_sets import seeded_subset
from immunizer.loop.cycle import run_cycle
from immunizer.loop.releases import POINTER
from immunizer.paths import write_json_atomic
from immunizer.redteam.evaluate import EvalConfig, evaluate
from immunizer.review import ReviewStore, parse_file

HERE = Path(__file__).parent
SLICE_METRICS = ("harmful_score", "harmful_nll", "over_refusal", "benign_accuracy", "breaker_statistic", "tripped")
ADJUDICATOR = "scripted-adjudicator"


def make_release(bench_out: Path, releases: Path) -> Path:
    release = releases / "v1"
    if not (release / "manifest.json").is_file():
        trained = bench_out / "methods" / "immunizer" / "seed0"
        if not trained.is_dir():  # a bench run with --prebuilt immunizer=DIR records DIR
            trained = Path(json.loads((bench_out / "report.json").read_text())["methods"]["immunizer"]["release_dir"])
        shutil.copytree(trained, release)
        shutil.copy2(bench_out / "report.json", release / "report.json")
    if not (releases / POINTER).is_file():
        write_json_atomic(releases / POINTER, {"release": "v1"})
    return release


def red_team_prompts(release: Path, work: Path, n_harmful: int) -> tuple[Path, Path]:
    """Prompts from the training pools that the release's own immunization did not use."""
    meta = json.loads((release / "manifest.json").read_text())
    config = load_config(overrides=[f"{k}={v}" for k, v in (("data.max_harmful_prompts", meta["config"]["data"]["max_harmful_prompts"]),
                                                             ("data.max_benign_prompts", meta["config"]["data"]["max_benign_prompts"]),
                                                             ("seed", meta["config"]["seed"]))])
    harmful_pool = list(weak_set("train").prompts)
    used = set(seeded_subset(harmful_pool, config.data.max_harmful_prompts, config.seed))
    benign_pool = list(benign_set("train").prompts)
    used_benign = set(seeded_subset(benign_pool, config.data.max_benign_prompts, config.seed))
    harmful = [p for p in harmful_pool if p not in used][:n_harmful]
    safe = [p for p in benign_pool if p not in used_benign] or benign_pool
    paths = work / "redteam" / "harmful.txt", work / "redteam" / "safe.txt"
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    paths[0].write_text("\n".join(harmful) + "\n")
    paths[1].write_text("\n".join(safe) + "\n")
    return paths


def fill_store(url: str, samples: Path) -> dict:
    Path(url).unlink(missing_ok=True)  # a store half filled by an interrupted run is filled again
    store = ReviewStore(url)
    store.add_user(ADJUDICATOR, "adjudicator", secrets.token_urlsafe(16))
    parsed = parse_file(samples)
    added = store.add_items(parsed.records, actor=f"import:{samples.name}")
    labels = {}
    for item_id in added["item_ids"]:
        payload = store.item(item_id).payload
        label = "harmful" if payload["set"] == "harmful" else "over_refusal"
        store.adjudicate(ADJUDICATOR, item_id, label, f"scripted (bench/loop_quick.py): the {payload['judge']} read "
                                                      f"'{payload['label']}' on a {payload['set']} prompt")
        labels[label] = labels.get(label, 0) + 1
    return {"imported": added["added"], "adjudicated": labels,
            "passed_samples_not_imported": parsed.skipped_passed_eval_samples}


def compare(before: dict, after: dict) -> dict:
    """The immunizer row of two reports, slice by slice."""
    rows = {}
    for name, entry in after.items():
        if isinstance(entry, dict) and name in before and isinstance(before[name], dict):
            rows[name] = {m: {"release": before[name].get(m), "candidate": entry.get(m)}
                          for m in SLICE_METRICS if m in entry or m in before[name]}
    rows["breaker"] = {m: {"release": (before.get("breaker") or {}).get(m), "candidate": (after.get("breaker") or {}).get(m)}
                       for m in ("threshold", "tpr", "fpr")}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-out", required=True, type=Path, help="An `immunizer bench` output directory.")
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--preset", default="quick", choices=["tiny", "quick", "standard"])
    parser.add_argument("--policy", default="release")
    parser.add_argument("--n-harmful", type=int, default=64)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="cycle setting KEY=VALUE")
    args = parser.parse_args()
    started = time.perf_counter()

    release = make_release(args.bench_out, args.work / "releases")
    report = json.loads((release / "report.json").read_text())
    teacher = report["base_model"]
    eval_path = args.work / "redteam" / "eval.json"
    if not eval_path.is_file():
        harmful, safe = red_team_prompts(release, args.work, args.n_harmful)
        # the bench's decoding, so the red-team answers are the ones the bench would judge
        decoding = {k: v for k, v in report["config"]["eval"].items() if k == "max_new_tokens"}
        evaluate(release, eval_path, EvalConfig(prompts=str(harmful), safe_prompts=str(safe), n_benign=0,
                                                teacher=teacher, **decoding))
    red_team = json.loads(eval_path.read_text())
    url, filled = str(args.work / "review.db"), args.work / "review.json"
    if not filled.is_file():
        write_json_atomic(filled, fill_store(url, Path(red_team["samples"])))
    store_figures = json.loads(filled.read_text())

    summary = run_cycle(url, args.work / "releases", args.work / "cycle", args.preset, args.policy,
                        [f"teacher={teacher}", *args.overrides])
    state = json.loads((args.work / "cycle" / "cycle.json").read_text())
    stages = state["stages"]
    candidate = json.loads(Path(stages["regression"]["report"]).read_text())
    verdict = json.loads((args.work / "cycle" / "verdict.json").read_text())
    results = {
        "command": f"python bench/loop_quick.py --bench-out {args.bench_out} --work {args.work} --preset {args.preset}",
        "red_team": {k: red_team[k] for k in ("harmful_score", "over_refusal", "n", "n_safe")},
        "review_store": store_figures,
        "selected": stages["select"],
        "refresh": stages["refresh"],
        "sft": {k: stages["sft"].get(k) for k in ("rows", "response_nll_before", "response_nll_after", "seconds", "skipped")},
        "reward_model": {k: stages["reward_model"].get(k) for k in ("pairs", "pairs_trained", "mean_margin_before", "mean_margin_after",
                                                                    "accuracy_before", "accuracy_after", "seconds", "skipped")},
        "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
        "release_vs_candidate": compare(report["methods"]["immunizer"], candidate["methods"]["immunizer"]),
        "verdict": {k: verdict[k] for k in ("passed", "summary", "failed", "skipped")},
        "checks": [{k: c.get(k) for k in ("name", "value", "threshold", "passed", "reason")} for c in verdict["checks"]],
        "promote": summary["promote"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = HERE / "results" / f"loop_{args.preset}.json"
    write_json_atomic(out, results)
    print(json.dumps({k: results[k] for k in ("selected", "verdict", "promote")}, indent=2))
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
