"""`immunizer review …` the way a user runs it (a subprocess through the real entry point)."""
import json
import os
import subprocess
import sys

from review_fixtures import eval_sample, incident


def immunizer(*args, password=None):
    env = dict(os.environ, IMMUNIZER_REVIEW_PASSWORD=password) if password else dict(os.environ)
    env.pop("IMMUNIZER_REVIEW_PASSWORD", None) if password is None else None
    return subprocess.run([sys.executable, "-m", "immunizer", "review", *args], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=120)


def test_users_import_and_stats(tmp_path):
    db = str(tmp_path / "review.db")
    added = immunizer("user", "add", "--db", db, "ana", "--role", "reviewer", password="password123")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout) == {"user": "ana", "role": "reviewer"}
    bad_role = immunizer("user", "add", "--db", db, "bo", "--role", "boss", password="password123")
    assert bad_role.returncode == 2 and "unknown role 'boss'; choose one of reviewer, adjudicator, admin" in bad_role.stderr

    incidents = tmp_path / "incidents.jsonl"
    incidents.write_text(json.dumps(incident()) + "\n" + json.dumps(incident(step=41, severity="low")) + "\n")
    evals = tmp_path / "samples.jsonl"
    evals.write_text(json.dumps(eval_sample()) + "\n" + json.dumps(eval_sample(passed=True)) + "\n")
    result = immunizer("import", "--db", db, str(incidents))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) | {"file": None} == {"file": None, "added": 2, "duplicates_skipped": 0,
                                                          "passed_eval_samples_skipped": 0}
    result = immunizer("import", "--db", db, str(evals))
    assert json.loads(result.stdout)["passed_eval_samples_skipped"] == 1

    stats = immunizer("stats", "--db", db)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["queue"] == {"open": 3, "escalated": 0, "closed": 0, "pending_assignments": {}}


def test_malformed_import_exits_2_with_line_numbers_and_writes_nothing(tmp_path):
    db = str(tmp_path / "review.db")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(incident()) + "\n{\n" + json.dumps(incident(severity="urgent")) + "\n")
    result = immunizer("import", "--db", db, str(bad))
    assert result.returncode == 2
    assert "line 2: not valid JSON" in result.stderr and "line 3: severity must be one of" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(immunizer("stats", "--db", db).stdout)["queue"]["open"] == 0


def test_rubric_add_and_bad_config(tmp_path):
    db = str(tmp_path / "review.db")
    rubric = tmp_path / "rubric.md"
    rubric.write_text("harmful: helps with harm\nbenign: fine\n")
    result = immunizer("rubric", "add", "--db", db, "--labels", "harmful,benign", str(rubric))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["version"] == 2
    config = tmp_path / "review.yaml"
    config.write_text("triage: {queue_sise: 3}\n")
    result = immunizer("stats", "--db", db, "--config", str(config))
    assert result.returncode == 2 and "unknown key triage.queue_sise" in result.stderr
    result = immunizer("stats", "--db", "mysql://nowhere/db")
    assert result.returncode == 2 and "unsupported database URL" in result.stderr
