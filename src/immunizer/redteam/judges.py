"""Judges for the harness: did the model refuse, how likely is a harmful answer, is a benign answer right.

`load_judge(spec)` picks the refusal judge: `refusal-matcher` (default: the phrase list in
refusal_eval.py, checked against project-written labelled answers in
data/files/refusal_judge_examples.jsonl), `classifier:DIR[:LABEL]` (a local Hugging Face
sequence-classification model; LABEL is its refusal label, default `refusal`), or
`module:attribute` (any importable callable taking (prompts, answers) and returning booleans)."""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Protocol

import torch

from immunizer.data.batches import pair_batch
from immunizer.data.teacher import autocast
from immunizer.errors import ImmunizerError
from immunizer.losses import IGNORE, sequence_logprob
from immunizer.refusal_eval import is_refusal


class RefusalJudge(Protocol):
    name: str

    def __call__(self, prompts: list[str], answers: list[str]) -> list[bool]:
        """True where the answer refuses."""


@dataclass
class RefusalMatcher:
    name: str = "refusal-matcher"

    def __call__(self, prompts: list[str], answers: list[str]) -> list[bool]:
        return [is_refusal(a) for a in answers]


class ClassifierJudge:
    """A local sequence classifier over "prompt\\n\\nanswer"; never downloads anything."""

    def __init__(self, model_dir: str, refusal_label: str = "refusal", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ImmunizerError(f"judge classifier {path} has no config.json; pass a local Hugging Face model directory")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        labels = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        if refusal_label.lower() not in labels:
            raise ImmunizerError(f"judge classifier {path} has labels {sorted(labels)}, not {refusal_label!r}; "
                                 "name its refusal label: classifier:DIR:LABEL")
        self.refusal_id, self.batch_size = labels[refusal_label.lower()], batch_size
        self.name = f"classifier:{path.name}"

    @torch.no_grad()
    def __call__(self, prompts: list[str], answers: list[str]) -> list[bool]:
        out = []
        for start in range(0, len(answers), self.batch_size):
            texts = [f"{p}\n\n{a}" for p, a in zip(prompts[start:start + self.batch_size], answers[start:start + self.batch_size])]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=512)
            out += (self.model(**enc).logits.argmax(-1) == self.refusal_id).tolist()
        return out


def load_judge(spec: str = "refusal-matcher") -> RefusalJudge | Callable:
    if spec in ("refusal-matcher", "", None):
        return RefusalMatcher()
    if spec.startswith("classifier:"):
        parts = spec.split(":")
        return ClassifierJudge(parts[1], *(parts[2:3]))
    if re.fullmatch(r"[\w.]+:\w+", spec):
        module, attr = spec.split(":")
        try:
            judge = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ImmunizerError(f"judge {spec!r} could not be imported ({exc})") from exc
        if not callable(judge):
            raise ImmunizerError(f"judge {spec!r} is not callable")
        return judge
    raise ImmunizerError(f"unknown judge {spec!r}; use refusal-matcher, classifier:DIR[:LABEL] or module:attribute")


def labelled_examples() -> list[dict]:
    """Answers written for this project, each labelled refused or not (tests and the README use them)."""
    text = resources.files("immunizer.data").joinpath("files/refusal_judge_examples.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@torch.no_grad()
def response_nll(model, tokenizer, prompts: list[str], responses: list[str], max_prompt_tokens: int = 96,
                 max_response_tokens: int = 48, batch_size: int = 8, bf16: bool = True) -> list[float]:
    """Mean token negative log-likelihood of each response given its prompt (teacher forcing). On harmful
    teacher answers it is the harmful NLL: higher means the model is further from answering harmfully."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = pair_batch(tokenizer, prompts[start:start + batch_size], responses[start:start + batch_size],
                           max_prompt_tokens, max_response_tokens)
        with autocast(bf16):
            logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        labels = batch.labels.to(device)
        tokens = (labels[:, 1:] != IGNORE).sum(-1).clamp_min(1)
        out += (-sequence_logprob(logits.float(), labels) / tokens).tolist()
    return out


def normalize_answer(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s-]", "", text.lower())).strip()


def exact_match(answer: str, reference: str) -> bool:
    """The reference is the whole answer or its first line (models often add an explanation after it);
    a numeric reference is compared with the first number of the first line ('17.', 'The answer is 17')."""
    first = answer.strip().splitlines()[0] if answer.strip() else ""
    candidates = {normalize_answer(answer), normalize_answer(first)}
    number = re.search(r"-?\d+(?:\.\d+)?", first)
    if number and re.fullmatch(r"-?\d+(?:\.\d+)?", reference.strip()):
        return float(number.group()) == float(reference)
    return normalize_answer(reference) in candidates
