"""Generation on the held-out harmful set: batches in length order (what `generate` does) vs batches in the
set's own order (what it did before), same prompts, same model, one run; prints the ratio.

    python bench/eval_speed.py [--max-new-tokens 8] [--batch-size 16]

The set mixes short requests with jailbreak-wrapped ones ten times longer; a batch pads to its longest prompt,
and prefill dominates generation on a CPU. Writes bench/results/eval_speed.json."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from immunizer.data.eval_prompts import harmful_eval_set
from immunizer.data.teacher import generate
from immunizer.models.loading import load_model
from immunizer.paths import write_json_atomic


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    prompts = list(harmful_eval_set().prompts)
    model, tokenizer = load_model(args.model)
    settings = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    sorted_s, unsorted_s = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        generate(model, tokenizer, prompts, **settings)
        sorted_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(0, len(prompts), args.batch_size):  # one call per batch: the set's own order, as before
            generate(model, tokenizer, prompts[i:i + args.batch_size], **settings)
        unsorted_s.append(time.perf_counter() - started)
    result = {"prompts": len(prompts), **settings, "length_sorted_seconds": statistics.median(sorted_s),
              "set_order_seconds": statistics.median(unsorted_s)}
    result["speedup"] = result["set_order_seconds"] / result["length_sorted_seconds"]
    print(result)
    write_json_atomic(Path("bench/results/eval_speed.json"), result)


if __name__ == "__main__":
    main()
