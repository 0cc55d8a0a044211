"""The release gate: a policy's checks over a bench `report.json` (and the last release's report, for
regressions) → a verdict that says PASS or FAIL, why, and exactly what was judged.

Three outcomes, kept apart on purpose:
- a check that is evaluated and holds → passed; one that does not, or whose value is null (a metric
  that was not measured) → failed, and the verdict is FAIL;
- a baseline check without a baseline report (the first release) → skipped, `passed: null`,
  unless the policy says `baseline: required`; a slice the last release's report did not have yet is skipped too;
  a verdict whose checks were all skipped is a FAIL (nothing was judged);
- a `*.metric` check also covers the slices the last release measured and the attacks the report lists: one
  the candidate lacks is a failed check (dropping an attack must not hide its regression);
- a report or baseline with `complete: false` (an unfinished bench) cannot be judged (GateInputError);
- anything that makes the question itself wrong — a missing method or slice, an unknown metric, a
  malformed file, reports measured with different judges — raises GateInputError (the CLI exits 2).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from immunizer.errors import ImmunizerError
from immunizer.json_hash import json_sha256
from immunizer.loop.policy import Check, Policy, RelativeBound

SCHEMA_VERSIONS = (1, 2)
"""Bench report schemas the gate reads (2 adds verdict shares and attack curves; a baseline must share the report's)."""
# Two reports are comparable only if they were measured the same way.
COMPARABLE_FIELDS = ("schema_version", "preset", "judge", "prompt_template", "decoding")
TOLERANCE = 1e-9  # float noise must not flip a check that sits exactly on its threshold


class GateInputError(ImmunizerError):
    """The report, baseline or policy cannot be judged as given (the gate exits 2)."""


class _Missing(Exception):
    def __init__(self, depth: int, key: str, available: list[str]):
        self.depth, self.key, self.available = depth, key, available


def load_report(path: str | Path, what: str = "report") -> dict:
    path = Path(path)
    if not path.is_file():
        raise GateInputError(f"{what} {path} does not exist; pass the report.json written by `immunizer bench`")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GateInputError(f"{what} {path} is not valid JSON ({exc}); re-run `immunizer bench` to rewrite it") from None
    check_report(report, f"{what} {path}")
    return report


def check_report(report, what: str = "report") -> None:
    if not isinstance(report, dict) or not isinstance(report.get("methods"), dict) or not report["methods"]:
        raise GateInputError(f"{what} has no `methods` object; is it a report.json from `immunizer bench`?")
    version = report.get("schema_version", 1)
    if version not in SCHEMA_VERSIONS:
        raise GateInputError(f"{what} has schema_version {version!r}; this gate reads versions "
                             f"{', '.join(map(str, SCHEMA_VERSIONS))}: upgrade immunizer or re-run the bench")
    bad = [name for name, data in report["methods"].items() if not isinstance(data, dict)]
    if bad:
        raise GateInputError(f"{what}: methods.{bad[0]} is not an object")


def report_sha256(report: dict) -> str:
    return json_sha256(report)


def lookup(node: dict, path: str):
    """The value at a dotted path. Keys may themselves hold dots (an attack named `lr1.5e-4`): the
    longest key that matches a prefix wins. Raises _Missing at the first part that is not there."""
    parts, depth = path.split("."), 0
    while parts:
        if not isinstance(node, dict):
            raise _Missing(depth, ".".join(parts), [])
        for cut in range(len(parts), 0, -1):
            key = ".".join(parts[:cut])
            if key in node:
                node, parts, depth = node[key], parts[cut:], depth + 1
                break
        else:
            raise _Missing(depth, parts[0], sorted(node))
    return node


def expand(method_data: dict, metric: str) -> list[str]:
    """`*.harmful_score` → one path per slice of the method that has the metric; others as they are."""
    if not metric.startswith("*."):
        return [metric]
    rest = metric[2:]
    paths = []
    for key, value in method_data.items():
        if isinstance(value, dict):
            try:
                lookup(value, rest)
                paths.append(f"{key}.{rest}")
            except _Missing:
                pass
    return paths


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Gate:
    """Evaluates one policy against one report (and optionally the last release's report)."""

    def __init__(self, report: dict, policy: Policy, baseline: dict | None = None):
        check_report(report)
        if baseline is not None:
            check_report(baseline, "baseline report")
        for what, data in (("report", report), ("baseline report", baseline)):
            if data is not None and data.get("complete") is False:
                raise GateInputError(f"the {what} is incomplete (complete: false): the bench did not finish every "
                                     "method and seed; run the same `immunizer bench` command again to finish it")
        self.report, self.policy, self.baseline = report, policy, baseline
        self.method = policy.method
        if self.method not in report["methods"]:
            raise GateInputError(f"the report has no method {self.method!r} (it has {', '.join(report['methods'])}); "
                                 f"run `immunizer bench --methods {self.method},...` or set `method:` in the policy")
        self.data = report["methods"][self.method]
        if baseline is not None:
            self._check_comparable()
            if self.method not in baseline["methods"]:
                raise GateInputError(f"the baseline report has no method {self.method!r}; pass the report of the last "
                                     f"release of {self.method}")
        elif policy.baseline == "required" and any(c.needs_baseline for c in policy.checks):
            raise GateInputError(f"policy {policy.name} v{policy.policy_version} requires a baseline: pass "
                                 "--baseline with the last release's report.json")

    def _check_comparable(self) -> None:
        for key in (*COMPARABLE_FIELDS, "eval settings"):
            if key == "eval settings":  # sample counts and lengths: bench's config.eval
                mine, theirs = ((r.get("config") or {}).get("eval") for r in (self.report, self.baseline))
            else:
                mine, theirs = self.report.get(key), self.baseline.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                raise GateInputError(
                    f"the report and the baseline were measured differently ({key}: {json.dumps(theirs)} in the "
                    f"baseline, {json.dumps(mine)} now), so their deltas mean nothing; re-run `immunizer bench` on "
                    f"the last release with the same {key}"
                    + (" (or, for a new judge, `immunizer rejudge` its bench directory and rebuild its report with "
                       "`immunizer bench --out DIR --time-limit 0`)" if key == "judge" else ""))

    # -- values
    def _dropped_slices(self, metric: str, paths: list[str]) -> list[tuple[str, str]]:
        """Slices a wildcard should have reached but the candidate lacks: measured in the last release,
        or listed among the report's own attacks. Without this, dropping an attack hides its regression."""
        if not metric.startswith("*."):
            return []
        expected = {}
        if self.baseline is not None:
            expected |= {p: "measured in the last release but missing from this report: dropping an attack hides its "
                            "regression; run the bench with the last release's attacks"
                         for p in expand(self.baseline["methods"][self.method], metric)}
        expected |= {f"{name}.{metric[2:]}": f"the report lists attack {name!r} but {self.method} has no result for "
                                             "it; run the bench again to finish it"
                     for name in self.report.get("attacks") or {} if name not in self.data}
        return [(path, why) for path, why in expected.items() if path not in paths]

    def _value(self, method_data: dict, path: str, where: str, index: int):
        try:
            value = lookup(method_data, path)
        except _Missing as missing:
            head = path.split(".")[0]
            if missing.depth == 0:
                raise GateInputError(
                    f"policy check {index} ({path}): {where} has no slice {missing.key!r} (it has: "
                    f"{', '.join(missing.available)}); run `immunizer bench` with that attack, or fix the metric "
                    "path in the policy") from None
            raise GateInputError(
                f"policy check {index}: unknown metric {missing.key!r} in {where}.{head} (known there: "
                f"{', '.join(missing.available) or 'none'}); fix the metric path in the policy") from None
        if isinstance(value, dict):
            raise GateInputError(f"policy check {index}: {where}.{path} is a slice, not a metric (its metrics: "
                                 f"{', '.join(sorted(value))}); name one of them")
        return value

    def _other_method(self, name: str, index: int) -> tuple[dict, str]:
        if name in self.report["methods"]:
            return self.report["methods"][name], "report"
        # Baselines such as sft are trained from the base model, not from the candidate: a cycle that
        # only re-runs immunizer compares with the last full bench (same preset, judge and decoding).
        if self.baseline is not None and name in self.baseline["methods"]:
            return self.baseline["methods"][name], "baseline report"
        known = ", ".join(self.report["methods"])
        raise GateInputError(f"policy check {index} compares with method {name!r}, which neither the report ({known}) "
                             f"{'nor the baseline ' if self.baseline is not None else ''}has; run `immunizer bench "
                             f"--methods {self.method},{name}` or change the policy")

    @staticmethod
    def _numeric(value, what: str, index: int) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise GateInputError(f"policy check {index}: {what} is {json.dumps(value)}, not a number; the check "
                                 "needs a numeric metric")
        return float(value)

    # -- checks
    def evaluate(self) -> list[dict]:
        results = []
        for index, check in enumerate(self.policy.checks):
            paths = expand(self.data, check.metric)
            if not paths:
                raise GateInputError(f"policy check {index}: unknown metric {check.metric[2:]!r}: no slice of "
                                     f"{self.method} has it; fix the metric path in the policy")
            for path in paths:
                results += self._evaluate(check, path, index, several=len(paths) > 1)
            results += [result(f"{check.name or check.metric} [{path}]", path, None, None, False, why)
                        for path, why in self._dropped_slices(check.metric, paths)]
        seen: dict[str, int] = {}
        for entry in results:  # names are keys for people and tools: keep them unique
            seen[entry["name"]] = seen.get(entry["name"], 0) + 1
            if seen[entry["name"]] > 1:
                entry["name"] += f" #{seen[entry['name']]}"
        return results

    def _evaluate(self, check: Check, path: str, index: int, several: bool) -> list[dict]:
        raw = self._value(self.data, path, self.method, index)
        label = f"{check.name} [{path}]" if check.name and several else check.name
        if check.comparison in ("max", "min"):
            return [self._bound(check, path, raw, index, label)]
        if check.comparison in ("below", "above"):
            return [self._versus(check, path, raw, index, other, label) for other in check.bound]
        if check.comparison == "equals":
            name = label or f"{path} == {_fmt(check.bound)}"
            if raw is None:
                return [result(name, path, None, check.bound, False, f"{path} has no value (null) in the report")]
            passed = raw == check.bound
            return [result(name, path, raw, check.bound, passed,
                           f"{path} is {_fmt(raw)}" + ("" if passed else f", the policy wants {_fmt(check.bound)}"))]
        return [self._delta(check, path, raw, index, label)]

    def _bound(self, check: Check, path: str, raw, index: int, label: str | None) -> dict:
        upper = check.comparison == "max"
        sign = "<=" if upper else ">="
        value = self._numeric(raw, f"{self.method}.{path}", index)
        extra = {}
        if isinstance(check.bound, RelativeBound):
            rel = check.bound
            other_path = rel.metric or path
            other_data, source = self._other_method(rel.method, index)
            other = self._numeric(self._value(other_data, other_path, rel.method, index), f"{rel.method}.{other_path}", index)
            scale = (f"{rel.times:g} x " if rel.times != 1 else "") + rel.method + (f" {rel.plus:+g}" if rel.plus else "")
            name = label or f"{path} {sign} {scale}"
            extra = {"compared_with": {"method": rel.method, "metric": other_path, "value": other, "source": source}}
            if other is None:
                return result(name, path, value, None, False,
                              f"{rel.method}.{other_path} has no value (null) in the {source}: cannot compare", extra)
            threshold = round(rel.times * other + rel.plus, 12)  # 0.15, not 0.15000000000000002, in the verdict
            how = f"{scale} = {_fmt(threshold)} ({rel.method} {_fmt(other)}{', from the baseline report' if source != 'report' else ''})"
        else:
            threshold = check.bound
            name = label or f"{path} {sign} {_fmt(threshold)}"
            how = _fmt(threshold)
        if value is None:
            return result(name, path, None, threshold, False, f"{path} has no value (null) in the report", extra)
        passed = value <= threshold + TOLERANCE if upper else value >= threshold - TOLERANCE
        verb = sign if passed else (">" if upper else "<")
        return result(name, path, value, threshold, passed,
                      f"{_fmt(value)} {verb} {how}" + ("" if passed else (": above the limit" if upper else ": below the minimum")),
                      extra)

    def _versus(self, check: Check, path: str, raw, index: int, other_name: str, label: str | None) -> dict:
        below = check.comparison == "below"
        name = f"{label} [vs {other_name}]" if label else f"{path} {'<' if below else '>'} {other_name}"
        value = self._numeric(raw, f"{self.method}.{path}", index)
        other_data, source = self._other_method(other_name, index)
        other = self._numeric(self._value(other_data, path, other_name, index), f"{other_name}.{path}", index)
        extra = {"compared_with": {"method": other_name, "metric": path, "value": other, "source": source}}
        if value is None or other is None:
            missing = path if value is None else f"{other_name}.{path}"
            return result(name, path, value, other, False, f"{missing} has no value (null): cannot compare", extra)
        passed = value < other if below else value > other
        relation = ("<" if value < other else ">=") if below else (">" if value > other else "<=")
        return result(name, path, value, other, passed,
                      f"{_fmt(value)} {relation} {other_name} {_fmt(other)}" + ("" if source == "report" else " (from the baseline report)")
                      + ("" if passed else f": not {'below' if below else 'above'} {other_name}"), extra)

    def _delta(self, check: Check, path: str, raw, index: int, label: str | None) -> dict:
        increase = check.comparison == "max_increase"
        name = label or f"{path} {'rises' if increase else 'falls'} <= {_fmt(check.bound)} vs last release"
        value = self._numeric(raw, f"{self.method}.{path}", index)
        if self.baseline is None:
            return result(name, path, value, None, None, "skipped: no --baseline report (first release)",
                          {"skipped": True})
        try:
            before = lookup(self.baseline["methods"][self.method], path)
        except _Missing:
            return result(name, path, value, None, None,
                          f"skipped: the baseline report has no {path} (new since the last release)", {"skipped": True})
        before = self._numeric(before, f"baseline {self.method}.{path}", index)
        head = next(".".join(path.split(".")[:cut]) for cut in range(path.count(".") + 1, 0, -1)
                    if ".".join(path.split(".")[:cut]) in self.data)
        mine, theirs = ((r.get("attacks") or {}).get(head, {}).get("config") for r in (self.report, self.baseline))
        if mine is not None and theirs is not None and mine != theirs:
            raise GateInputError(f"policy check {index}: the {head} run's settings changed since the last release "
                                 f"({json.dumps(theirs, sort_keys=True)} -> {json.dumps(mine, sort_keys=True)}), so its "
                                 f"delta means nothing; re-run `immunizer bench` on the last release with today's settings")
        extra = {"baseline": before}
        if value is None or before is None:
            missing = "the report" if value is None else "the baseline report"
            return result(name, path, value, None, False, f"{path} has no value (null) in {missing}: cannot compare", extra)
        threshold = round(before + check.bound if increase else before - check.bound, 12)
        passed = value <= threshold + TOLERANCE if increase else value >= threshold - TOLERANCE
        change = value - before
        return result(name, path, value, threshold, passed,
                      f"{_fmt(before)} -> {_fmt(value)} ({change:+.4g}); allowed {'+' if increase else '-'}{_fmt(check.bound)}"
                      + ("" if passed else ": regression beyond the tolerance"), extra)

    # -- the verdict
    def judged(self) -> dict:
        """What was judged, so that a verdict can be matched to exactly one model and measurement."""
        r = self.report
        judged = {"method": self.method, "model_sha256": self.data.get("model_sha256"),
                  "report_sha256": report_sha256(r),
                  **{k: r.get(k) for k in ("preset", "seeds", "base_model", "base_model_sha256", "judge",
                                           "prompt_template", "decoding", "data_versions")}}
        if self.baseline is not None:
            judged["baseline"] = {"report_sha256": report_sha256(self.baseline), "preset": self.baseline.get("preset"),
                                  "model_sha256": self.baseline["methods"][self.method].get("model_sha256")}
        else:
            judged["baseline"] = None
        return judged

    def verdict(self) -> dict:
        checks = self.evaluate()
        failed = [c["name"] for c in checks if c["passed"] is False]
        skipped = [c["name"] for c in checks if c["passed"] is None]
        counted = len(checks) - len(skipped)
        passed = not failed and counted > 0  # a policy that judged nothing has not said the model may ship
        summary = (f"PASS: {counted} of {counted} checks hold" if passed
                   else f"FAIL: {len(failed)} of {counted} checks failed: {'; '.join(failed)}" if failed
                   else "FAIL: no check was evaluated (every check skipped); pass --baseline or add absolute checks")
        if skipped:
            summary += f" ({len(skipped)} skipped)"
        return {"passed": passed, "verdict": "PASS" if passed else "FAIL", "summary": summary,
                "policy": self.policy.describe(), "judged": self.judged(), "checks": checks,
                "failed": failed, "skipped": skipped}


def result(name: str, metric: str, value, threshold, passed: bool | None, reason: str, extra: dict | None = None) -> dict:
    return {"name": name, "metric": metric, "value": value, "threshold": threshold, "passed": passed, "reason": reason,
            **(extra or {})}


def gate(report: dict, policy: Policy, baseline: dict | None = None) -> dict:
    """The verdict of `policy` on `report` (with `baseline`, the last release's report, for deltas)."""
    return Gate(report, policy, baseline).verdict()


def record_verdict(store, verdict: dict, actor: str = "gate") -> dict:
    """Append the verdict to the review store's audit log with the rubric versions in force, so the
    log says which model was judged, on which measurement, under which policy and rubrics."""
    rubrics = [{"name": r.name, "version": r.version, "sha256": r.sha256} for r in store.rubrics()]
    detail = {**verdict, "rubrics": rubrics}
    store.record_event(actor, "gate_verdict", "release", None, **detail)
    return detail
