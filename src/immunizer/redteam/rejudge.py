"""`immunizer rejudge`: judge recorded answers again, without generating anything.

An evaluation keeps every answer it judged (its `*.samples.jsonl`, gzipped in a bench) with the answer's NLL
under the base model, which is all the three-way verdict reads. When the judge changes (the refusal matcher's
v2 catches phrasings that v1 scored as compliance), re-judging the recorded answers gives the figures the new
judge would have given, exactly: the answers are the model's, only the verdicts are new. Each evaluation's
verdict-derived figures (evaluate.judged_fields) and its samples are rewritten atomically; everything the
judge does not read (harmful NLL, task accuracy, the model's hash) is kept. A bench's reports are then
rebuilt from the rewritten files with `immunizer bench --out DIR --time-limit 0`."""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from immunizer.errors import ImmunizerError
from immunizer.paths import atomic_path, write_json_atomic
from immunizer.redteam.evaluate import judged_fields, read_samples
from immunizer.redteam.judges import load_judge, three_way

JUDGED_SETS = ("harmful", "safe")


@dataclass
class Rejudged:
    path: Path
    before: float | None
    """Complied share before re-judging."""
    after: float | None
    changed: int
    """Answers whose verdict changed."""
    judge_before: str | None
    judge: str


def samples_file(report_path: Path, report: dict) -> Path:
    """The evaluation's samples: beside it by the recorded name (as the bench finds them: a copied or moved
    evaluation must not reach back to the files it was copied from), else at the recorded path."""
    recorded = report.get("samples")
    if not recorded:
        raise ImmunizerError(f"{report_path}: this evaluation kept no samples, so its answers cannot be judged again; "
                             "evaluate the model again instead")
    candidates = [report_path.with_name(Path(recorded).name), Path(recorded)]
    candidates += [c.with_name(c.name + ".gz") for c in candidates if not c.name.endswith(".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ImmunizerError(f"{report_path}: its samples {recorded} are missing (looked beside it too); they hold the "
                         "answers to judge, so restore them or evaluate the model again")


def _write(path: Path, rows: list[dict]) -> None:
    data = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)


def rejudge_evaluation(report_path: str | Path, judge_spec: str = "refusal-matcher") -> Rejudged:
    """Judge one evaluation's recorded answers again with `judge_spec` and rewrite it and its samples."""
    report_path = Path(report_path)
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ImmunizerError(f"{report_path}: cannot read the evaluation ({exc})") from exc
    if not isinstance(report, dict) or "harmful_score" not in report:
        raise ImmunizerError(f"{report_path} is not an evaluation written by `immunizer eval` or a bench")
    path = samples_file(report_path, report)
    rows = read_samples(path)
    judge = load_judge(judge_spec)
    name = getattr(judge, "name", judge_spec)
    verdicts: dict[str, list[str]] = {}
    slices: list[str] = []
    changed = 0
    for which in JUDGED_SETS:
        picked = [row for row in rows if row.get("set") == which]
        missing = [row for row in picked if "response" not in row or "prompt" not in row]
        if missing:
            raise ImmunizerError(f"{path}: {len(missing)} {which} sample(s) without a prompt or response; cannot judge them")
        judged = three_way(judge, [r["prompt"] for r in picked], [r["response"] for r in picked],
                           [r.get("answer_nll") for r in picked])
        for row, (verdict, reasons) in zip(picked, judged):
            changed += row.get("label") != verdict
            row.update(label=verdict, reasons=reasons, judge=name,
                       passed=verdict == ("refused" if which == "harmful" else "complied"))
        verdicts[which] = [v for v, _ in judged]
        if which == "harmful":
            slices = [r.get("slice") for r in picked]
    for row in rows:  # every line names its evaluation's judge (task answers are scored by exact match, unchanged)
        row["judge"] = name
    before = report.get("harmful_score")
    judge_before = report.get("judge")
    report.update(judged_fields(verdicts["harmful"], slices, verdicts["safe"]), judge=name)
    _write(path, rows)
    write_json_atomic(report_path, report)
    return Rejudged(report_path, before, report.get("harmful_score"), changed, judge_before, name)


SAMPLES_SUFFIXES = (".samples.jsonl", ".samples.jsonl.gz")


def evaluations_under(root: str | Path) -> list[Path]:
    """Every evaluation in a file or directory tree: the `NAME.json` beside each `NAME.samples.jsonl[.gz]`, as
    `immunizer eval` and the bench write them (found from the samples, so a tree of models is not read)."""
    root = Path(root)
    if not root.exists():
        raise ImmunizerError(f"{root} does not exist; pass an evaluation JSON or a directory holding some (a bench's --out)")
    if root.is_file():
        return [root]
    found = sorted({samples.with_name(samples.name[:samples.name.index(".samples.jsonl")] + ".json")
                    for suffix in SAMPLES_SUFFIXES for samples in root.rglob("*" + suffix)})
    found = [path for path in found if path.is_file()]
    if not found:
        raise ImmunizerError(f"{root}: no evaluation with recorded samples found (looked for NAME.json beside "
                             "NAME.samples.jsonl[.gz], as `immunizer eval` and the bench write them)")
    return found
