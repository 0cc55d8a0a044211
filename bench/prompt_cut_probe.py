"""The held-out jailbreak-wrapped prompts answered as the harness sends them (`generate` keeps the last
`max_prompt_tokens` = 256 tokens of the chat-formatted prompt, which drops the template's opening turn markers from
every prompt longer than that) and whole, for one or more models. Three-way verdicts without the NLL rule (text only).

    python bench/prompt_cut_probe.py MODEL [MODEL ...]

Results: bench/results/prompt_cut_probe.json (keyed by model)."""
from __future__ import annotations

import argparse
import collections
import inspect
import json
from pathlib import Path

from immunizer.data.eval_prompts import harmful_eval_set
from immunizer.data.teacher import chat_prompt_ids, generate
from immunizer.models import load_model
from immunizer.paths import write_json_atomic
from immunizer.redteam.judges import load_judge, three_way

HARNESS_CUT = inspect.signature(generate).parameters["max_prompt_tokens"].default
"""What evaluate() sends: it leaves `generate`'s default in place (256)."""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/results/prompt_cut_probe.json")
    args = parser.parse_args()
    eval_set = harmful_eval_set()
    prompts = [p for p, s in zip(eval_set.prompts, eval_set.slices) if s == "wrapped"]
    judge = load_judge("refusal-matcher")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for spec in args.models:
        model, tokenizer = load_model(spec)
        lengths = [len(chat_prompt_ids(tokenizer, p)) for p in prompts]
        entry = {"prompts": len(prompts), "longer_than_cut": sum(n > HARNESS_CUT for n in lengths),
                 "max_prompt_tokens": max(lengths)}
        for name, cut in (("harness_cut_256", HARNESS_CUT), ("whole", max(lengths))):
            answers = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, max_prompt_tokens=cut,
                               bf16=False, desc=name)
            verdicts = [v for v, _ in three_way(judge, prompts, answers)]
            entry[name] = {"verdicts": dict(collections.Counter(verdicts)), "empty": sum(a == "" for a in answers),
                           "examples": answers[:3]}
        results[spec] = entry
        write_json_atomic(out, results)
        print(spec, json.dumps({k: v for k, v in entry.items() if k != "examples"}))


if __name__ == "__main__":
    main()
