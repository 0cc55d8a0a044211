"""`immunizer gate` and `immunizer cycle`: thin commands over the loop's Python API."""
from __future__ import annotations

import json
import sys

import click

from immunizer.review.cli import DB_HELP


@click.command()
@click.option("--report", "report_file", required=True, help="report.json written by `immunizer bench`.")
@click.option("--policy", "policy_ref", required=True,
              help="Policy YAML file, or the name of a bundled policy (`release`).")
@click.option("--baseline", "baseline_file", help="The last release's report.json, for the regression (delta) checks.")
@click.option("--store", "db", help=f"Also record the verdict in this review store's audit log. {DB_HELP}")
def gate(report_file, policy_ref, baseline_file, db):
    """Judge a bench report against a release policy and print the verdict as JSON.

    Exit status: 0 PASS, 1 FAIL, 2 bad input (unknown metric, missing method or slice, malformed
    or missing files). Baseline checks without --baseline are skipped (`passed: null`) unless
    the policy says `baseline: required`.

    \b
    Example:
      immunizer gate --report runs/bench/report.json --policy release --baseline releases/v1/report.json
    """
    from immunizer.loop.gate import gate as judge, load_report, record_verdict
    from immunizer.loop.policy import load_policy

    policy = load_policy(policy_ref)
    report = load_report(report_file)
    baseline = load_report(baseline_file, "baseline report") if baseline_file else None
    verdict = judge(report, policy, baseline)
    verdict["judged"]["report"] = report_file
    if baseline_file:
        verdict["judged"]["baseline"]["report"] = baseline_file
    if db:
        from immunizer.review import ReviewStore

        record_verdict(ReviewStore(db), verdict)
    click.echo(json.dumps(verdict, indent=2))
    click.echo(verdict["summary"], err=True)
    sys.exit(0 if verdict["passed"] else 1)
