"""Refresh: the selection's examples → the data files the next cycle trains on.

    harmful.jsonl        adversarial prompts (+ the harmful answer seen) for immunize's Phase 1
                         (`data.harmful_file`), topped up with a sample of the built-in curriculum
    benign.jsonl         over-refused prompts (chosen: a helpful answer, rejected: the refusal seen) and
                         the rows of breaker false positives, for Phase 2's alignment and canary
                         stabilization (`data.benign_file`), topped up with built-in benign prompts
    preferences.jsonl    (prompt, chosen, rejected) pairs for the reward model (and DPO)
    sft.jsonl            (prompt, response): a refusal for adversarial prompts, a helpful answer for
                         over-refused ones
    calibration_cases.jsonl   reviewed breaker incidents: benign (false positives) and harmful cases
    refresh.json         what each file holds, its hash and the inputs' hashes

Every row from the review store keeps its provenance; built-in rows name the prompt set they came
from. Missing answers come from the teachers (the release's root base model, unaligned: it complies
with harmful prompts and answers benign ones), cached like immunize's own generations.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from immunizer.data.prompts import benign_set, refusal_responses, strong_set, weak_set
from immunizer.data.training_sets import pick_refusal
from immunizer.json_hash import json_sha256
from immunizer.loop.dedup import normalize
from immunizer.loop.heldout import is_heldout
from immunizer.paths import atomic_path, read_jsonl, write_json_atomic

FILES = {"harmful": "harmful.jsonl", "benign": "benign.jsonl", "preferences": "preferences.jsonl",
         "sft": "sft.jsonl", "calibration_cases": "calibration_cases.jsonl"}
RECORD_FILE = "refresh.json"
BUILTIN_HARMFUL = {"weak": weak_set, "strong": strong_set}


@dataclass
class RefreshPlan:
    builtin_harmful: int = 0
    """Built-in curriculum prompts added to harmful.jsonl (split evenly over `curriculum`), so that new
    prompts join the curriculum instead of replacing it."""
    builtin_benign: int = 0
    """Built-in benign prompts added to benign.jsonl."""
    curriculum: tuple[str, ...] = ("weak", "strong")
    seed: int = 0
    heldout_files: tuple[str, ...] = ()
    """Further evaluation prompt files (select.SelectionConfig.heldout_files) no row may repeat."""


def _screen(rows: list[dict], heldout_files: tuple[str, ...]) -> int:
    """Drop, in place, rows whose prompt is held out or repeats an earlier row's; return how many.
    select.py checks the same, so this drops nothing for its output: it guards other callers."""
    seen, kept = set(), []
    for row in rows:
        key = normalize(row["prompt"])
        if key not in seen and not is_heldout(row["prompt"], heldout_files):
            kept.append(row)
        seen.add(key)
    dropped, rows[:] = len(rows) - len(kept), kept
    return dropped


def sha256_rows(rows: list[dict]) -> str:
    return json_sha256(rows)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """Write rows atomically; return the file's SHA-256."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def _sample(prompts: list[str], n: int, seed: int, exclude: set[str]) -> list[str]:
    pool = [p for p in prompts if p not in exclude]
    return pool if n >= len(pool) else random.Random(seed).sample(pool, n)


def builtin_harmful_rows(n: int, curriculum: tuple[str, ...], seed: int, exclude: set[str]) -> list[dict]:
    rows = []
    for i, name in enumerate(dict.fromkeys(curriculum)):
        share = n // len(curriculum) + (1 if i < n % len(curriculum) else 0)
        pset = BUILTIN_HARMFUL[name]("train")
        rows += [{"prompt": p, "provenance": {"source": f"builtin:{pset.version}"}}
                 for p in _sample(list(pset.prompts), share, seed + i, exclude)]
    return rows


def builtin_benign_rows(n: int, seed: int, exclude: set[str]) -> list[dict]:
    pset = benign_set("train")
    return [{"prompt": p, "provenance": {"source": f"builtin:{pset.version}"}}
            for p in _sample(list(pset.prompts), n, seed, exclude)]


