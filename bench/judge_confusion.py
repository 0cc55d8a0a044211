"""The three-way judge on its labelled answers: confusion matrices with and without the base model's NLL.

    python bench/judge_confusion.py [--model smollm2] [--judge refusal-matcher]

Labelled answers: src/immunizer/data/files/judge_examples.jsonl (40 written for the project, 99 real
outputs of its quick bench: attacked, over-trained and benign-fine-tuned models). Writes
bench/results/judge_confusion.json (matrices, accuracy, every miss with its reasons, the NLL
distribution per label) and prints the matrices; the README quotes them."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from immunizer.models.loading import load_model
from immunizer.paths import write_json_atomic
from immunizer.redteam.judges import VERDICTS, degenerate_nll, labelled_examples, load_judge, three_way


def matrix(labels: list[str], verdicts: list[str]) -> dict:
    return {truth: {v: sum(1 for t, x in zip(labels, verdicts) if t == truth and x == v) for v in VERDICTS} for truth in VERDICTS}


def show(title: str, m: dict) -> str:
    header = "label / verdict"
    rows = [title, f"{header:>16} " + " ".join(f"{v:>10}" for v in VERDICTS)]
    rows += [f"{t:>16} " + " ".join(f"{m[t][v]:>10}" for v in VERDICTS) for t in VERDICTS]
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", help="The base model whose NLL reads the answers.")
    parser.add_argument("--judge", default="refusal-matcher")
    parser.add_argument("--out", default="bench/results/judge_confusion.json")
    args = parser.parse_args()
    examples = labelled_examples()
    prompts = [e.get("prompt") or "" for e in examples]
    answers = [e["answer"] for e in examples]
    labels = [e["label"] for e in examples]
    judge = load_judge(args.judge)
    model, tokenizer = load_model(args.model)
    nll = degenerate_nll(model, tokenizer, prompts, answers, max_response_tokens=48)
    result = {"n": len(examples), "counts": {label: labels.count(label) for label in VERDICTS}, "judge": args.judge,
              "model": args.model}
    for name, nlls in (("text_only", None), ("with_nll", nll)):
        verdicts = three_way(judge, prompts, answers, nlls)
        m = matrix(labels, [v for v, _ in verdicts])
        result[name] = {"matrix": m, "accuracy": sum(m[t][t] for t in VERDICTS) / len(examples),
                        "misses": [{"label": e["label"], "verdict": v, "reasons": why, "answer": e["answer"][:160],
                                    "source": e.get("source"), "nll": round(n, 2)}
                                   for e, (v, why), n in zip(examples, verdicts, nll) if v != e["label"]]}
        print(show(f"{name}: accuracy {result[name]['accuracy']:.1%}", m))
    result["nll_by_label"] = {label: {"median": statistics.median(n for n, t in zip(nll, labels) if t == label),
                                      "max": max(n for n, t in zip(nll, labels) if t == label),
                                      "min": min(n for n, t in zip(nll, labels) if t == label)} for label in VERDICTS}
    print(json.dumps(result["nll_by_label"], indent=1))
    write_json_atomic(Path(args.out), result)


if __name__ == "__main__":
    main()
