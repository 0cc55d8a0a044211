"""Which generated benign task does SmolLM2-135M learn within the quick bench's fine-tuning budget?

    python bench/benign_task_probe.py --tasks extraction,arithmetic,listops --samples 256 --lr 5e-5

For each task: exact-match accuracy on its held-out test split before and after one benign fine-tune
(full, AdamW, batch 8, 1 epoch), and the fine-tune's seconds. Writes bench/results/benign_task_probe.json.
The bench's `benign_task_accuracy` uses the task chosen here (data/tasks.py: BENIGN_TASK)."""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from immunizer.data.tasks import GENERATED
from immunizer.data.teacher import generate
from immunizer.models.loading import load_model, resolve_model
from immunizer.paths import write_json_atomic
from immunizer.redteam.attacks import FinetuneConfig, run_finetune
from immunizer.redteam.judges import exact_match


def accuracy(model_dir, rows, max_new_tokens):
    model, tokenizer = load_model(model_dir)
    answers = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, batch_size=16)
    return sum(exact_match(a, r["answer"]) for a, r in zip(answers, rows)) / len(rows), answers[:3]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default="extraction")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", default="bench/results/benign_task_probe.json")
    args = parser.parse_args()
    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    base = resolve_model(args.model)
    for task in args.tasks.split(","):
        test = GENERATED[task](args.n_test, 1000, split="test") if task == "extraction" else GENERATED[task](args.n_test, 1000)
        before, before_examples = accuracy(base, test, args.max_new_tokens)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            run_finetune(base, tmp, FinetuneConfig(data=task, samples=args.samples, lr=args.lr, epochs=args.epochs,
                                                  batch_size=8))
            seconds = time.perf_counter() - started
            after, after_examples = accuracy(Path(tmp) / "model", test, args.max_new_tokens)
        key = f"{task}/n{args.samples}/lr{args.lr:g}/ep{args.epochs:g}"
        results[key] = {"before": before, "after": after, "gain_points": 100 * (after - before), "finetune_seconds": seconds,
                        "n_test": len(test), "before_examples": before_examples, "after_examples": after_examples}
        print(key, json.dumps(results[key], indent=1))
        write_json_atomic(Path(args.out), results)


if __name__ == "__main__":
    main()
