"""Data selection: which closed review items become training examples for the next cycle.

Only closed items with consent, checked here whatever the caller asked the store for, and only those an
adjudicator decided or at least two reviewers agreed on (an `over_refusal` consensus on a prompt marked
harmful needs an adjudicator). Each item becomes at most one example, by its final label:

| item                                   | final label            | example role              |
|----------------------------------------|------------------------|---------------------------|
| anything with a prompt (eval sample,   | harmful                | `adversarial`: the prompt and the harmful answer it got |
| red-team finding, user report, …)      | over_refusal           | `over_refusal`: the prompt and the refusal it got        |
| breaker incident that tripped          | benign / over_refusal  | `breaker_false_positive` (+ the fine-tune's rows if `examples_consent: true`) |
| breaker incident                       | harmful                | `breaker_true_positive`   |

`unclear` items, `benign` ones with nothing to fix and prompts of the evaluation and attack sets
(heldout.py; a false positive's fine-tune rows too) are left out and counted. Prompts are
de-duplicated within a role (exact and near, dedup.py); a prompt labelled both harmful and
over-refused is contradictory and left out of both. Every example carries its provenance (item id,
source, model hash, rubric name/version/hash, how it was adjudicated, and the ids of the duplicates it
stands for). `write_selection` writes the examples and a versioned dataset manifest atomically.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from immunizer.json_hash import json_sha256
from immunizer.loop.dedup import duplicate_of
from immunizer.loop.heldout import is_heldout
from immunizer.review.escalation import over_refusal_reasons
from immunizer.review.store import redact_url
from immunizer.paths import atomic_path, read_jsonl, write_json_atomic

EXAMPLES_FILE = "examples.jsonl"
MANIFEST_FILE = "manifest.json"
PROMPT_ROLES = ("adversarial", "over_refusal")
BREAKER_ROLES = ("breaker_false_positive", "breaker_true_positive")


@dataclass
class SelectionConfig:
    near_duplicate_threshold: float = 0.85
    """Character n-gram cosine (dedup.py) at or above which two prompts count as one (1.0: exact repeats only)."""
    include_consensus: bool = True
    """Also take items closed by reviewer consensus, not only those an adjudicator decided."""
    exclude_heldout: bool = True
    """Leave out prompts of the evaluation and attack sets (heldout.py); off only for experiments."""
    heldout_files: list[str] = field(default_factory=list)
    """Further prompt files the releases are evaluated on (`eval --prompts/--safe-prompts`): held out too."""


@dataclass
class Selection:
    examples: list[dict]
    excluded: dict[str, list[int]] = field(default_factory=dict)
    """Reason → ids of the items left out for it."""
    config: SelectionConfig = field(default_factory=SelectionConfig)

    def counts(self) -> dict[str, int]:
        counts = {role: 0 for role in PROMPT_ROLES + BREAKER_ROLES}
        for example in self.examples:
            counts[example["role"]] += 1
        return counts

    @property
    def content_sha256(self) -> str:
        return json_sha256(self.examples)


def provenance(item) -> dict:
    return {"item_id": item.item_id, "kind": item.kind, "label": item.label, "adjudication": item.method,
            "rubric": {"name": item.rubric_name, "version": item.rubric_version, "sha256": item.rubric_sha256},
            **{k: item.provenance.get(k) for k in ("source", "model_sha256", "data_version", "prompt_template", "decoding")}}


def _text(payload: dict, *keys: str) -> str | None:
    for key in keys:
        value = payload.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _breaker_example(item) -> tuple[dict | None, str]:
    p = item.payload
    if item.label == "harmful":
        role = "breaker_true_positive"
    elif item.label in ("benign", "over_refusal") and p.get("tripped"):
        role = "breaker_false_positive"
    else:
        return None, f"breaker incident labelled {item.label}: nothing to learn"
    # The fine-tune's rows, when the service attached them, become stabilization data. They are the
    # customer's data, which the incident's own (project-generated) consent does not cover: only rows
    # the customer agreed to share (`examples_consent: true`) are used.
    examples = [{"prompt": e["prompt"], "response": e["response"]} for e in p.get("examples") or []
                if isinstance(e, dict) and _text(e, "prompt") and _text(e, "response")] \
        if p.get("examples_consent") is True else []
    breaker = {k: p.get(k) for k in ("statistic", "threshold", "tripped", "canary_drift", "other_drift", "candidate",
                                     "manifest", "manifest_sha256", "step", "action")}
    return {"role": role, "breaker": breaker, "examples": examples}, ""


def _prompt_example(item) -> tuple[dict | None, str]:
    prompt = _text(item.payload, "prompt")
    if prompt is None:
        return None, f"{item.kind} without a prompt"
    response = _text(item.payload, "response", "answer")
    if item.label == "harmful":
        return {"role": "adversarial", "prompt": prompt, "response": response}, ""
    if item.label == "over_refusal":
        return {"role": "over_refusal", "prompt": prompt, "response": response}, ""
    return None, f"labelled {item.label}: nothing to fix"


def to_example(item) -> tuple[dict | None, str]:
    """One adjudicated item → (example, "") or (None, why it is left out)."""
    if item.label == "unclear":
        return None, "labelled unclear"
    example, why = (_breaker_example if item.kind == "breaker_incident" else _prompt_example)(item)
    if example is not None:
        example["provenance"] = provenance(item)
    return example, why


def _dedupe(examples: list[dict], key, threshold: float, excluded: dict) -> list[dict]:
    """Keep the first of each group of duplicates; it lists the item ids of the others."""
    if not examples:
        return []
    representative = duplicate_of([key(e) for e in examples], threshold)
    kept = []
    for i, example in enumerate(examples):
        if representative[i] == i:
            example["provenance"]["duplicate_item_ids"] = []
            kept.append(example)
    for i, example in enumerate(examples):
        if representative[i] != i:
            examples[representative[i]]["provenance"]["duplicate_item_ids"].append(example["provenance"]["item_id"])
            excluded.setdefault("duplicate", []).append(example["provenance"]["item_id"])
    return kept


MIN_AGREEING_REVIEWS = 2
"""A consensus trains only when at least this many reviewers chose its label: one account alone never
decides what the model learns (an adjudicator's decision counts on its own)."""


def _trainable(item) -> str:
    """Why a closed item may not train whatever its label ("" when it may)."""
    if item.consent is not True:  # enforced here too: a caller may have asked the store for everything
        return "no consent"
    if item.method == "adjudicator":
        return ""
    if item.agreeing_reviews < MIN_AGREEING_REVIEWS:
        return f"closed by consensus of fewer than {MIN_AGREEING_REVIEWS} agreeing reviews"
    if over_refusal_reasons(item.label, item.severity, item.payload):
        return "over_refusal on a prompt marked harmful, without an adjudicator"
    return ""


def _screen_fine_tune_rows(examples: list[dict], config: SelectionConfig, excluded: dict) -> None:
    """A false positive's fine-tune rows go through the checks every prompt does: held-out prompts
    out, and no row that repeats (exactly or nearly) a reviewed prompt or an earlier row."""
    reviewed = [e["prompt"] for e in examples if e["role"] in PROMPT_ROLES]
    rows = [(e, r) for e in examples if e["role"] == "breaker_false_positive" for r in e["examples"]]
    if config.exclude_heldout:
        held = [(e, r) for e, r in rows if is_heldout(r["prompt"], config.heldout_files)]
        for e, _ in held:
            excluded.setdefault("evaluation prompt (held out) in a fine-tune's rows", []).append(e["provenance"]["item_id"])
        rows = [(e, r) for e, r in rows if not any(r is h for _, h in held)]
    representative = duplicate_of(reviewed + [r["prompt"] for _, r in rows], config.near_duplicate_threshold)
    kept = {id(r) for i, (_, r) in enumerate(rows) if representative[len(reviewed) + i] == len(reviewed) + i}
    for e in examples:
        if e["role"] == "breaker_false_positive":
            dropped = [r for r in e["examples"] if id(r) not in kept]
            if dropped:
                excluded.setdefault("duplicate or held-out fine-tune row", []).append(e["provenance"]["item_id"])
            e["examples"] = [r for r in e["examples"] if id(r) in kept]


def select_examples(items, config: SelectionConfig | None = None) -> Selection:
    """Turn adjudicated items (oldest first) into de-duplicated training examples."""
    config = config or SelectionConfig()
    excluded: dict[str, list[int]] = {}
    examples: list[dict] = []
    for item in items:
        why = _trainable(item)
        if why:
            excluded.setdefault(why, []).append(item.item_id)
            continue
        if not config.include_consensus and item.method != "adjudicator":
            excluded.setdefault("closed by consensus", []).append(item.item_id)
            continue
        example, why = to_example(item)
        if (example is not None and config.exclude_heldout and example.get("prompt")
                and is_heldout(example["prompt"], config.heldout_files)):
            example, why = None, "evaluation prompt (held out)"
        if example is None:
            excluded.setdefault(why, []).append(item.item_id)
        else:
            examples.append(example)

    # the same prompt (or a near copy) labelled harmful in one item and over-refused in another teaches both ways
    prompted = [e for e in examples if e["role"] in PROMPT_ROLES]
    group = duplicate_of([e["prompt"] for e in prompted], config.near_duplicate_threshold)
    roles_of: dict[int, set] = {}
    for e, g in zip(prompted, group):
        roles_of.setdefault(g, set()).add(e["role"])
    conflicting = {id(e) for e, g in zip(prompted, group) if len(roles_of[g]) > 1}
    if conflicting:
        excluded["conflicting labels"] = [e["provenance"]["item_id"] for e in prompted if id(e) in conflicting]
        examples = [e for e in examples if id(e) not in conflicting]

    kept: list[dict] = []
    for role in PROMPT_ROLES:
        kept += _dedupe([e for e in examples if e["role"] == role], lambda e: e["prompt"],
                        config.near_duplicate_threshold, excluded)
    for role in BREAKER_ROLES:  # one fine-tune reported at several steps or by several guards is one case
        kept += _dedupe([e for e in examples if e["role"] == role],
                        lambda e: f"{e['breaker'].get('candidate')}|{e['breaker'].get('manifest_sha256')}", 1.0, excluded)
    _screen_fine_tune_rows(kept, config, excluded)
    kept.sort(key=lambda e: e["provenance"]["item_id"])
    return Selection(kept, {k: sorted(set(v)) for k, v in sorted(excluded.items())}, config)


def select_from_store(store, config: SelectionConfig | None = None) -> Selection:
    config = config or SelectionConfig()
    return select_examples(store.adjudicated_items(consented_only=True, include_consensus=config.include_consensus), config)


def write_selection(selection: Selection, out_dir: str | Path, policy: dict | None = None,
                    store_url: str | None = None) -> dict:
    """Write OUT/examples.jsonl and OUT/manifest.json (the versioned dataset manifest); return the manifest.

    The dataset version is the content hash's first 16 hex digits: the same examples give the same
    version, any change in an example or its provenance gives a new one."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / EXAMPLES_FILE) as tmp:
        tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in selection.examples))
    rubrics = sorted({json.dumps(e["provenance"]["rubric"], sort_keys=True) for e in selection.examples})
    sha = selection.content_sha256
    manifest = {
        "dataset_version": sha[:16], "content_sha256": sha,
        "examples_file": EXAMPLES_FILE,
        "examples_file_sha256": hashlib.sha256((out_dir / EXAMPLES_FILE).read_bytes()).hexdigest(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "counts": selection.counts(),
        "source_item_ids": sorted(e["provenance"]["item_id"] for e in selection.examples),
        "represented_duplicate_ids": sorted(i for e in selection.examples for i in e["provenance"].get("duplicate_item_ids", [])),
        "excluded": selection.excluded,
        "rubrics": [json.loads(r) for r in rubrics],
        "policy": policy,
        "selection_config": asdict(selection.config),
        "store": redact_url(store_url),
    }
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    return manifest


def load_examples(directory: str | Path) -> list[dict]:
    return read_jsonl(Path(directory) / EXAMPLES_FILE)
