"""`immunizer gate` and `immunizer cycle`: thin commands over the loop's Python API."""
from __future__ import annotations

import json
import sys

import click

from immunizer.options import release_option, store_option


@click.command()
@click.option("--report", "report_file", required=True, help="report.json written by `immunizer bench`.")
@click.option("--policy", "policy_ref", required=True,
              help="Policy YAML file, or the name of a bundled policy (`release`).")
@click.option("--baseline", "baseline_file", help="The last release's report.json, for the regression (delta) checks.")
@store_option(help="Also record the verdict in this review store's audit log (a SQLite file or a PostgreSQL URL).")
def gate(report_file, policy_ref, baseline_file, store_url):
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
    if store_url:
        from immunizer.review import ReviewStore

        record_verdict(ReviewStore(store_url), verdict)
    click.echo(json.dumps(verdict, indent=2))
    click.echo(verdict["summary"], err=True)
    sys.exit(0 if verdict["passed"] else 1)


@click.command()
@store_option(required=True, help="The review store to learn from: a SQLite file or a PostgreSQL URL.")
@release_option(required=True, old=(), help="The last release: a releases directory with current.json, or an immunize output directory.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="This cycle's working directory (rerun the same command to resume it).")
@click.option("--preset", type=click.Choice(["tiny", "quick", "standard"]), default="quick", show_default=True,
              help="Cycle settings (presets/cycle/*.yaml): the immunize and bench presets, the refreshes.")
@click.option("--policy", "policy_ref", default="release", show_default=True,
              help="Release policy YAML, or a bundled policy name.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a cycle setting, e.g. sft.lr=2e-5 or bench_overrides=[eval.n_benign=20] (repeatable).")
def cycle(store_url, release_dir, out_dir, preset, policy_ref, overrides):
    """One turn of the feedback loop: select → refresh → immunize → regression checks → gate.

    Reviewed, consented items become the next training data; the candidate immunized from the last
    release is benched and judged by the policy against the last release's report.json. PASS makes it
    a release and moves current.json to it; FAIL leaves current.json where it was (rollback).
    Prints a JSON summary. Exit status: 0 PASS, 1 FAIL, 2 bad input, 130 stopped as asked (a first Ctrl-C or
    SIGTERM, or `touch OUT/STOP`): the same command continues it.

    \b
    Example:
      immunizer cycle --store review.db --release releases --out runs/cycle-1 --preset quick
    """
    from immunizer.loop.cycle import run_cycle
    from immunizer.stopping import GracefulStop

    with GracefulStop("the current stage's next safe point (an immunize step, checkpointed; a bench piece)",
                      out_dir) as stop:
        summary = run_cycle(store_url, release_dir, out_dir, preset, policy_ref, overrides, stop=stop)
    stop.clear_stop_file()  # a stop asked for earlier is not part of the next run
    click.echo(json.dumps(summary, indent=2))
    click.echo(summary["verdict"], err=True)
    sys.exit(0 if summary["passed"] else 1)
