"""The reviewer web page in-process (FastAPI's TestClient): log in, label, escalate, adjudicate,
and every way in that must stay closed."""
import json
import re

import pytest
from fastapi.testclient import TestClient
from review_fixtures import eval_sample, generic, store_with_users

from immunizer.review import parse_lines
from immunizer.review.store import MAX_FAILED_LOGINS
from immunizer.review.web.app import ADDRESS_FAILURES, create_app

SESSION_SECONDS = 600


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def site(tmp_path):
    store = store_with_users(str(tmp_path / "review.db"), ("ana", "reviewer"), ("bob", "reviewer"),
                             ("judge", "adjudicator"), ("root", "admin"))
    ids = store.add_items(parse_lines([json.dumps(eval_sample()), json.dumps(generic(severity="low"))]).records)
    clock = Clock()
    app = create_app(store, secret_key="test-secret", session_seconds=SESSION_SECONDS, clock=clock)
    return store, app, clock, ids["item_ids"]


def csrf(page) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


def login(app, name, password="password123") -> TestClient:
    client = TestClient(app)
    token = csrf(client.get("/login"))
    response = client.post("/login", data={"name": name, "password": password, "csrf_token": token})
    assert response.status_code == 200, response.text  # followed the redirect
    return client


def test_label_escalate_adjudicate(site):
    store, app, _, (sample, low) = site
    ana, bob = login(app, "ana"), login(app, "bob")
    queue = ana.get("/queue")
    assert f'href="/items/{sample}"' in queue.text and f'href="/items/{low}"' in queue.text
    page = ana.get(f"/items/{sample}")
    assert "Rubric: default v1" in page.text and "tension wrench" in page.text  # rubric beside the item
    response = ana.post(f"/items/{sample}/review", data={"label": "harmful", "rationale": "complied",
                                                         "csrf_token": csrf(page)})
    assert response.status_code == 200 and response.url.path == "/queue"
    assert f'href="/items/{sample}"' in bob.get("/queue").text
    page = bob.get(f"/items/{sample}")
    bad = bob.post(f"/items/{sample}/review", data={"label": "nonsense", "csrf_token": csrf(page)})
    assert bad.status_code == 400 and "not in rubric" in bad.text
    bob.post(f"/items/{sample}/review", data={"label": "benign", "rationale": "refusal-ish", "csrf_token": csrf(page)})
    page = ana.get(f"/items/{low}")
    ana.post(f"/items/{low}/escalate", data={"reason": "rubric is silent here", "csrf_token": csrf(page)})

    judge = login(app, "judge")
    escalations = judge.get("/escalations")
    assert "reviewers disagree: benign×1, harmful×1" in escalations.text and "ana: rubric is silent here" in escalations.text
    page = judge.get(f"/escalations/{sample}")
    assert "refusal-ish" in page.text  # the reviewers' rationales are shown
    missing = judge.post(f"/escalations/{sample}/adjudicate", data={"label": "harmful", "csrf_token": csrf(page)})
    assert missing.status_code == 400 and "needs a rationale" in missing.text
    done = judge.post(f"/escalations/{sample}/adjudicate", data={"label": "harmful", "rationale": "gave steps",
                                                                 "csrf_token": csrf(page)})
    assert done.status_code == 200 and f"/escalations/{sample}" not in done.text
    [final] = store.adjudicated_items()
    assert (final.item_id, final.label, final.rationale, final.method) == (sample, "harmful", "gave steps", "adjudicator")

    root = login(app, "root")
    dashboard = root.get("/dashboard")
    assert dashboard.status_code == 200 and "Krippendorff" in dashboard.text and "Rubric drift" in dashboard.text


def test_reviewer_cannot_open_another_reviewers_item(site):
    store, app, _, (sample, low) = site
    ana = login(app, "ana")
    ana.get("/queue")
    store.fill_queue("bob")  # bob holds the sample (it needs two reviewers), not the low item (one)
    bob = login(app, "bob")
    assert bob.get(f"/items/{low}").status_code == 404
    page = bob.get(f"/items/{sample}")
    for path in (f"/items/{low}/review", f"/items/{low}/escalate"):
        assert bob.post(path, data={"label": "benign", "reason": "x", "csrf_token": csrf(page)}).status_code == 404
    assert bob.get("/items/99999").status_code == 404
    assert bob.get("/escalations").status_code == 403
    assert bob.get("/dashboard").status_code == 403
    assert login(app, "judge").get("/dashboard").status_code == 403


