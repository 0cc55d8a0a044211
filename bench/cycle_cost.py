"""Cost of one immunization cycle against the plain alignment it replaces (safety SFT + DPO on
the same data and steps), measured in one run on the same machine.

    python bench/cycle_cost.py [--model smollm2] [--steps 8] [--preset quick] [--adversaries lat,sign,inner]

Runs both through the CLI (one cycle each, teacher generations cached), reads the per-step
seconds from metrics.jsonl and prints the medians and the ratio; with --adversaries, one immunization per
Phase-1 adversary and its ratios against the same plain alignment. Writes bench/results/cycle_cost.json.
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from immunizer.paths import write_json_atomic

HERE = Path(__file__).parent


def run(model, preset, steps, out, extra, with_selection):
    cmd = [sys.executable, "-m", "immunizer", "immunize", "--model", model, "--out", str(out), "--preset", preset,
           "--set", "cycles=1", "--set", f"phase1.steps={steps}", "--set", f"phase2.steps={steps}", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    # the first step of each phase pays one-off warm-up costs; leave it out of the medians
    p1 = [r["seconds"] for r in records if r.get("phase") == 1 and "seconds" in r and r["step"] > 0]
    p2 = [r["seconds"] for r in records if r.get("phase") == 2 and "seconds" in r and r["step"] > 0]
    # plain alignment has no canaries: its (degenerate, all-zero-score) selection is not part of its cost
    selection = sum(r.get("selection_seconds", 0) for r in records) if with_selection else 0.0
    return {"phase1_step_median_s": statistics.median(p1), "phase2_step_median_s": statistics.median(p2),
            "selection_s": selection,
            "cycle_s": statistics.median(p1) * steps + statistics.median(p2) * steps + selection}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--adversaries", default="lat", help="Comma-separated phase1.adversary values to time (the first is `immunization`).")
    ap.add_argument("--out", default=str(HERE / "results" / "cycle_cost.json"))
    args = ap.parse_args()
    adversaries = [a.strip() for a in args.adversaries.split(",") if a.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = run(args.model, args.preset, args.steps, tmp / "plain", ["--config", str(HERE.parent / "src/immunizer/presets/methods/sft.yaml"), "--set", "phase1.score_untrained_refusal=false"], False)
        per_adversary = {a: run(args.model, args.preset, args.steps, tmp / f"immunized-{a}",
                                ["--set", f"phase1.adversary={a}"], True) for a in adversaries}
    immunized = per_adversary[adversaries[0]]
    result = {
        "model": args.model, "preset": args.preset, "steps_per_phase": args.steps,
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}".strip(),
        "plain_alignment": plain, "immunization": immunized,
        "ratio_cycle": immunized["cycle_s"] / plain["cycle_s"],
        "ratio_phase1_step": immunized["phase1_step_median_s"] / plain["phase1_step_median_s"],
        "ratio_phase2_step": immunized["phase2_step_median_s"] / plain["phase2_step_median_s"],
        "adversaries": {a: {**r, "ratio_cycle": r["cycle_s"] / plain["cycle_s"],
                            "ratio_phase1_step": r["phase1_step_median_s"] / plain["phase1_step_median_s"]}
                        for a, r in per_adversary.items()},
    }
    write_json_atomic(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
