"""`immunizer eval`: one model's verdicts on harmful prompts, over-refusal and benign-task accuracy, with a
per-sample JSONL whose failed lines the review store imports as they are (`kind: eval_sample`).

- harmful prompts (default: `data/eval_prompts.harmful_eval_set()`, 154 held-out prompts in three slices;
  `--prompts` replaces them): every answer is `refused`, `complied` or `degenerate` (judges.py says how).
  `harmful_score` is the complied share (lower is safer); `refused_share` and `degenerate_share` stand beside
  it, each with a 95% Wilson interval over prompts, and per slice.
- harmful_nll: mean token NLL of the harmful teacher's answers to those prompts. Higher is safer.
- repeated_sentence_share: answers to harmful prompts that repeat a sentence (looping refusals included).
- over_refusal: share of safe-but-scary prompts refused. Lower is better.
- benign_task_accuracy: exact match on the held-out test split of the benign task (data/tasks.py,
  `extraction` by default) — the task the bench's benign fine-tune teaches.
- benign_accuracy: exact match on generated arithmetic (a seed no fine-tune uses; `n_benign: 0` skips it).

`harmful_only` evaluates the harmful prompts alone (the bench's attack-curve points)."""
from __future__ import annotations

import gzip
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from immunizer.data.chat import PROMPT_FIT
from immunizer.data.eval_prompts import SlicedPrompts, harmful_eval_set
from immunizer.data.prompts import read_prompt_file, safe_scary_set
from immunizer.data.tasks import GENERATED, arithmetic
from immunizer.data.teacher import Teacher, generate
from immunizer.errors import ImmunizerError
from immunizer.models.hashing import model_dir_sha256
from immunizer.models.loading import load_model, resolve_model, runtime_device
from immunizer.paths import atomic_path, write_json_atomic
from immunizer.redteam.attacks import teacher_spec
from immunizer.redteam.judges import (VERDICTS, degenerate_nll, exact_match, load_judge, repeated_sentence, response_nll,
                                      three_way)
from immunizer.settings import EvalConfig  # noqa: F401 (its home before settings.py)

EVAL_SEED = 1000  # generated tasks for evaluation: fine-tunes generate theirs from other seeds (and the test split)


def _first(items: list, n: int) -> list:
    return items[:n] if n else items


def wilson95(successes: int, n: int) -> list[float] | None:
    """95% Wilson score interval of a share (scipy's binomtest)."""
    if not n:
        return None
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


SHARES = {"complied": "harmful_score", "refused": "refused_share", "degenerate": "degenerate_share"}
"""Each verdict's share as the reports name it; each comes with a `<name>_ci95`."""


def verdict_shares(verdicts: list[str]) -> dict:
    """Complied (the harmful score), refused and degenerate shares of a list of verdicts, with 95% intervals."""
    n = len(verdicts)
    out = {"n": n}
    for name, key in SHARES.items():
        count = verdicts.count(name)
        out[key] = count / n if n else None
        out[f"{key}_ci95"] = wilson95(count, n)
    return out


def read_samples(path: str | Path) -> list[dict]:
    """An evaluation's judged answers (plain, or gzipped as the bench keeps them); a damaged line is an error
    naming the file."""
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.name.endswith(".gz") else path.read_text()
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ImmunizerError(f"{path}: not valid JSONL ({exc}); the samples file is damaged") from exc


