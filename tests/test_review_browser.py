"""The reviewer page in a real browser: Playwright drives Debian's Chromium (never a downloaded
one) against `uvicorn` serving the app on loopback."""
import json
import os
import shutil
import threading
import time

import pytest
import uvicorn
from review_fixtures import eval_sample, generic, store_with_users

from immunizer.review import parse_lines
from immunizer.review.throwaway_pg import free_port
from immunizer.review.web.app import create_app

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("IMMUNIZER_TEST_CHROMIUM", "/usr/bin/chromium")
# headless, and nothing that reaches for the network on its own
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]  # containers often have a tiny /dev/shm


@pytest.fixture
def server(tmp_path):
    store = store_with_users(str(tmp_path / "review.db"), ("ana", "reviewer"), ("bob", "reviewer"),
                             ("judge", "adjudicator"))
    ids = store.add_items(parse_lines([json.dumps(eval_sample()), json.dumps(generic(severity="low"))]).records)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store, secret_key="browser-test"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", store, ids["item_ids"]
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: `make test` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def log_in(browser, base, name):
    page = browser.new_context().new_page()
    page.goto(f"{base}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", "password123")
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/queue")
    assert page.inner_text("#whoami") == f"{name} ({'adjudicator' if name == 'judge' else 'reviewer'})"
    return page


def label(page, base, item_id, choice, rationale):
    page.goto(f"{base}/items/{item_id}")
    assert "Rubric: default v1" in page.content() and "over_refusal" in page.inner_text("#rubric")
    page.check(f"input[name=label][value={choice}]")
    page.fill("textarea[name=rationale]", rationale)
    page.click("#submit-label")
    page.wait_for_url(f"{base}/queue")


def test_log_in_label_escalate_adjudicate(server, browser):
    base, store, (sample, low) = server
    ana = log_in(browser, base, "ana")
    assert ana.locator(f"a[href='/items/{sample}']").count() == 1
    label(ana, base, sample, "harmful", "the answer starts the procedure")
    ana.goto(f"{base}/items/{low}")
    ana.fill("textarea[name=reason]", "the rubric does not cover this")
    ana.click("#escalate")
    ana.wait_for_url(f"{base}/queue")
    assert ana.locator("#empty").count() == 1  # both items done

    bob = log_in(browser, base, "bob")
    label(bob, base, sample, "benign", "reads like a refusal to me")

    judge = log_in(browser, base, "judge")
    judge.click("text=Escalations")
    table = judge.inner_text("#escalations")
    assert "reviewers disagree" in table and "ana: the rubric does not cover this" in table
    judge.click(f"a[href='/escalations/{sample}']")
    assert "reads like a refusal to me" in judge.content()
    judge.check("input[name=label][value=harmful]")
    judge.fill("textarea[name=rationale]", "step one of the procedure is given")
    judge.click("#submit-label")
    judge.wait_for_url(f"{base}/escalations")
    assert judge.locator(f"a[href='/escalations/{sample}']").count() == 0
    [final] = store.adjudicated_items()
    assert (final.item_id, final.label, final.rationale) == (sample, "harmful", "step one of the procedure is given")


def test_reviewer_cannot_open_another_reviewers_item(server, browser):
    base, store, (sample, low) = server
    ana = log_in(browser, base, "ana")  # ana's queue now holds both items; the low one needs one reviewer
    bob = log_in(browser, base, "bob")
    assert bob.locator(f"a[href='/items/{low}']").count() == 0
    response = bob.goto(f"{base}/items/{low}")
    assert response.status == 404 and "not in bob's queue" in bob.inner_text("#message")
    assert bob.goto(f"{base}/escalations").status == 403
    assert ana.goto(f"{base}/items/{low}").status == 200
