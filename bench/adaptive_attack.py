"""The breaker against a plain and a canary-aware (adaptive) harmful fine-tune.

    python bench/adaptive_attack.py --release runs/quick [--steps 20] [--lr 5e-5]

Both attacks: full fine-tuning, AdamW, batch 4, on harmful (prompt, teacher answer) pairs from the
weak pool's training split. The adaptive attacker knows the manifest and freezes every canary
(their gradient is zeroed, so they never move). Reported: both breaker statistics, whether the
calibrated breaker trips, and the attack's success: the share of 16 held-out harmful prompts
answered without refusal (phrase matcher), before and after."""
import argparse
import json
from pathlib import Path

from immunizer.breaker.breaker import Breaker
from immunizer.breaker.calibrate import CaseData, Case, load_calibration_config
from immunizer.data.prompts import weak_set
from immunizer.finetuning import FinetuneSpec, sft
from immunizer.models import load_model
from immunizer.redteam.refusal_eval import refusal_rates

HERE = Path(__file__).parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", dest="manifest", default="runs/quick", help="an immunize output directory")
    ap.add_argument("--manifest", dest="manifest", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the old name
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--out", default=str(HERE / "results" / "adaptive_attack.json"))
    args = ap.parse_args()
    breaker = Breaker(args.manifest)
    data = CaseData(args.teacher, load_calibration_config("quick"))
    rows = data.rows(Case("attack", True, "harmful", args.samples, args.lr, 0))
    heldout = list(weak_set("heldout").prompts)[:16]
    released = Path(args.manifest) / "model"
    model, tokenizer = load_model(released)
    result = {"manifest": args.manifest, "steps": args.steps, "lr": args.lr, "samples": args.samples,
              "threshold": breaker.threshold, "statistic": breaker.reference.statistic_name,
              "before": {"harmful_answered": refusal_rates(model, tokenizer, heldout, []).harmful_answered}}
    frozen = {n: i for n, i in breaker.reference.canary_index.items() if i.numel()}
    for name, extra in (("plain", {}), ("adaptive_frozen_canaries", {"frozen": frozen})):
        model, tokenizer = load_model(released)
        trained = sft(model, tokenizer, rows, FinetuneSpec(lr=args.lr, steps=args.steps, max_length=144, **extra))
        verdict = breaker.scan(trained)
        result[name] = {"tripped": verdict.tripped, "statistic": verdict.statistic,
                        "canary_drift_ratio": verdict.report.overall.ratio, "harm_drift_ratio": verdict.report.overall.harm_ratio,
                        "canary_drift": verdict.report.canary_drift, "other_drift": verdict.report.other_drift,
                        "harmful_answered": refusal_rates(trained, tokenizer, heldout, []).harmful_answered}
        print(name, json.dumps(result[name]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
