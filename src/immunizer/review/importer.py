"""Turn JSONL records into review items, strictly: every line is checked before anything is
written, and every problem is reported with its line number.

Recognised by the `kind` field:
- `breaker_incident`: a circuit-breaker incident as written to incidents.jsonl (whole record = payload);
- `eval_sample`: a per-sample evaluation record; only failed samples (`passed: false`) become items;
- anything else (`redteam_finding`, `guard_flag`, `user_report`, …): the generic format
  `{"kind", "severity", "payload": {...}, "provenance": {"source", ...}, "consent"?, "judge_confidence"?, "gold_label"?}`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from immunizer.errors import ImmunizerError
from immunizer.review.models import SEVERITIES

# Project-generated kinds carry no user data; anything else needs explicit consent to feed training.
CONSENT_BY_DEFAULT = {"breaker_incident", "eval_sample", "redteam_finding"}
PROVENANCE_KEYS = {"source", "model_sha256", "data_version", "prompt_template", "decoding"}
GENERIC_KEYS = {"kind", "severity", "payload", "provenance", "consent", "judge_confidence", "gold_label", "time"}
MAX_ERRORS_SHOWN = 20


@dataclass(frozen=True)
class ItemRecord:
    kind: str
    payload: dict
    severity: str
    source: str
    consent: bool
    model_sha256: str | None = None
    data_version: str | None = None
    prompt_template: str | None = None
    decoding: dict | None = None
    judge_confidence: float | None = None
    gold_label: str | None = None


@dataclass
class ParsedFile:
    records: list[ItemRecord] = field(default_factory=list)
    skipped_passed_eval_samples: int = 0


class RecordError(ValueError):
    pass


def _require(record: dict, key: str, types, what: str):
    if key not in record:
        raise RecordError(f"missing field {key!r} ({what})")
    value = record[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise RecordError(f"field {key!r} must be {what} (got {json.dumps(value)[:60]})")
    return value


def _optional(record: dict, key: str, types, what: str):
    if record.get(key) is None:
        return None
    return _require(record, key, types, what)


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _severity(value) -> str:
    if value not in SEVERITIES:
        raise RecordError(f"severity must be one of {', '.join(SEVERITIES)} (got {json.dumps(value)[:40]})")
    return value


def _confidence(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise RecordError(f"judge_confidence must be a number in [0, 1] (got {json.dumps(value)[:40]})")
    return float(value)


def breaker_incident(record: dict) -> ItemRecord:
    for key in ("time", "source", "action", "model_sha256"):
        _require(record, key, str, "a string")
    _require(record, "tripped", bool, "true or false")
    for key in ("statistic", "threshold"):
        _require(record, key, (int, float), "a number")
    # how sure the breaker was: the statistic's distance from the threshold, relative to it;
    # incidents near the threshold are the ones a person should see first
    threshold = record["threshold"]
    confidence = min(1.0, abs(record["statistic"] - threshold) / threshold) if threshold > 0 else None
    return ItemRecord(kind="breaker_incident", payload=record, severity=_severity(record.get("severity")),
                      source=f"breaker:{record['source']}", consent=True, model_sha256=record["model_sha256"],
                      judge_confidence=confidence)


def eval_sample(record: dict) -> ItemRecord | None:
    for key in ("prompt", "response", "judge", "label", "model_sha256"):
        _require(record, key, str, "a string")
    passed = _require(record, "passed", bool, "true or false")
    if passed:
        return None
    score = _optional(record, "score", (int, float), "a number or null")
    return ItemRecord(
        kind="eval_sample", payload=record, severity="medium", source=f"eval:{record['judge']}", consent=True,
        model_sha256=record["model_sha256"], data_version=_optional(record, "data_version", str, "a string"),
        prompt_template=_optional(record, "prompt_template", str, "a string"),
        decoding=_optional(record, "decoding", dict, "an object"),
        judge_confidence=float(score) if score is not None and 0.0 <= score <= 1.0 else None)


def generic(record: dict) -> ItemRecord:
    unknown = set(record) - GENERIC_KEYS
    if unknown:
        raise RecordError(f"unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(GENERIC_KEYS))}")
    kind = record["kind"]
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,49}", kind):
        raise RecordError(f"kind must be lower_snake_case, at most 50 characters (got {kind!r})")
    payload = _require(record, "payload", dict, "an object")
    if not payload:
        raise RecordError("payload is empty: put what the reviewer should see in it")
    provenance = _require(record, "provenance", dict, "an object with at least 'source'")
    unknown = set(provenance) - PROVENANCE_KEYS
    if unknown:
        raise RecordError(f"unknown provenance field(s) {', '.join(sorted(unknown))}; allowed: "
                          f"{', '.join(sorted(PROVENANCE_KEYS))}")
    source = _require(provenance, "source", str, "a non-empty string")
    if not source:
        raise RecordError("provenance.source is empty")
    consent = _optional(record, "consent", bool, "true or false")
    return ItemRecord(
        kind=kind, payload=payload, severity=_severity(record.get("severity")), source=source,
        consent=kind in CONSENT_BY_DEFAULT if consent is None else consent,
        model_sha256=_optional(provenance, "model_sha256", str, "a string"),
        data_version=_optional(provenance, "data_version", str, "a string"),
        prompt_template=_optional(provenance, "prompt_template", str, "a string"),
        decoding=_optional(provenance, "decoding", dict, "an object"),
        judge_confidence=_confidence(record.get("judge_confidence")),
        gold_label=_optional(record, "gold_label", str, "a string"))


PARSERS = {"breaker_incident": breaker_incident, "eval_sample": eval_sample}


def _reject_non_finite(value, where: str = "") -> None:
    """NaN and ±Infinity are not JSON: PostgreSQL refuses them and they compare with nothing."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordError(f"{where or 'a value'} is {value}, which is not valid JSON; write null or a number")
    if isinstance(value, dict):
        for key, inner in value.items():
            _reject_non_finite(inner, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            _reject_non_finite(inner, f"{where}[{i}]")


def parse_record(record) -> ItemRecord | None:
    """One decoded record → an item (None for a passed eval sample); RecordError says what is wrong."""
    if not isinstance(record, dict):
        raise RecordError("expected a JSON object")
    _reject_non_finite(record)
    kind = _require(record, "kind", str, "a string such as breaker_incident, eval_sample, user_report")
    return PARSERS.get(kind, generic)(record)


def _decode(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None


def parse_records(records, name: str = "<records>", decode=lambda record: record, what: str = "record") -> ParsedFile:
    """Parse every record (dicts from Python, e.g. an incident the breaker just wrote); raise
    ImmunizerError listing every bad one by number (nothing is returned then)."""
    parsed, errors = ParsedFile(), []
    for number, raw in enumerate(records, start=1):
        if isinstance(raw, str) and not raw.strip():
            continue
        try:
            item = parse_record(decode(raw))
        except RecordError as exc:
            errors.append(f"{what} {number}: {exc}")
            continue
        if item is None:
            parsed.skipped_passed_eval_samples += 1
        else:
            parsed.records.append(item)
    if errors:
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        more = f"\n  … and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise ImmunizerError(f"{name}: {len(errors)} malformed {what}(s); nothing was imported. Fix them and "
                             f"import again (docs/review.md's 'Import formats' lists the fields):\n  {shown}{more}")
    return parsed


def parse_lines(lines, name: str = "<input>") -> ParsedFile:
    """JSONL lines (blank ones skipped) → items; errors are reported as `line N: …`."""
    return parse_records(lines, name=name, decode=_decode, what="line")


def parse_file(path: str | Path) -> ParsedFile:
    path = Path(path)
    if not path.is_file():
        raise ImmunizerError(f"{path} does not exist; pass a JSONL file of items (one JSON object a line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ImmunizerError(f"{path} is not UTF-8 text (line {line}, byte {exc.start}: {exc.reason}); save it as "
                             "UTF-8 and import it again") from None
    return parse_lines(lines, name=str(path))
