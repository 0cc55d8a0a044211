"""`immunizer review …` the way a user runs it (a subprocess through the real entry point)."""
import json
import os
import subprocess
import sys

from review_fixtures import eval_sample, incident


def immunizer(*args, password=None):
    env = {k: v for k, v in os.environ.items() if k != "IMMUNIZER_REVIEW_PASSWORD"}
    if password:
        env["IMMUNIZER_REVIEW_PASSWORD"] = password
    return subprocess.run([sys.executable, "-m", "immunizer", "review", *args], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=120)


def test_users_import_and_stats(tmp_path):
    db = str(tmp_path / "review.db")
    added = immunizer("user", "add", "--db", db, "ana", "--role", "reviewer", password="password123")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout) == {"user": "ana", "role": "reviewer"}
    no_password = immunizer("user", "add", "--db", db, "cy", "--role", "reviewer")
    assert no_password.returncode == 2 and "pass --password-file FILE or set $IMMUNIZER_REVIEW_PASSWORD" in no_password.stderr
    bad_role = immunizer("user", "add", "--db", db, "bo", "--role", "boss", password="password123")
    assert bad_role.returncode == 2 and "unknown role 'boss'; choose one of reviewer, adjudicator, admin" in bad_role.stderr

    incidents = tmp_path / "incidents.jsonl"
    incidents.write_text(json.dumps(incident()) + "\n" + json.dumps(incident(step=41, severity="low")) + "\n")
    evals = tmp_path / "samples.jsonl"
    evals.write_text(json.dumps(eval_sample()) + "\n" + json.dumps(eval_sample(passed=True)) + "\n")
    result = immunizer("import", "--db", db, str(incidents))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) | {"file": None} == {"file": None, "added": 2, "duplicates_skipped": 0,
                                                          "passed_eval_samples_skipped": 0, "consent_withdrawn": []}
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
    assert result.returncode == 2 and "unknown config key 'triage.queue_sise'; known keys here" in result.stderr
    result = immunizer("stats", "--db", "mysql://nowhere/db")
    assert result.returncode == 2 and "unsupported database URL" in result.stderr


def test_serve_answers_on_loopback(tmp_path):
    import time
    import urllib.request

    from immunizer.review.throwaway_pg import free_port

    db, port = str(tmp_path / "review.db"), free_port()
    server = subprocess.Popen([sys.executable, "-m", "immunizer", "review", "serve", "--db", db, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5).read().decode()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stdout.read()
                time.sleep(0.2)
        assert 'name="csrf_token"' in page and "Log in" in page
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_user_passwd_and_deactivate(tmp_path):
    from immunizer.review import ReviewStore

    db = str(tmp_path / "review.db")
    assert immunizer("user", "add", "--db", db, "ana", "--role", "reviewer", password="password123").returncode == 0
    changed = immunizer("user", "passwd", "--db", db, "ana", password="another-password")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout) == {"user": "ana", "password_changed": True, "sessions_ended": True}
    store = ReviewStore(db)
    assert store.authenticate("ana", "password123") is None and store.authenticate("ana", "another-password")
    short = immunizer("user", "passwd", "--db", db, "ana", password="short")
    assert short.returncode == 2 and "at least 8 characters" in short.stderr
    gone = immunizer("user", "deactivate", "--db", db, "ana")
    assert gone.returncode == 0 and json.loads(gone.stdout)["active"] is False
    assert store.authenticate("ana", "another-password") is None
    nobody = immunizer("user", "passwd", "--db", db, "ana", password="another-password")
    assert nobody.returncode == 2 and "no active user 'ana'" in nobody.stderr
    actions = [e.action for e in store.audit_log()]
    assert "set_password" in actions and "deactivate_user" in actions


def test_serving_beyond_loopback_without_https_only_warns(tmp_path):
    from immunizer.review.throwaway_pg import free_port

    proc = subprocess.Popen([sys.executable, "-m", "immunizer", "review", "serve", "--db", str(tmp_path / "r.db"),
                             "--host", "0.0.0.0", "--port", str(free_port())], stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        first = proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait()
    assert first.startswith("warning: serving on 0.0.0.0") and "--https-only" in first