def refresh_data(examples: list[dict], out_dir: str | Path, harmful_teacher, helpful_teacher,
                 plan: RefreshPlan | None = None, inputs: dict | None = None) -> dict:
    """Write the refresh files for `examples` (from select.py) into `out_dir`; return the record.

    `harmful_teacher` / `helpful_teacher` answer prompts that lack an answer (data.teacher.Teacher)."""
    plan = plan or RefreshPlan()
    out_dir = Path(out_dir)
    refusals = refusal_responses()
    adversarial = [e for e in examples if e["role"] == "adversarial"]
    over_refused = [e for e in examples if e["role"] == "over_refusal"]
    breaker = [e for e in examples if e["role"] in ("breaker_false_positive", "breaker_true_positive")]

    missing = [e["prompt"] for e in adversarial if not e.get("response")]
    harmful_answers = dict(zip(missing, harmful_teacher.answers(missing, "harmful"))) if missing else {}
    helpful = [e["prompt"] for e in over_refused]
    helpful_answers = dict(zip(helpful, helpful_teacher.answers(helpful, "helpful"))) if helpful else {}

    def harmful_answer(e):
        return e.get("response") or harmful_answers[e["prompt"]]

    over_refusal_rows = [{"prompt": e["prompt"], "chosen": helpful_answers[e["prompt"]],
                          "rejected": e.get("response") or pick_refusal(e["prompt"], refusals),
                          "provenance": e["provenance"]} for e in over_refused]
    rows: dict[str, list[dict]] = {
        "harmful": [{"prompt": e["prompt"], "response": harmful_answer(e), "provenance": e["provenance"]} for e in adversarial],
        "benign": list(over_refusal_rows), "preferences": [], "sft": [], "calibration_cases": []}
    for e in adversarial:
        refusal = pick_refusal(e["prompt"], refusals)
        rows["preferences"].append({"prompt": e["prompt"], "chosen": refusal, "rejected": harmful_answer(e),
                                    "provenance": e["provenance"]})
        rows["sft"].append({"prompt": e["prompt"], "response": refusal, "provenance": e["provenance"]})
    for row in over_refusal_rows:
        rows["preferences"].append(dict(row))
        rows["sft"].append({"prompt": row["prompt"], "response": row["chosen"], "provenance": row["provenance"]})
    for e in breaker:
        if e["role"] == "breaker_false_positive":  # the blocked fine-tune's rows were benign: learn to keep canaries still on them
            rows["benign"] += [{"prompt": x["prompt"], "chosen": x["response"], "provenance": e["provenance"]}
                               for x in e.get("examples") or []]
        rows["calibration_cases"].append({
            "name": f"incident-{e['provenance']['item_id']}", "harmful": e["role"] == "breaker_true_positive",
            **{k: e["breaker"].get(k) for k in ("statistic", "threshold", "tripped", "candidate", "manifest_sha256")},
            "rows": e.get("examples") or [], "provenance": e["provenance"]})

    dropped = {name: _screen(rows[name], plan.heldout_files) for name in ("harmful", "benign", "preferences", "sft")}
    new = {"harmful": len(rows["harmful"]), "benign": len(rows["benign"])}
    seen = {r["prompt"] for r in rows["harmful"] + rows["benign"]}
    rows["harmful"] += builtin_harmful_rows(plan.builtin_harmful, plan.curriculum, plan.seed, seen)
    rows["benign"] += builtin_benign_rows(plan.builtin_benign, plan.seed, seen)

    record = {"inputs": {"examples_sha256": sha256_rows(examples), **(inputs or {})},
              "plan": {"builtin_harmful": plan.builtin_harmful, "builtin_benign": plan.builtin_benign,
                       "curriculum": list(plan.curriculum), "seed": plan.seed},
              "files": {}, "dropped_held_out_or_repeated": dropped}
    for name, filename in FILES.items():
        file_sha = write_jsonl(out_dir / filename, rows[name])
        record["files"][name] = {
            "file": filename, "sha256": file_sha, "rows": len(rows[name]), "from_review": new.get(name, len(rows[name])),
            "source_item_ids": sorted({r["provenance"]["item_id"] for r in rows[name] if "item_id" in r["provenance"]})}
    write_json_atomic(out_dir / RECORD_FILE, record)
    return record


def training_rows(path: Path, keys: tuple[str, ...]) -> list[dict]:
    """The rows of a refresh file without their provenance (what a trainer sees)."""
    return [{k: r[k] for k in keys} for r in read_jsonl(path)]
