"""The reviewer web page in-process (FastAPI's TestClient): log in, label, escalate, adjudicate,
and every way in that must stay closed."""
import json
import re

import pytest
from fastapi.testclient import TestClient
from review_fixtures import eval_sample, generic, store_with_users

from immunizer.review import parse_lines
from immunizer.review.web.app import create_app

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


def test_logout(site):
    _, app, _, _ = site
    ana = login(app, "ana")
    page = ana.get("/queue")
    assert ana.post("/logout", data={"csrf_token": csrf(page)}).url.path == "/login"
    assert ana.get("/queue", follow_redirects=False).status_code == 303
