"""Assemble the training data of a run: harmful (prompt, teacher response) pairs per curriculum
set, benign (prompt, chosen, rejected) triples, and refusal targets, with versions and hashes."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from immunizer.config import ImmunizeConfig
from immunizer.data.harmful_answers import answers_without_refusals
from immunizer.data.prompts import PromptSet, benign_set, jsonl_set, refusal_responses, strong_set, weak_set
from immunizer.data.rephrase import with_imperative_forms
from immunizer.data.teacher import cached_generate
from immunizer.errors import ImmunizerError
from immunizer.json_hash import json_sha256


@dataclass
class HarmfulPairs:
    prompts: list[str]
    responses: list[str]


@dataclass
class BenignTriples:
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]


@dataclass
class TrainingData:
    harmful: dict[str, HarmfulPairs]
    benign: BenignTriples
    refusals: list[str]
    versions: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        payload = {
            "harmful": {k: [v.prompts, v.responses] for k, v in sorted(self.harmful.items())},
            "benign": [self.benign.prompts, self.benign.chosen, self.benign.rejected],
            "refusals": self.refusals,
        }
        return json_sha256(payload)


def seeded_subset(items: list, limit: int, seed: int) -> list:
    """`limit` of `items` (all for 0), chosen by `seed`, in their original order: which prompts a run trains on
    (bench/loop_quick.py asks which ones a run did not use)."""
    if not limit or limit >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def pick_refusal(prompt: str, refusals: list[str]) -> str:
    return refusals[int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % len(refusals)]


def build_training_data(config: ImmunizeConfig, tokenizer, harmful_teacher, helpful_teacher,
                        harmful_sha256: str, helpful_sha256: str) -> TrainingData:
    dc = config.data
    gen = dict(max_new_tokens=dc.teacher_max_new_tokens, batch_size=dc.teacher_batch_size,
               max_prompt_tokens=dc.max_prompt_tokens, bf16=config.bf16)
    versions: dict = {}
    harmful: dict[str, HarmfulPairs] = {}
    refusal_counts: dict[str, dict] = {}

    def teacher_answers(prompts: list[str], kind: str) -> dict[str, str]:
        def answer(batch, sample_seed=None):
            sampling = {} if sample_seed is None else {"sample_seed": sample_seed}
            return cached_generate(harmful_teacher, tokenizer, batch, harmful_sha256, kind, **gen, **sampling)

        if dc.keep_teacher_refusals or not prompts:
            return dict(zip(prompts, answer(prompts))) if prompts else {}
        kept, refusal_counts[kind] = answers_without_refusals(prompts, answer)
        return kept

    if dc.harmful_file:
        pset, rows = jsonl_set("harmful_file", dc.harmful_file)
        rows = seeded_subset(rows, dc.max_harmful_prompts, config.seed)
        generated = teacher_answers([r["prompt"] for r in rows if not r.get("response")], "harmful")
        rows = [r for r in rows if r.get("response") or r["prompt"] in generated]  # your own responses as given
        harmful["file"] = HarmfulPairs([r["prompt"] for r in rows], [r.get("response") or generated[r["prompt"]] for r in rows])
        versions["harmful_file"] = {"version": pset.version, "sha256": pset.sha256}
    else:
        for name in dict.fromkeys(dc.curriculum):
            pset: PromptSet = {"weak": weak_set, "strong": strong_set}[name]("train")
            pool = with_imperative_forms(list(pset.prompts)) if dc.imperative_rephrasings else list(pset.prompts)
            prompts = seeded_subset(pool, dc.max_harmful_prompts, config.seed)
            answered = teacher_answers(prompts, f"harmful-{name}")
            harmful[name] = HarmfulPairs([p for p in prompts if p in answered], [answered[p] for p in prompts if p in answered])
            versions[name] = {"version": pset.version, "sha256": pset.sha256, "used": len(harmful[name].prompts)}
            if dc.imperative_rephrasings:
                versions[name]["imperative_rephrasings"] = {"added": len(pool) - len(pset.prompts),
                                                            "used": sum(p not in pset.prompts for p in harmful[name].prompts)}
    if refusal_counts:
        versions["harmful_refusals"] = refusal_counts

    refusals = refusal_responses()
    if dc.benign_file:
        pset, rows = jsonl_set("benign_file", dc.benign_file)
        rows = seeded_subset(rows, dc.max_benign_prompts, config.seed)
        versions["benign_file"] = {"version": pset.version, "sha256": pset.sha256}
    else:
        pset = benign_set("train")
        rows = [{"prompt": p} for p in seeded_subset(list(pset.prompts), dc.max_benign_prompts, config.seed)]
        versions["benign"] = {"version": pset.version, "sha256": pset.sha256, "used": len(rows)}
    missing = [r["prompt"] for r in rows if not r.get("chosen")]
    generated = dict(zip(missing, cached_generate(helpful_teacher, tokenizer, missing, helpful_sha256, "helpful", **gen))) if missing else {}
    benign = BenignTriples(
        [r["prompt"] for r in rows],
        [r.get("chosen") or generated[r["prompt"]] for r in rows],
        # A refusal of a benign prompt is the rejected answer: DPO then also trains against over-refusal.
        [r.get("rejected") or pick_refusal(r["prompt"], refusals) for r in rows],
    )
    for name, pairs in harmful.items():
        if not pairs.prompts:
            raise ImmunizerError(f"the harmful set {name!r} is empty; check data.harmful_file / data.curriculum")
    if not benign.prompts:
        raise ImmunizerError("the benign set is empty; check data.benign_file")
    versions["refusals"] = {"sha256": hashlib.sha256("\n".join(refusals).encode()).hexdigest()}
    return TrainingData(harmful, benign, refusals, versions)
