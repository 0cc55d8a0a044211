"""Incident records: one JSON object per line, appended (the review store imports these files as
they are; see docs/breaker.md, "Incident records")."""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

INCIDENTS_ENV = "IMMUNIZER_INCIDENTS"


def default_incidents_path() -> Path:
    """$IMMUNIZER_INCIDENTS, else ~/.local/share/immunizer/incidents.jsonl."""
    env = os.environ.get(INCIDENTS_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME", os.path.expanduser("~/.local/share"))
    return Path(base) / "immunizer" / "incidents.jsonl"


def severity(statistic: float, threshold: float, tripped: bool | None = None, non_finite: int = 0) -> str:
    """How far past the threshold: `high` at twice the threshold or more, or with NaN/inf weights. A trip on
    another bound (frozen or pushed-back canaries) is at least `medium`."""
    if non_finite or statistic >= 2 * threshold:
        return "high"
    return "medium" if statistic >= threshold or tripped else "low"


def record_incident(verdict, *, source: str, action: str, path: Path | None = None, step: int | None = None,
                    extra: dict | None = None) -> dict:
    """Append one incident for `verdict` (a breaker Verdict) and return the record.

    A single O_APPEND write of one line: concurrent writers (several guarded fine-tunes) never
    interleave within a record, and a crash loses at most the record being written."""
    record = {
        "kind": "breaker_incident",
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "action": action,
        "step": step,
        "severity": severity(verdict.statistic, verdict.threshold, verdict.tripped, verdict.report.non_finite),
        **verdict.to_json(),
        **(extra or {}),
    }
    path = Path(path) if path is not None else default_incidents_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return record
