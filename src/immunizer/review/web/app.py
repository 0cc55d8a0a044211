"""The reviewer web page: FastAPI with server-rendered Jinja2 templates and no JavaScript.

Sessions are signed cookies (Starlette's SessionMiddleware, itsdangerous) that expire
`session_seconds` after login however active the user is, and end server-side on logout, a password
change or deactivation (the cookie carries the user's session epoch); failed logins are throttled per
address here and per account in the store, and audit-logged; every form carries a per-session
CSRF token; a reviewer reaches only items assigned to them (anything else is a 404, so item
ids do not leak), adjudicators also the escalated items, admins everything and the dashboard.
"""
from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections import defaultdict, deque
from importlib import resources

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from immunizer.errors import ImmunizerError
from immunizer.review.store import Busy, Forbidden, NotFound, ReviewStore


class LoginRequired(Exception):
    def __init__(self, expired: bool = False):
        self.expired = expired


class CsrfFailed(Exception):
    pass


ADDRESS_FAILURES = 20
"""Failed logins from one address within `ADDRESS_WINDOW_SECONDS` before it must wait (whatever the
account names: guessing across many accounts is throttled too; each account also locks, store.py)."""
ADDRESS_WINDOW_SECONDS = 15 * 60


def create_app(store: ReviewStore, secret_key: str | None = None, session_seconds: int = 3600,
               clock=time.time, https_only: bool = False) -> FastAPI:
    app = FastAPI(title="immunizer review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SessionMiddleware, secret_key=secret_key or secrets.token_hex(32), max_age=session_seconds,
                       same_site="strict", session_cookie="immunizer_review", https_only=https_only)
    failures_by_address: dict[str, deque] = defaultdict(deque)
    templates = Jinja2Templates(directory=str(resources.files("immunizer.review.web") / "templates"))
    templates.env.filters["pretty_json"] = lambda value: json.dumps(value, indent=2, sort_keys=True, default=str)

    def csrf_token(request: Request) -> str:
        if "csrf" not in request.session:
            request.session["csrf"] = secrets.token_urlsafe(32)
        return request.session["csrf"]

    def check_csrf(request: Request, token: str) -> None:
        expected = request.session.get("csrf")
        if not expected or not token or not secrets.compare_digest(expected, token):
            raise CsrfFailed()

    def current_user(request: Request, *roles: str):
        name, issued_at = request.session.get("user"), request.session.get("issued_at", 0)
        if not name:
            raise LoginRequired()
        if clock() - issued_at > session_seconds:
            request.session.clear()
            raise LoginRequired(expired=True)
        try:
            user = store.user(name)
        except NotFound:  # deactivated since
            request.session.clear()
            raise LoginRequired() from None
        if request.session.get("epoch") != user.session_epoch:  # logged out, or the password changed, since
            request.session.clear()
            raise LoginRequired()
        if roles and user.role not in roles:
            raise Forbidden(f"this page is for {' and '.join(roles)}s; you are signed in as a {user.role}")
        return user

    def render(request: Request, template: str, user=None, status_code: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, template, {"user": user, "csrf": csrf_token(request), **context},
                                          status_code=status_code)

    def item_action(request: Request, item_id: int, action):
        """Run a reviewer's action on an item; a fixable error shows the item again with the message."""
        user = current_user(request)
        try:
            action(user.name)
        except (NotFound, Forbidden):
            raise
        except ImmunizerError as exc:
            item, assignment = store.item_for(user.name, item_id)
            if assignment is None:  # an admin or adjudicator acting on an item that is not in their queue
                raise NotFound(f"item {item_id} is not in {user.name}'s open queue") from None
            return render(request, "item.html", user, status_code=400, item=item, error=str(exc),
                          rubric=store.rubric(assignment.rubric_id))
        store.fill_queue(user.name)
        return RedirectResponse("/queue", status_code=303)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired):
        return RedirectResponse("/login?expired=1" if exc.expired else "/login", status_code=303)

    @app.exception_handler(CsrfFailed)
    async def _csrf_failed(request: Request, exc: CsrfFailed):
        return render(request, "message.html", status_code=403, title="Form expired",
                      message="The form's security token is missing or stale. Go back, reload the page and submit again.")

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return render(request, "message.html", status_code=404, title="Not found", message=str(exc))

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden):
        return render(request, "message.html", status_code=403, title="Not allowed", message=str(exc))

    @app.get("/login")
    def login_page(request: Request, expired: int = 0):
        return render(request, "login.html", message="Your session expired; sign in again." if expired else None)

    @app.post("/login")
    def login(request: Request, name: str = Form(""), password: str = Form(""), csrf_token: str = Form("")):
        check_csrf(request, csrf_token)
        address = request.client.host if request.client else "unknown"
        recent = failures_by_address[address]
        while recent and clock() - recent[0] > ADDRESS_WINDOW_SECONDS:
            recent.popleft()
        if len(recent) >= ADDRESS_FAILURES:
            wait = int(ADDRESS_WINDOW_SECONDS - (clock() - recent[0])) // 60 + 1
            store.record_event(name[:100] or "-", "login_throttled", "address", None, address=address)
            return render(request, "login.html", status_code=429,
                          message=f"Too many failed sign-ins from your address; try again in {wait} minutes.")
        try:
            user = store.authenticate(name, password, address=address)
        except Busy as exc:
            return render(request, "login.html", status_code=503, message=str(exc))
        if user is None:
            recent.append(clock())
            return render(request, "login.html", status_code=401,
                          message="Wrong name or password, or the account is locked after repeated failures.")
        recent.clear()
        request.session.clear()  # a fresh session (and CSRF token) on every login
        request.session.update({"user": user.name, "issued_at": clock(), "epoch": user.session_epoch})
        if user.role != "admin":
            store.fill_queue(user.name)
        return RedirectResponse("/dashboard" if user.role == "admin" else "/queue", status_code=303)

    @app.post("/logout")
    def logout(request: Request, csrf_token: str = Form("")):
        check_csrf(request, csrf_token)
        if request.session.get("user"):
            with contextlib.suppress(NotFound):
                # server-side: the cookie is signed, not stored, so a copy of it would stay valid without this
                store.end_sessions(request.session["user"], actor=request.session["user"], reason="logout")
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @app.get("/")
    def home(request: Request):
        current_user(request)
        return RedirectResponse("/queue", status_code=303)

    @app.get("/queue")
    def queue(request: Request):
        user = current_user(request)
        return render(request, "queue.html", user, assignments=store.queue(user.name))

    @app.post("/queue")
    def fill_queue(request: Request, csrf_token: str = Form("")):
        """Assignments change state, so they are handed out on POST (log-in, a finished review, the
        button), never on a GET a prefetch or a crawler could send."""
        check_csrf(request, csrf_token)
        user = current_user(request)
        store.fill_queue(user.name)
        return RedirectResponse("/queue", status_code=303)

    @app.get("/items/{item_id}")
    def item_page(request: Request, item_id: int):
        user = current_user(request)
        item, assignment = store.item_for(user.name, item_id)
        if assignment is None or assignment.completed_at is not None:
            if user.role in ("adjudicator", "admin") and item.status == "escalated":
                return RedirectResponse(f"/escalations/{item_id}", status_code=303)
            raise NotFound(f"item {item_id} is not in {user.name}'s open queue")
        return render(request, "item.html", user, item=item, rubric=store.rubric(assignment.rubric_id))

    @app.post("/items/{item_id}/review")
    def review(request: Request, item_id: int, label: str = Form(""), rationale: str = Form(""),
               csrf_token: str = Form("")):
        check_csrf(request, csrf_token)
        return item_action(request, item_id, lambda name: store.submit_review(name, item_id, label, rationale))

    @app.post("/items/{item_id}/escalate")
    def escalate(request: Request, item_id: int, reason: str = Form(""), csrf_token: str = Form("")):
        check_csrf(request, csrf_token)
        return item_action(request, item_id, lambda name: store.escalate(name, item_id, reason))

    @app.get("/escalations")
    def escalations(request: Request):
        user = current_user(request, "adjudicator", "admin")
        return render(request, "escalations.html", user, escalations=store.escalations())

    @app.get("/escalations/{item_id}")
    def escalation_page(request: Request, item_id: int):
        return show_escalation(request, item_id)

    def show_escalation(request: Request, item_id: int, error: str | None = None, status_code: int = 200):
        user = current_user(request, "adjudicator", "admin")
        found = [e for e in store.escalations() if e["item"].id == item_id]
        if not found:
            raise NotFound(f"item {item_id} is not waiting for adjudication")
        return render(request, "adjudicate.html", user, status_code=status_code, error=error, **found[0],
                      rubric=store.current_rubric())

    @app.post("/escalations/{item_id}/adjudicate")
    def adjudicate(request: Request, item_id: int, label: str = Form(""), rationale: str = Form(""),
                   csrf_token: str = Form("")):
        check_csrf(request, csrf_token)
        user = current_user(request, "adjudicator", "admin")
        try:
            store.adjudicate(user.name, item_id, label, rationale)
        except (NotFound, Forbidden):
            raise
        except ImmunizerError as exc:
            return show_escalation(request, item_id, error=str(exc), status_code=400)
        return RedirectResponse("/escalations", status_code=303)

    @app.get("/dashboard")
    def dashboard(request: Request):
        user = current_user(request, "admin")
        return render(request, "dashboard.html", user, stats=store.stats())

    return app