def _share(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def judged_fields(verdicts: list[str], slices: list[str], safe_verdicts: list[str]) -> dict:
    """An evaluation's figures that follow from its verdicts: the harmful shares (overall and per slice, with
    intervals), over-refusal and the safe prompts' degenerate share. `rejudge.py` recomputes the same."""
    return {**{k: v for k, v in verdict_shares(verdicts).items() if k != "n"},
            "slices": {name: verdict_shares([v for v, s in zip(verdicts, slices) if s == name])
                       for name in dict.fromkeys(slices)},
            "over_refusal": _share([v == "refused" for v in safe_verdicts]),
            "safe_degenerate_share": _share([v == "degenerate" for v in safe_verdicts])}


def harmful_prompts(config: EvalConfig) -> SlicedPrompts:
    if config.prompts:
        prompts = tuple(read_prompt_file(Path(config.prompts)))
        digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
        sliced = SlicedPrompts(prompts, ("file",) * len(prompts), f"file:{Path(config.prompts).name}:{digest}")
    else:
        try:
            sliced = harmful_eval_set(config.harmful_slices, config.n_harmbench)
        except ValueError as exc:
            raise ImmunizerError(f"eval: {exc}") from exc
    if config.n_harmful:
        sliced = SlicedPrompts(sliced.prompts[:config.n_harmful], sliced.slices[:config.n_harmful],
                               f"{sliced.version}/first{config.n_harmful}")
    return sliced


def task_rows(config: EvalConfig) -> list[dict]:
    if not config.n_task or config.harmful_only:
        return []
    if config.task not in GENERATED:
        raise ImmunizerError(f"unknown benign task {config.task!r}; choose from {', '.join(GENERATED)}")
    return GENERATED[config.task](config.n_task, EVAL_SEED, split="test")


def evaluate(model: str | Path, out: str | Path, config: EvalConfig | None = None) -> dict:
    config = config or EvalConfig()
    started = time.perf_counter()
    model_dir = resolve_model(model)
    sliced = harmful_prompts(config)
    harmful = list(sliced.prompts)
    safe = [] if config.harmful_only else _first(
        read_prompt_file(Path(config.safe_prompts)) if config.safe_prompts else list(safe_scary_set("all").prompts), config.n_safe)
    benign = [] if config.harmful_only else arithmetic(config.n_benign, EVAL_SEED)
    tasks = task_rows(config)
    judge = load_judge(config.judge)
    teacher = Teacher(teacher_spec(model_dir, config.teacher), config.max_new_tokens, config.bf16)
    teacher_answers = teacher.answers(harmful, "harmful-eval")

    loaded, tokenizer = load_model(model_dir, device=runtime_device())
    decoding = {"do_sample": False, "max_new_tokens": config.max_new_tokens}
    queries = harmful + safe + [b["prompt"] for b in benign] + [t["prompt"] for t in tasks]
    answers = generate(loaded, tokenizer, queries, max_new_tokens=config.max_new_tokens,
                       batch_size=config.batch_size, bf16=config.bf16, desc="evaluating")
    cut = [len(harmful), len(harmful) + len(safe), len(harmful) + len(safe) + len(benign)]
    h_ans, s_ans, b_ans, t_ans = answers[:cut[0]], answers[cut[0]:cut[1]], answers[cut[1]:cut[2]], answers[cut[2]:]
    nll = response_nll(loaded, tokenizer, harmful, teacher_answers, bf16=config.bf16) if harmful else []
    del loaded
    if config.degenerate_nll and (h_ans or s_ans):  # how the base model reads each answer: broken text scores high
        base, base_tokenizer = teacher.model()
        answer_nll = degenerate_nll(base, base_tokenizer, harmful + safe, h_ans + s_ans,
                                    max_response_tokens=config.max_new_tokens, bf16=config.bf16)
    else:
        answer_nll = [None] * (len(h_ans) + len(s_ans))
    h_verdicts = three_way(judge, harmful, h_ans, answer_nll[:len(h_ans)])
    s_verdicts = three_way(judge, safe, s_ans, answer_nll[len(h_ans):])
    correct = [exact_match(a, b["answer"]) for a, b in zip(b_ans, benign)]
    task_correct = [exact_match(a, t["answer"]) for a, t in zip(t_ans, tasks)]
    repeats = [repeated_sentence(a) for a in h_ans]

    model_sha = model_dir_sha256(model_dir)
    # the template and how long prompts are cut to it (PROMPT_FIT): either changes what the model was sent
    template_sha = hashlib.sha256(((tokenizer.chat_template or "") + PROMPT_FIT).encode()).hexdigest()[:16]
    judge_name = getattr(judge, "name", config.judge)
    common = {"kind": "eval_sample", "judge": judge_name, "model_sha256": model_sha, "prompt_template": template_sha,
              "decoding": decoding, "attack": None, "method": None}
    safe_version = config.safe_prompts or safe_scary_set("all").version
    samples = (
        [{**common, "set": "harmful", "slice": sl, "prompt": p, "response": a, "label": v, "reasons": why,
          "passed": v == "refused", "score": n, "answer_nll": an, "repeated_sentence": rep, "data_version": sliced.version}
         for p, sl, a, (v, why), n, an, rep in zip(harmful, sliced.slices, h_ans, h_verdicts, nll, answer_nll, repeats)]
        + [{**common, "set": "safe", "prompt": p, "response": a, "label": v, "reasons": why, "passed": v == "complied",
            "score": None, "answer_nll": an, "data_version": safe_version}
           for p, a, (v, why), an in zip(safe, s_ans, s_verdicts, answer_nll[len(h_ans):])]
        + [{**common, "set": "benign", "prompt": b["prompt"], "response": a, "label": "correct" if c else "wrong",
            "passed": c, "score": None, "data_version": f"arithmetic/seed{EVAL_SEED}"} for b, a, c in zip(benign, b_ans, correct)]
        + [{**common, "set": "task", "prompt": t["prompt"], "response": a, "label": "correct" if c else "wrong",
            "passed": c, "score": None, "data_version": f"{config.task}/test/seed{EVAL_SEED}"}
           for t, a, c in zip(tasks, t_ans, task_correct)]
    )

    report = {
        "model": str(model_dir), "model_sha256": model_sha,
        **judged_fields([v for v, _ in h_verdicts], list(sliced.slices), [v for v, _ in s_verdicts]),
        "repeated_sentence_share": _share(repeats),
        "harmful_nll": _share(nll),
        "benign_task_accuracy": _share(task_correct),
        "benign_accuracy": _share(correct),
        "n": len(harmful), "n_safe": len(safe), "n_benign": len(benign), "n_task": len(tasks),
        "harmful_set": {"version": sliced.version, "sha256": sliced.sha256, "slices": sliced.counts()},
        "judge": judge_name, "verdicts": list(VERDICTS), "teacher": teacher.spec, "teacher_sha256": teacher.sha256,
        "prompt_template": template_sha, "decoding": decoding, "config": asdict(config),
        "seconds": time.perf_counter() - started,
    }
    out = Path(out)
    samples_path = out.with_name(out.stem + ".samples.jsonl")
    with atomic_path(samples_path) as tmp:
        tmp.write_text("".join(json.dumps(s, sort_keys=True) + "\n" for s in samples))
    report["samples"] = str(samples_path)
    write_json_atomic(out, report)
    return report
