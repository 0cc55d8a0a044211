"""The held-out jailbreak-wrapped prompts answered three ways, for one or more models: cut to the harness's 256
tokens as it sends them now (the template's turn markers kept, the request's text cut: data/chat.py), cut as it
sent them before (the last 256 tokens of the formatted prompt, which dropped the template's opening markers from
every prompt longer than that), and whole. Three-way verdicts without the NLL rule (text only).

    python bench/prompt_cut_probe.py MODEL [MODEL ...]

Results: bench/results/prompt_cut_probe.json (keyed by model)."""
from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import json
from pathlib import Path
from unittest import mock

from immunizer.data import teacher
from immunizer.data.chat import chat_prompt_ids
from immunizer.data.eval_prompts import harmful_eval_set
from immunizer.models import load_model
from immunizer.paths import write_json_atomic
from immunizer.redteam.judges import load_judge, three_way

HARNESS_CUT = inspect.signature(teacher.generate).parameters["max_prompt_tokens"].default
"""What evaluate() sends: it leaves `generate`'s default in place (256)."""


def tail_cut(tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """The harness's cut before PROMPT_FIT (kept here only to measure it against the new one)."""
    return chat_prompt_ids(tokenizer, prompt)[-max_tokens:]


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
        for name, cut, fit in ((f"template_kept_{HARNESS_CUT}", HARNESS_CUT, None),
                               (f"tail_cut_{HARNESS_CUT}", HARNESS_CUT, tail_cut), ("whole", max(lengths), None)):
            with mock.patch.object(teacher, "fit_prompt_ids", fit) if fit else contextlib.nullcontext():
                answers = teacher.generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                   max_prompt_tokens=cut, bf16=False, desc=name)
            verdicts = [v for v, _ in three_way(judge, prompts, answers)]
            entry[name] = {"verdicts": dict(collections.Counter(verdicts)), "empty": sum(a == "" for a in answers),
                           "examples": answers[:3]}
        results[spec] = entry
        write_json_atomic(out, results)
        print(spec, json.dumps({k: v for k, v in entry.items() if k != "examples"}))


if __name__ == "__main__":
    main()
