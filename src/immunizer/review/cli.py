"""`immunizer review …`: thin commands over the review store's Python API."""
from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path

import click

from immunizer.errors import ImmunizerError
from immunizer.options import store_option

config_option = click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                             help="YAML with triage / escalation / reviewer_accuracy settings (see review/config.py).")


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable from elsewhere
        return False


def _store(url: str, config_file: str | None = None):
    from immunizer.review import ReviewStore, load_review_config

    return ReviewStore(url, load_review_config(config_file))


@click.group()
def review() -> None:
    """Human review of incidents, failed evals, red-team findings, guard flags and user reports.

    \b
    Example:
      immunizer review user add --store review.db ana --role reviewer
      immunizer review import --store review.db runs/serve/incidents.jsonl
      immunizer review serve --store review.db --port 8080
      immunizer review stats --store review.db
    """


@review.command("import")
@store_option(required=True)
@config_option
@click.argument("file", type=click.Path(dir_okay=False))
def import_items(store_url, config_file, file):
    """Import items from FILE.jsonl (breaker incidents, eval samples, generic items), all or nothing."""
    from immunizer.review import parse_file

    parsed = parse_file(file)
    result = _store(store_url, config_file).add_items(parsed.records, actor=f"import:{Path(file).name}")
    click.echo(json.dumps({"file": file, "added": result["added"], "duplicates_skipped": result["duplicates_skipped"],
                           "passed_eval_samples_skipped": parsed.skipped_passed_eval_samples,
                           "consent_withdrawn": result["consent_withdrawn"]}, indent=2))


@review.group()
def consent() -> None:
    """Consent to use items for training."""


@consent.command("withdraw")
@store_option(required=True)
@click.option("--reason", required=True, help="Why (e.g. the user's request id); recorded in the audit log.")
@click.option("--actor", default="cli", show_default=True, help="Who withdraws it, for the audit log.")
@click.argument("item_ids", nargs=-1, type=int, required=True)
def consent_withdraw(store_url, reason, actor, item_ids):
    """Withdraw consent for ITEM_IDS: the next data selection leaves them out.

    Re-importing an item with `consent: false` does the same. Withdrawal is final: a later import with
    `consent: true` does not restore it.
    """
    changed = _store(store_url).withdraw_consent(list(item_ids), actor=actor, reason=reason)
    click.echo(json.dumps({"consent_withdrawn": changed, "already_withdrawn": sorted(set(item_ids) - set(changed))}))


@review.group()
def user() -> None:
    """Manage reviewer accounts."""


@user.command("add")
@store_option(required=True)
@click.option("--role", required=True, help="reviewer, adjudicator or admin.")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False),
              help="Read the password from this file (default: $IMMUNIZER_REVIEW_PASSWORD, else ask).")
@click.argument("name")
def user_add(store_url, role, password_file, name):
    """Add the account NAME with ROLE; the password is stored as an Argon2 hash."""
    from immunizer.review.models import ROLES

    if role not in ROLES:  # before asking for a password
        raise ImmunizerError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    created = _store(store_url).add_user(name, role, _password(name, password_file))
    click.echo(json.dumps({"user": created.name, "role": created.role}))


def _password(name: str, password_file: str | None) -> str:
    if password_file:
        return Path(password_file).read_text().strip()
    if os.environ.get("IMMUNIZER_REVIEW_PASSWORD"):
        return os.environ["IMMUNIZER_REVIEW_PASSWORD"]
    if sys.stdin.isatty():
        return click.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
    raise ImmunizerError(f"no password for {name}: pass --password-file FILE or set $IMMUNIZER_REVIEW_PASSWORD")


@user.command("passwd")
@store_option(required=True)
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False),
              help="Read the new password from this file (default: $IMMUNIZER_REVIEW_PASSWORD, else ask).")
@click.argument("name")
def user_passwd(store_url, password_file, name):
    """Set NAME's password: ends all of NAME's sessions and lifts a lockout after failed logins."""
    store = _store(store_url)
    store.user(name)  # before asking for a password
    store.set_password(name, _password(name, password_file), actor="cli")
    click.echo(json.dumps({"user": name, "password_changed": True, "sessions_ended": True}))


@user.command("deactivate")
@store_option(required=True)
@click.argument("name")
def user_deactivate(store_url, name):
    """Deactivate NAME: no more logins, open sessions end at once, the open queue is handed back.
    Reviews and audit entries stay (accounts are never deleted, so the log keeps its meaning)."""
    released = _store(store_url).deactivate_user(name, actor="cli")
    click.echo(json.dumps({"user": name, "active": False, "assignments_released": released}))


@review.group()
def rubric() -> None:
    """Manage rubric versions (each version is immutable)."""


@rubric.command("add")
@store_option(required=True)
@click.option("--labels", required=True, help="Comma-separated labels, e.g. harmful,over_refusal,benign,unclear.")
@click.option("--name", default="default", show_default=True)
@click.option("--rereview-fraction", default=0.1, show_default=True,
              help="Share of items closed under older versions to review again under this one (label shift check).")
@click.option("--seed", default=0, show_default=True)
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def rubric_add(store_url, labels, name, rereview_fraction, seed, file):
    """Add FILE (markdown) as the next version of the rubric and sample items for re-review."""
    store = _store(store_url)
    created = store.add_rubric(Path(file).read_text(), labels.split(","), name=name, actor="cli")
    rereview = store.request_rereview(rereview_fraction, seed=seed, actor="cli") if rereview_fraction else []
    click.echo(json.dumps({"rubric": created.name, "version": created.version, "sha256": created.sha256,
                           "rereview_items": rereview}, indent=2))


@review.command()
@store_option(required=True)
@config_option
def stats(store_url, config_file):
    """Print agreement (Krippendorff's α, Cohen's κ, accuracy on gold), label shift (`drift`) and queue sizes as JSON."""
    click.echo(json.dumps(_store(store_url, config_file).stats(), indent=2))


@review.command()
@store_option(required=True)
@config_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option("--session-minutes", default=60, show_default=True, help="Sessions expire this long after login.")
@click.option("--https-only", is_flag=True,
              help="Mark the session cookie Secure (sent over HTTPS only): use it behind a TLS-terminating proxy.")
def serve(store_url, config_file, host, port, session_minutes, https_only):
    """Serve the reviewer web page. Set $IMMUNIZER_REVIEW_SECRET to keep sessions valid across restarts."""
    import uvicorn

    from immunizer.review.web.app import create_app

    if not _is_loopback(host) and not https_only:
        click.echo(f"warning: serving on {host}, reachable from other machines, without --https-only: session "
                   "cookies and passwords cross the network in clear text. Put a TLS proxy in front and pass "
                   "--https-only.", err=True)
    app = create_app(_store(store_url, config_file), secret_key=os.environ.get("IMMUNIZER_REVIEW_SECRET"),
                     session_seconds=session_minutes * 60, https_only=https_only)
    click.echo(f"reviewer page on http://{host}:{port}/", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