def test_wrong_password_and_anonymous_access(site):
    _, app, _, (sample, _) = site
    client = TestClient(app)
    token = csrf(client.get("/login"))
    response = client.post("/login", data={"name": "ana", "password": "wrong-password", "csrf_token": token})
    assert response.status_code == 401 and "Wrong name or password" in response.text
    for path in ("/queue", f"/items/{sample}", "/escalations", "/dashboard"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/login"


def test_csrf_token_is_required(site):
    _, app, _, (sample, _) = site
    client = TestClient(app)
    client.get("/login")
    assert client.post("/login", data={"name": "ana", "password": "password123"}).status_code == 403
    assert client.post("/login", data={"name": "ana", "password": "password123", "csrf_token": "forged"}).status_code == 403
    ana = login(app, "ana")
    ana.get("/queue")
    assert ana.post(f"/items/{sample}/review", data={"label": "harmful"}).status_code == 403
    # a token from another session is no good either
    other = csrf(login(app, "bob").get("/queue"))
    assert ana.post(f"/items/{sample}/review", data={"label": "harmful", "csrf_token": other}).status_code == 403


def test_sessions_expire(site):
    _, app, clock, _ = site
    ana = login(app, "ana")
    assert ana.get("/queue").status_code == 200
    clock.now += SESSION_SECONDS + 1
    response = ana.get("/queue", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login?expired=1"
    assert ana.get("/queue", follow_redirects=False).headers["location"] == "/login"  # the session is gone
    assert "Your session expired" in ana.get("/login?expired=1").text


def replay(app, client) -> TestClient:
    """A second browser holding a copy of `client`'s session cookie (a stolen or replayed cookie)."""
    thief = TestClient(app)
    thief.cookies.set("immunizer_review", client.cookies.get("immunizer_review"))
    return thief


def test_logout_ends_the_session_on_the_server(site):
    _, app, _, _ = site
    ana = login(app, "ana")
    copy = replay(app, ana)
    assert copy.get("/queue", follow_redirects=False).status_code == 200  # the copy works while ana is in
    page = ana.get("/queue")
    assert ana.post("/logout", data={"csrf_token": csrf(page)}).url.path == "/login"
    assert ana.get("/queue", follow_redirects=False).status_code == 303
    response = copy.get("/queue", follow_redirects=False)  # the old cookie, replayed after logout
    assert response.status_code == 303 and response.headers["location"] == "/login"


def test_a_password_change_or_deactivation_ends_open_sessions(site):
    store, app, _, _ = site
    ana, bob = login(app, "ana"), login(app, "bob")
    store.set_password("ana", "a-new-password", actor="test")
    assert ana.get("/queue", follow_redirects=False).headers["location"] == "/login"
    assert login(app, "ana", "a-new-password").get("/queue").status_code == 200
    assert store.deactivate_user("bob", actor="test") == 1  # bob's open assignment goes back to the pool
    assert bob.get("/queue", follow_redirects=False).headers["location"] == "/login"


def failed_login(client, name, password="wrong-password"):
    return client.post("/login", data={"name": name, "password": password, "csrf_token": csrf(client.get("/login"))})


def test_repeated_failures_lock_the_account_and_are_audit_logged(site):
    store, app, _, _ = site
    client = TestClient(app)
    for _ in range(MAX_FAILED_LOGINS):
        assert failed_login(client, "ana").status_code == 401
    assert failed_login(client, "ana", "password123").status_code == 401  # locked: even the right password
    log = [(e.actor, e.action, e.detail.get("reason")) for e in store.audit_log() if "login" in e.action
           or e.action == "lock_account"]
    assert log == [("ana", "login_failed", "wrong password")] * MAX_FAILED_LOGINS + [
        ("system", "lock_account", None), ("ana", "login_failed", "account locked")]
    assert {e.detail["address"] for e in store.audit_log() if e.action == "login_failed"} == {"testclient"}
    store.set_password("ana", "password123", actor="test")  # `review user passwd` lifts the lock
    assert login(app, "ana").get("/queue").status_code == 200


def test_failures_from_one_address_are_throttled_across_account_names(site):
    store, app, _, _ = site
    client = TestClient(app)
    for i in range(ADDRESS_FAILURES):
        assert failed_login(client, f"guess{i}").status_code == 401
    response = failed_login(client, "ana", "password123")
    assert response.status_code == 429 and "Too many failed sign-ins from your address" in response.text
    assert [e.action for e in store.audit_log()][-1] == "login_throttled"


def test_password_checks_at_once_are_capped(site, monkeypatch):
    _, app, _, _ = site
    from immunizer.review import store as store_module

    monkeypatch.setattr(store_module, "ARGON2_WAIT_SECONDS", 0.1)
    held = [store_module._argon2_slots.acquire() for _ in range(store_module.ARGON2_AT_ONCE)]  # a flood in progress
    try:
        response = failed_login(TestClient(app), "ana", "password123")
    finally:
        for _ in held:
            store_module._argon2_slots.release()
    assert response.status_code == 503 and "checking too many passwords at once" in response.text


def test_cookie_flags(site):
    store, app, _, _ = site
    cookie = TestClient(app).post("/login", data={"name": "ana", "password": "password123",
                                                  "csrf_token": "x"}).headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    secure_app = create_app(store, secret_key="test-secret", https_only=True)
    cookie = TestClient(secure_app).get("/login").headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie


def test_item_text_is_escaped(tmp_path):
    store = store_with_users(str(tmp_path / "review.db"), ("ana", "reviewer"))
    [item] = store.add_items(parse_lines([json.dumps(generic(payload={"prompt": "<script>alert(1)</script>"}))])
                             .records)["item_ids"]
    page = login(create_app(store, secret_key="s"), "ana").get(f"/items/{item}")
    assert page.status_code == 200 and "<script>alert" not in page.text and "&lt;script&gt;alert" in page.text


def test_escalating_an_item_outside_ones_queue_is_a_404_not_an_error(site):
    store, app, _, (sample, _) = site
    store.fill_queue("ana")
    store.fill_queue("bob")  # the sample's two slots are taken
    for name in ("root", "judge"):
        client = login(app, name)
        page = client.get("/login")
        for reason in ("", "why"):
            response = client.post(f"/items/{sample}/escalate", data={"reason": reason, "csrf_token": csrf(page)})
            assert response.status_code == 404, response.text


def test_the_escalation_page_takes_no_message_from_the_address(site):
    store, app, _, (sample, _) = site
    store.fill_queue("ana")
    store.escalate("ana", sample, "unsure")
    judge = login(app, "judge")
    page = judge.get(f"/escalations/{sample}?error=Your+session+is+invalid,+call++1-555&status_code=500")
    assert page.status_code == 200 and "call" not in page.text


def test_viewing_the_queue_assigns_nothing(site):
    store, app, _, (sample, low) = site
    ana = login(app, "ana")  # signing in fills the queue (a POST)
    [new] = store.add_items(parse_lines([json.dumps(generic(payload={"n": "new"}))]).records)["item_ids"]
    page = ana.get("/queue")
    assert f'href="/items/{new}"' not in page.text
    assert {i.id for _, i in store.queue("ana")} == {sample, low}
    response = ana.post("/queue", data={"csrf_token": csrf(page)})  # the "Get more items" button
    assert response.url.path == "/queue" and f'href="/items/{new}"' in response.text


def test_a_database_password_never_appears_in_an_error():
    from immunizer.errors import ImmunizerError
    from immunizer.review import ReviewStore

    with pytest.raises(ImmunizerError) as error:
        ReviewStore("postgresql://reviewer:s3cret-pw@127.0.0.1:1/review")
    assert "s3cret-pw" not in str(error.value) and "reviewer@127.0.0.1:1/review" in str(error.value)
