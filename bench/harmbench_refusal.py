"""Before/after immunization on 50 HarmBench prompts (evaluation only) with the refusal matcher,
plus over-refusal on the project's safe-but-scary prompts.

    python bench/harmbench_refusal.py --before smollm2 --after runs/demo [--n 50]
"""
import argparse
import json
from pathlib import Path

from immunizer.data.eval_prompts import harmbench_prompts
from immunizer.data.prompts import safe_scary_set
from immunizer.models import load_model
from immunizer.redteam.refusal_eval import refusal_rates

HERE = Path(__file__).parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="smollm2")
    ap.add_argument("--after", required=True)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(HERE / "results" / "harmbench_refusal.json"))
    args = ap.parse_args()
    harmful = list(harmbench_prompts(args.n).prompts)
    safe = list(safe_scary_set("all").prompts)
    result = {"n_harmful": len(harmful), "n_safe": len(safe)}
    for label, spec in (("before", args.before), ("after", args.after)):
        model, tok = load_model(spec)
        rates = refusal_rates(model, tok, harmful, safe, max_new_tokens=args.max_new_tokens)
        result[label] = {"harmful_answered": rates.harmful_answered, "safe_refused": rates.safe_refused}
        result[f"{label}_samples"] = rates.samples
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("samples")}, indent=2))


if __name__ == "__main__":
    main()
