"""The review store: the Python API over the database (SQLite file by default, PostgreSQL by URL).

Every write is one transaction that also appends to the audit log, so the log and the data
cannot disagree. Workflows (triage, escalation, reviewer accuracy, label shift) are pure functions in
their own modules; this class feeds them rows and writes back what they decide.

    store = ReviewStore("review.db")                      # migrates to the latest schema
    store.add_user("ana", "reviewer", password="…")
    store.add_items(parse_file("incidents.jsonl").records)
    for assignment, item in store.fill_queue("ana"): ...
    store.submit_review("ana", item.id, "harmful", "step 40 canary drift 8x")
    store.adjudicated_items(consented_only=True)          # what the feedback loop trains on
"""
from __future__ import annotations

import contextlib
import datetime as dt
import importlib.resources
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import create_engine, event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from immunizer.errors import ImmunizerError
from immunizer.json_hash import json_sha256
from immunizer.review import escalation, label_shift, reviewer_accuracy, triage
from immunizer.review.config import ReviewConfig
from immunizer.review.importer import ItemRecord
from immunizer.review.models import (ROLES, Adjudication, Assignment, AuditEntry, Escalation, GoldLabel, Item, Review,
                                     Rubric, User, utcnow)

DEFAULT_RUBRIC = "default"
DEFAULT_LABELS = ["harmful", "over_refusal", "benign", "unclear"]
MIN_PASSWORD_LENGTH = 8
MAX_FAILED_LOGINS = 5
LOCKOUT = dt.timedelta(minutes=15)
ARGON2_AT_ONCE = 4
"""Password hashes computed at once: each takes 64 MiB, so a login flood queues instead of exhausting memory."""
_hasher = PasswordHasher()
ARGON2_WAIT_SECONDS = 10.0
_argon2_slots = threading.BoundedSemaphore(ARGON2_AT_ONCE)


class NotFound(ImmunizerError):
    """The item does not exist, or the user may not see it (the two are not told apart)."""


class Forbidden(ImmunizerError):
    """The user's role does not allow the action."""


class Busy(ImmunizerError):
    """Too many password checks are running; the caller should try again shortly."""


def _argon2(work, *args):
    if not _argon2_slots.acquire(timeout=ARGON2_WAIT_SECONDS):
        raise Busy("the server is checking too many passwords at once; try again in a minute")
    try:
        return work(*args)
    finally:
        _argon2_slots.release()


def redact_url(url: str | None) -> str | None:
    """A database URL without its password (error messages and manifests get shared)."""
    if url is None or "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}@{host}"


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)  # SQLite drops the zone


@dataclass(frozen=True)
class AdjudicatedItem:
    """One closed item as the feedback loop needs it."""
    item_id: int
    kind: str
    payload: dict
    label: str
    rationale: str
    method: str
    rubric_name: str
    rubric_version: int
    rubric_sha256: str
    consent: bool
    provenance: dict
    severity: str = "medium"
    agreeing_reviews: int = 0
    """Reviews that chose the final label (a consensus trains only with two or more)."""


def database_url(url: str) -> str:
    """A bare path means a SQLite file; postgresql:// uses psycopg 3."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlite_engine(url: str):
    engine = create_engine(url, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        # let SQLAlchemy's BEGIN below decide transactions (pysqlite's own would defer the lock)
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA foreign_keys=ON")
        dbapi_connection.execute("PRAGMA busy_timeout=60000")

    @event.listens_for(engine, "begin")
    def _begin(connection):
        # take the write lock up front: two writers that both read first would otherwise deadlock
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _shift_between_last_two(groups: dict, keys: list, names: dict) -> dict | None:
    """The chi-square shift test between the last two groups (rubric versions or weeks)."""
    if len(keys) < 2:
        return None
    before, after = keys[-2], keys[-1]
    result = label_shift.shift_test(label_shift.label_counts(groups[before]), label_shift.label_counts(groups[after]))
    return None if result is None else result | {"before": names[before], "after": names[after]}


def alembic_config(connection) -> Config:
    """Alembic's configuration for the migrations shipped in the package (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(importlib.resources.files("immunizer.review") / "migrations"))
    config.attributes["connection"] = connection
    return config


def content_sha256(kind: str, payload: dict) -> str:
    return json_sha256([kind, payload])


class ReviewStore:
    def __init__(self, url: str, config: ReviewConfig | None = None, migrate: bool = True):
        self.url = database_url(url)
        self.config = config or ReviewConfig()
        if self.url.startswith("sqlite"):
            self.engine = _sqlite_engine(self.url)
        elif self.url.startswith("postgresql"):
            self.engine = create_engine(self.url, pool_pre_ping=True)
        else:
            raise ImmunizerError(f"unsupported database URL {redact_url(url)!r}: use a file path (SQLite) or "
                                 "postgresql://…")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.migrate()

    # -- plumbing ---------------------------------------------------------------------------
    def migrate(self) -> None:
        """Bring the schema to the latest Alembic revision and seed the default rubric."""
        try:
            with self.engine.begin() as connection:
                command.upgrade(alembic_config(connection), "head")
        except Exception as exc:
            if type(exc).__module__.startswith(("sqlalchemy", "psycopg", "sqlite3")):
                detail = str(exc).splitlines()[0] if str(exc) else ""
                if self.engine.url.password:  # drivers may quote the connection string back
                    detail = detail.replace(str(self.engine.url.password), "***")
                raise ImmunizerError(f"cannot open the review database {redact_url(self.url)}: "
                                     f"{exc.__class__.__name__}: {detail}. Check the URL and that the server "
                                     "is running.") from None
            raise
        with self._write() as session:
            if session.scalar(select(func.count()).select_from(Rubric)) == 0:
                text = (importlib.resources.files("immunizer.review") / "rubrics" / "default.md").read_text()
                self._add_rubric(session, DEFAULT_RUBRIC, text, DEFAULT_LABELS, actor="system")

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _write(self):
        with self._sessions() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def _read(self):
        with self._sessions() as session:
            yield session

    @staticmethod
    def _audit(session: Session, actor: str, action: str, entity: str, entity_id: int | None, **detail) -> None:
        session.add(AuditEntry(actor=actor, action=action, entity=entity, entity_id=entity_id, detail=detail))

    @staticmethod
    def _user(session: Session, name: str) -> User:
        user = session.scalar(select(User).where(User.name == name, User.active.is_(True)))
        if user is None:
            raise NotFound(f"no active user {name!r}; add one with `immunizer review user add`")
        return user

    # -- users ------------------------------------------------------------------------------
    def add_user(self, name: str, role: str, password: str) -> User:
        if role not in ROLES:
            raise ImmunizerError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ImmunizerError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters")
        if not name or len(name) > 100:
            raise ImmunizerError("a user name must have 1 to 100 characters")
        try:
            with self._write() as session:
                user = User(name=name, role=role, password_hash=_argon2(_hasher.hash, password))
                session.add(user)
                session.flush()
                self._audit(session, "system", "add_user", "user", user.id, name=name, role=role)
        except IntegrityError:
            raise ImmunizerError(f"user {name!r} already exists; choose another name") from None
        return user

    def authenticate(self, name: str, password: str, address: str | None = None) -> User | None:
        """The user if the password is right and the account is active and not locked; None otherwise.
        Every attempt is audit-logged (`login` / `login_failed`); `MAX_FAILED_LOGINS` failures in a row
        lock the account for `LOCKOUT` (`lock_account`); `user passwd` lifts the lock."""
        with self._read() as session:
            user = session.scalar(select(User).where(User.name == name, User.active.is_(True)))
        locked = user is not None and user.locked_until is not None and _aware(user.locked_until) > utcnow()
        if user is None or locked:
            _argon2(_hasher.hash, password)  # same work as a real check, so timing does not reveal names
            ok = False
        else:
            try:
                ok = _argon2(_hasher.verify, user.password_hash, password)
            except (VerificationError, InvalidHashError):
                ok = False
        with self._write() as session:
            actor = name[:100] or "-"
            if user is None:
                self._audit(session, actor, "login_failed", "user", None, address=address, reason="no such active user")
                return None
            row = session.scalar(select(User).where(User.id == user.id).with_for_update())
            if locked:
                self._audit(session, actor, "login_failed", "user", user.id, address=address, reason="account locked")
                return None
            if not ok:
                row.failed_logins += 1
                self._audit(session, actor, "login_failed", "user", user.id, address=address, reason="wrong password",
                            failures=row.failed_logins)
                if row.failed_logins >= MAX_FAILED_LOGINS:
                    row.locked_until, row.failed_logins = utcnow() + LOCKOUT, 0
                    self._audit(session, "system", "lock_account", "user", user.id, until=row.locked_until.isoformat())
                return None
            row.failed_logins, row.locked_until = 0, None
            self._audit(session, actor, "login", "user", user.id, address=address)
            return row

    def set_password(self, name: str, password: str, actor: str) -> None:
        """A new password; ends the user's sessions and lifts a lockout."""
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ImmunizerError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters")
        password_hash = _argon2(_hasher.hash, password)
        with self._write() as session:
            user = self._user(session, name)
            user.password_hash, user.failed_logins, user.locked_until = password_hash, 0, None
            user.session_epoch += 1
            self._audit(session, actor, "set_password", "user", user.id)

    def end_sessions(self, name: str, actor: str, reason: str) -> None:
        """End every session of the user (logout: a copied or replayed cookie no longer works)."""
        with self._write() as session:
            user = self._user(session, name)
            user.session_epoch += 1
            self._audit(session, actor, "end_sessions", "user", user.id, reason=reason)

    def deactivate_user(self, name: str, actor: str) -> int:
        """No more logins and no open sessions; open assignments are handed back to the pool (returns
        how many). The account stays, so its reviews and the audit log keep their meaning."""
        with self._write() as session:
            user = self._user(session, name)
            user.active = False
            user.session_epoch += 1
            open_assignments = list(session.scalars(select(Assignment).where(
                Assignment.user_id == user.id, Assignment.completed_at.is_(None))))
            for assignment in open_assignments:
                session.delete(assignment)
            self._audit(session, actor, "deactivate_user", "user", user.id,
                        released_items=[a.item_id for a in open_assignments])
            return len(open_assignments)

    def user(self, name: str) -> User:
        with self._read() as session:
            return self._user(session, name)

    # -- rubrics ----------------------------------------------------------------------------
    @staticmethod
    def _add_rubric(session: Session, name: str, text: str, labels: list[str], actor: str) -> Rubric:
        sha = json_sha256([text, labels], sort_keys=False)
        latest = session.scalar(select(Rubric).where(Rubric.name == name).order_by(Rubric.version.desc()).limit(1))
        if latest is not None and latest.sha256 == sha:
            return latest
        rubric = Rubric(name=name, version=(latest.version + 1) if latest else 1, text=text, labels=labels, sha256=sha)
        session.add(rubric)
        session.flush()
        ReviewStore._audit(session, actor, "add_rubric", "rubric", rubric.id, name=name, version=rubric.version,
                           sha256=sha)
        return rubric

    def add_rubric(self, text: str, labels: list[str], name: str = DEFAULT_RUBRIC, actor: str = "system") -> Rubric:
        """A new rubric version (the same text and labels as the latest return the latest)."""
        labels = [label.strip() for label in labels if label.strip()]
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ImmunizerError("a rubric needs at least two distinct labels, e.g. --labels harmful,benign")
        with self._write() as session:
            return self._add_rubric(session, name, text, labels, actor)

    @staticmethod
    def _current_rubric(session: Session, name: str = DEFAULT_RUBRIC) -> Rubric:
        rubric = session.scalar(select(Rubric).where(Rubric.name == name).order_by(Rubric.version.desc()).limit(1))
        if rubric is None:
            raise ImmunizerError(f"no rubric named {name!r}; add one with `immunizer review rubric add`")
        return rubric

    def current_rubric(self, name: str = DEFAULT_RUBRIC) -> Rubric:
        with self._read() as session:
            return self._current_rubric(session, name)

    def rubric(self, rubric_id: int) -> Rubric:
        with self._read() as session:
            return session.get(Rubric, rubric_id)

    # -- items ------------------------------------------------------------------------------
    def add_items(self, records: list[ItemRecord], actor: str = "import") -> dict:
        """Add items in one transaction (all or nothing). Exact repeats of an item already in the
        store are skipped and counted; novelty and priority are computed here (triage)."""
        try:
            return self._add_items(records, actor)
        except IntegrityError:
            raise ImmunizerError("another import added some of the same items at the same moment; nothing was "
                                 "imported from this batch: import it again (items already stored are skipped)") from None

    def _add_items(self, records: list[ItemRecord], actor: str) -> dict:
        cfg = self.config.triage
        added, duplicates, withdrawn = [], 0, []
        with self._write() as session:
            rubric = self._current_rubric(session)
            recent: dict[str, list[frozenset]] = {}
            seen_hashes: set[str] = set()
            for record in records:
                sha = content_sha256(record.kind, record.payload)
                existing = session.scalar(select(Item).where(Item.content_sha256 == sha).limit(1))
                if sha in seen_hashes or existing is not None:
                    duplicates += 1
                    # a repeat that says `consent: false` is the owner taking consent back; a later
                    # `consent: true` does not restore it (withdrawal is final, as a person would expect)
                    if existing is not None and record.consent is False and existing.consent:
                        withdrawn += self._withdraw(session, [existing], actor, "re-imported with consent: false")
                    continue
                seen_hashes.add(sha)
                if record.kind not in recent:
                    rows = session.scalars(select(Item.payload).where(Item.kind == record.kind)
                                           .order_by(Item.id.desc()).limit(cfg.novelty_window))
                    recent[record.kind] = [triage.text_tokens(p) for p in rows]
                tokens = triage.text_tokens(record.payload)
                novelty = triage.novelty(tokens, recent[record.kind][-cfg.novelty_window:])
                recent[record.kind].append(tokens)
                if record.gold_label is not None and record.gold_label not in rubric.labels:
                    raise ImmunizerError(f"gold label {record.gold_label!r} is not in rubric {rubric.name} "
                                         f"v{rubric.version} ({', '.join(rubric.labels)}); nothing was imported")
                item = Item(
                    kind=record.kind, payload=record.payload, content_sha256=sha, severity=record.severity,
                    judge_confidence=record.judge_confidence, novelty=novelty,
                    priority=triage.priority(record.severity, record.judge_confidence, novelty, cfg),
                    required_reviews=triage.reviewers_needed(record.severity, cfg),
                    # gold items are never triaged: they only appear as calibration assignments
                    status="closed" if record.gold_label is not None else "open",
                    consent=record.consent, source=record.source, model_sha256=record.model_sha256,
                    data_version=record.data_version, prompt_template=record.prompt_template,
                    decoding=record.decoding)
                session.add(item)
                session.flush()
                if record.gold_label is not None:
                    session.add(GoldLabel(item_id=item.id, rubric_id=rubric.id, label=record.gold_label))
                added.append(item.id)
            self._audit(session, actor, "add_items", "item", None, count=len(added), duplicates=duplicates,
                        first_id=added[0] if added else None, last_id=added[-1] if added else None)
        return {"added": len(added), "duplicates_skipped": duplicates, "item_ids": added, "consent_withdrawn": withdrawn}

    def _withdraw(self, session: Session, items: list[Item], actor: str, reason: str) -> list[int]:
        changed = [item for item in items if item.consent]
        for item in changed:
            item.consent = False
            self._audit(session, actor, "withdraw_consent", "item", item.id, reason=reason)
        session.flush()
        return [item.id for item in changed]

    def withdraw_consent(self, item_ids: list[int], actor: str, reason: str) -> list[int]:
        """Take back consent for these items: the next data selection leaves them out (what a release
        already learnt from them stays in its dataset.json, so it can be traced). Returns the ids that
        changed; unknown ids raise NotFound and change nothing."""
        if not reason.strip():
            raise ImmunizerError("say why consent is withdrawn (e.g. the user's request id); it goes to the audit log")
        with self._write() as session:
            items = list(session.scalars(select(Item).where(Item.id.in_(item_ids)).with_for_update()))
            missing = sorted(set(item_ids) - {item.id for item in items})
            if missing:
                raise NotFound(f"no item(s) {', '.join(map(str, missing))}; nothing was changed")
            return self._withdraw(session, items, actor, reason.strip())

    def item(self, item_id: int) -> Item:
        with self._read() as session:
            item = session.get(Item, item_id)
            if item is None:
                raise NotFound(f"no item {item_id}")
            return item

    def item_for(self, user_name: str, item_id: int) -> tuple[Item, Assignment | None]:
        """The item as `user_name` may see it: reviewers only their own assignments; adjudicators
        and admins also items waiting for adjudication (admins: everything)."""
        with self._read() as session:
            user = self._user(session, user_name)
            item = session.get(Item, item_id)
            assignment = session.scalar(select(Assignment).where(
                Assignment.item_id == item_id, Assignment.user_id == user.id).order_by(Assignment.id.desc()).limit(1))
            allowed = item is not None and (assignment is not None or user.role == "admin"
                                            or (user.role == "adjudicator" and item.status != "open"))
            if not allowed:
                raise NotFound(f"item {item_id} is not in {user_name}'s queue")
            return item, assignment

    # -- triage: queues ---------------------------------------------------------------------
    def fill_queue(self, user_name: str) -> list[tuple[Assignment, Item]]:
        """Top the user's open assignments up to `queue_size`, highest priority first, mixing in
        one gold item after every `gold_every` triage assignments; return the open queue."""
        for attempt in range(3):
            try:
                self._fill_queue(user_name)
                break
            except IntegrityError:
                # the same user's other tab added the same assignment at the same moment: what it
                # added is in the queue now, so filling again picks up from there
                if attempt == 2:
                    raise ImmunizerError(f"{user_name}'s queue is being filled from several places at once; "
                                         "reload the page") from None
        return self.queue(user_name)

    def _fill_queue(self, user_name: str) -> None:
        cfg = self.config.triage
        with self._write() as session:
            user = self._user(session, user_name)
            rubric = self._current_rubric(session)
            mine = select(Assignment.item_id).where(Assignment.user_id == user.id)
            open_count = session.scalar(select(func.count()).select_from(Assignment).where(
                Assignment.user_id == user.id, Assignment.completed_at.is_(None)))
            counts = dict(session.execute(select(Assignment.reason, func.count()).where(
                Assignment.user_id == user.id).group_by(Assignment.reason)).all())
            n_triage, n_gold = counts.get("triage", 0), counts.get("gold", 0)
            need = cfg.queue_size - open_count
            new = []
            while need > 0:
                gold_due = cfg.gold_every and n_triage // cfg.gold_every > n_gold
                if gold_due:
                    gold = session.scalar(select(GoldLabel.item_id).where(GoldLabel.item_id.not_in(mine))
                                          .order_by(GoldLabel.item_id).limit(1))
                    if gold is not None:
                        new.append(Assignment(item_id=gold, user_id=user.id, rubric_id=rubric.id, reason="gold"))
                        n_gold += 1
                        need -= 1
                        session.add(new[-1])
                        session.flush()
                        continue
                taken = (select(func.count()).select_from(Assignment)
                         .where(Assignment.item_id == Item.id, Assignment.reason == "triage").scalar_subquery())
                candidates = session.scalars(
                    select(Item).where(Item.status == "open", Item.id.not_in(mine), taken < Item.required_reviews)
                    .order_by(Item.priority.desc(), Item.id)
                    .limit(min(need, cfg.gold_every - n_triage % cfg.gold_every) if cfg.gold_every else need)
                    # two reviewers topping up at once must not both take an item's last slot
                    .with_for_update(skip_locked=True, of=Item)).all()
                if not candidates:
                    break
                # The count above was read when the statement began: another filler may have taken a
                # slot and committed before this one got the row lock (PostgreSQL does not re-check a
                # condition on other rows). Counted again now, under the lock, it is exact.
                taken_now = dict(session.execute(
                    select(Assignment.item_id, func.count()).where(
                        Assignment.item_id.in_([item.id for item in candidates]), Assignment.reason == "triage")
                    .group_by(Assignment.item_id)).all())
                candidates = [item for item in candidates if taken_now.get(item.id, 0) < item.required_reviews]
                for item in candidates:
                    new.append(Assignment(item_id=item.id, user_id=user.id, rubric_id=rubric.id, reason="triage"))
                    session.add(new[-1])
                n_triage += len(candidates)
                need -= len(candidates)
                session.flush()
            if new:
                self._audit(session, user_name, "assign", "assignment", None,
                            items=[a.item_id for a in new], reasons=[a.reason for a in new])

    def queue(self, user_name: str) -> list[tuple[Assignment, Item]]:
        with self._read() as session:
            user = self._user(session, user_name)
            rows = session.execute(select(Assignment, Item).join(Item, Item.id == Assignment.item_id).where(
                Assignment.user_id == user.id, Assignment.completed_at.is_(None))
                .order_by(Item.priority.desc(), Assignment.id)).all()
            return [(a, i) for a, i in rows]

    def assign_many(self, pairs: list[tuple[str, int]], reason: str = "triage", actor: str = "system") -> int:
        """Hand items to users directly, (user name, item id) pairs, in one transaction (bulk set-ups)."""
        with self._write() as session:
            rubric = self._current_rubric(session)
            users = {u.name: u.id for u in session.scalars(select(User).where(User.active.is_(True)))}
            missing = sorted({name for name, _ in pairs} - set(users))
            if missing:
                raise NotFound(f"no active user(s) {', '.join(missing)}; add them with `immunizer review user add`")
            session.add_all([Assignment(item_id=item_id, user_id=users[name], rubric_id=rubric.id, reason=reason)
                             for name, item_id in pairs])
            self._audit(session, actor, "assign", "assignment", None, count=len(pairs), reason=reason)
        return len(pairs)

    # -- reviews, escalation, adjudication -----------------------------------------------------
    def submit_review(self, user_name: str, item_id: int, label: str, rationale: str = "") -> Review:
        """Record a label under the assignment's rubric version. When the item's review round is
        complete, the escalation rules decide: to an adjudicator, or closed by consensus."""
        with self._write() as session:
            user = self._user(session, user_name)
            # lock the item: the last two reviews of a round may arrive at once
            item = session.scalar(select(Item).where(Item.id == item_id).with_for_update())
            assignment = session.scalar(select(Assignment).where(
                Assignment.item_id == item_id, Assignment.user_id == user.id, Assignment.completed_at.is_(None))
                .order_by(Assignment.id).limit(1))
            if item is None or assignment is None:
                raise NotFound(f"item {item_id} is not in {user_name}'s open queue (already reviewed, or not assigned)")
            rubric = session.get(Rubric, assignment.rubric_id)
            if label not in rubric.labels:
                raise ImmunizerError(f"label {label!r} is not in rubric {rubric.name} v{rubric.version}; "
                                     f"choose one of {', '.join(rubric.labels)}")
            review = Review(item_id=item_id, user_id=user.id, rubric_id=rubric.id, label=label, rationale=rationale)
            session.add(review)
            assignment.completed_at = utcnow()
            session.flush()
            self._audit(session, user_name, "review", "review", review.id, item=item_id, label=label,
                        rubric_version=rubric.version)
            if assignment.reason == "triage" and item.status == "open":
                self._close_round_if_complete(session, item)
            return review

    def _close_round_if_complete(self, session: Session, item: Item) -> None:
        rows = session.execute(
            select(User.name, Review.label, Review.rubric_id).join(
                Assignment, (Assignment.item_id == Review.item_id) & (Assignment.user_id == Review.user_id)
                & (Assignment.rubric_id == Review.rubric_id))
            .join(User, User.id == Review.user_id)
            .where(Review.item_id == item.id, Assignment.reason == "triage")).all()
        if len(rows) < item.required_reviews:
            return
        names, labels = [r[0] for r in rows], [r[1] for r in rows]
        flagged = set(reviewer_accuracy.flagged_reviewers(self._accuracy(session, names), self.config.reviewer_accuracy))
        reasons = escalation.escalation_reasons(item.severity, labels, sorted(flagged & set(names)),
                                                self.config.escalation)
        label, share = escalation.majority(labels)
        reasons += escalation.over_refusal_reasons(label, item.severity, item.payload)
        if reasons:
            self._escalate(session, item, reasons, actor="rules")
        else:
            # recorded under the rubric the reviews were made under (the newest of them if a round
            # spans a rubric change), not whatever version is current when the round closes
            rubric = session.get(Rubric, max(r[2] for r in rows if r[1] == label))
            self._record_adjudication(session, item, None, rubric, label, method="consensus", actor="rules",
                                      rationale=f"consensus: {share:.0%} of {len(labels)} reviewers chose {label}")

    def _escalate(self, session: Session, item: Item, reasons: list[str], actor: str) -> None:
        escalation_row = Escalation(item_id=item.id, reasons=reasons)
        session.add(escalation_row)
        item.status = "escalated"
        session.flush()
        self._audit(session, actor, "escalate", "item", item.id, reasons=reasons)

    def escalate(self, user_name: str, item_id: int, reason: str) -> None:
        """A reviewer sends an item in their queue straight to the adjudicators."""
        if not reason.strip():
            raise ImmunizerError("say why the item needs an adjudicator (the reason is shown to them)")
        with self._write() as session:
            user = self._user(session, user_name)
            item = session.scalar(select(Item).where(Item.id == item_id).with_for_update())
            assignment = session.scalar(select(Assignment).where(
                Assignment.item_id == item_id, Assignment.user_id == user.id, Assignment.completed_at.is_(None)))
            if item is None or assignment is None:
                raise NotFound(f"item {item_id} is not in {user_name}'s open queue")
            assignment.completed_at = utcnow()
            if item.status == "open":
                self._escalate(session, item, [f"{user_name}: {reason.strip()}"], actor=user_name)
            else:
                self._audit(session, user_name, "escalate", "item", item.id, reasons=[reason.strip()])

    def escalations(self, open_only: bool = True) -> list[dict]:
        with self._read() as session:
            query = select(Escalation, Item).join(Item, Item.id == Escalation.item_id)
            if open_only:
                query = query.where(Escalation.resolved_at.is_(None))
            rows = session.execute(query.order_by(Item.priority.desc(), Escalation.id)).all()
            return [{"escalation": e, "item": i, "reviews": self._reviews_of(session, i.id)} for e, i in rows]

    @staticmethod
    def _reviews_of(session: Session, item_id: int) -> list[dict]:
        rows = session.execute(select(Review, User.name, Rubric.version).join(User, User.id == Review.user_id)
                               .join(Rubric, Rubric.id == Review.rubric_id)
                               .where(Review.item_id == item_id).order_by(Review.id)).all()
        return [{"reviewer": name, "label": r.label, "rationale": r.rationale, "rubric_version": version,
                 "time": r.created_at} for r, name, version in rows]

    def reviews_of(self, item_id: int) -> list[dict]:
        with self._read() as session:
            return self._reviews_of(session, item_id)

    def adjudicate(self, user_name: str, item_id: int, label: str, rationale: str) -> Adjudication:
        """The final label with its rationale; closes the item."""
        if not rationale.strip():
            raise ImmunizerError("an adjudication needs a rationale: say which evidence decided the label")
        with self._write() as session:
            user = self._user(session, user_name)
            if user.role not in ("adjudicator", "admin"):
                raise Forbidden(f"{user_name} is a {user.role}; only adjudicators and admins adjudicate")
            item = session.scalar(select(Item).where(Item.id == item_id).with_for_update())
            if item is None or item.gold is not None:
                raise NotFound(f"no item {item_id} to adjudicate")
            if item.status == "closed":
                raise ImmunizerError(f"item {item_id} is already closed; its final label stands")
            if item.status != "escalated":
                # otherwise one account could label an unreviewed item straight into the training data
                raise ImmunizerError(f"item {item_id} is {item.status}, not escalated: adjudicators decide only items "
                                     "the escalation rules or a reviewer sent them; let the reviewers label it first")
            rubric = self._current_rubric(session)
            if label not in rubric.labels:
                raise ImmunizerError(f"label {label!r} is not in rubric {rubric.name} v{rubric.version}; "
                                     f"choose one of {', '.join(rubric.labels)}")
            return self._record_adjudication(session, item, user, rubric, label, rationale.strip(),
                                             method="adjudicator", actor=user_name)

    def _record_adjudication(self, session, item, user, rubric, label, rationale, method, actor) -> Adjudication:
        adjudication = Adjudication(item_id=item.id, user_id=user.id if user else None, rubric_id=rubric.id,
                                    label=label, rationale=rationale, method=method)
        session.add(adjudication)
        for open_escalation in session.scalars(select(Escalation).where(Escalation.item_id == item.id,
                                                                         Escalation.resolved_at.is_(None))):
            open_escalation.resolved_at = utcnow()
        item.status = "closed"
        session.flush()
        self._audit(session, actor, "adjudicate", "item", item.id, label=label, method=method,
                    rubric_version=rubric.version)
        return adjudication

    def adjudicated_items(self, consented_only: bool = True, include_consensus: bool = True) -> list[AdjudicatedItem]:
        """Closed items with their final label, rationale, rubric version and provenance, oldest
        first: the input of the feedback-to-training loop (which wants `consented_only=True`)."""
        with self._read() as session:
            query = (select(Adjudication, Item, Rubric).join(Item, Item.id == Adjudication.item_id)
                     .join(Rubric, Rubric.id == Adjudication.rubric_id).order_by(Adjudication.id))
            if consented_only:
                query = query.where(Item.consent.is_(True))
            if not include_consensus:
                query = query.where(Adjudication.method == "adjudicator")
            agreeing = dict(((item_id, label), n) for item_id, label, n in session.execute(
                select(Review.item_id, Review.label, func.count()).group_by(Review.item_id, Review.label)).all())
            return [AdjudicatedItem(
                item_id=i.id, kind=i.kind, payload=i.payload, label=a.label, rationale=a.rationale, method=a.method,
                rubric_name=r.name, rubric_version=r.version, rubric_sha256=r.sha256, consent=i.consent,
                provenance={"source": i.source, "model_sha256": i.model_sha256, "data_version": i.data_version,
                            "prompt_template": i.prompt_template, "decoding": i.decoding},
                severity=i.severity, agreeing_reviews=agreeing.get((i.id, a.label), 0))
                for a, i, r in session.execute(query).all()]

    # -- rubric drift: re-review ---------------------------------------------------------------
    def request_rereview(self, fraction: float, seed: int = 0, actor: str = "system") -> list[int]:
        """After a rubric change: a seeded sample of items closed under older versions is handed
        again, under the current version, to the least-loaded reviewer who has not seen it."""
        with self._write() as session:
            rubric = self._current_rubric(session)
            closed = session.scalars(select(Adjudication.item_id).where(Adjudication.rubric_id != rubric.id)
                                     .order_by(Adjudication.item_id)).all()
            reviewers = session.scalars(select(User).where(User.role == "reviewer", User.active.is_(True))
                                        .order_by(User.id)).all()
            load = {u.id: session.scalar(select(func.count()).select_from(Assignment).where(
                Assignment.user_id == u.id, Assignment.completed_at.is_(None))) for u in reviewers}
            chosen = []
            for item_id in label_shift.rereview_sample(list(closed), fraction, seed):
                seen = set(session.scalars(select(Assignment.user_id).where(Assignment.item_id == item_id)))
                free = [u for u in reviewers if u.id not in seen]
                if not free:
                    continue
                user = min(free, key=lambda u: (load[u.id], u.id))
                session.add(Assignment(item_id=item_id, user_id=user.id, rubric_id=rubric.id, reason="re-review"))
                load[user.id] += 1
                chosen.append(item_id)
            self._audit(session, actor, "request_rereview", "rubric", rubric.id, items=chosen, fraction=fraction,
                        seed=seed)
            return chosen

    # -- reviewer accuracy and statistics ------------------------------------------------------------
    @staticmethod
    def _accuracy(session: Session, names: list[str] | None = None) -> dict[str, dict]:
        query = (select(User.name, Review.label, GoldLabel.label).join(User, User.id == Review.user_id)
                 .join(GoldLabel, GoldLabel.item_id == Review.item_id))
        if names is not None:
            query = query.where(User.name.in_(names))
        return reviewer_accuracy.reviewer_accuracy([tuple(r) for r in session.execute(query).all()])

    def stats(self) -> dict:
        """Queue sizes, agreement (α, κ, accuracy on gold, flagged reviewers) and drift, as JSON-ready data."""
        cal = self.config.reviewer_accuracy
        with self._read() as session:
            status_counts = dict(session.execute(select(Item.status, func.count()).where(
                Item.id.not_in(select(GoldLabel.item_id))).group_by(Item.status)).all())
            pending = dict(session.execute(select(User.name, func.count()).select_from(Assignment)
                                           .join(User, User.id == Assignment.user_id)
                                           .where(Assignment.completed_at.is_(None)).group_by(User.name)).all())
            rows = session.execute(
                select(Review.item_id, Review.rubric_id, Review.label, Review.created_at, User.name, Rubric.version)
                .join(User, User.id == Review.user_id).join(Rubric, Rubric.id == Review.rubric_id)
                .where(Review.item_id.not_in(select(GoldLabel.item_id))).order_by(Review.id)).all()
            accuracy = self._accuracy(session)
            rubric_names = {r.id: f"{r.name} v{r.version}" for r in session.scalars(select(Rubric))}
            rereviews = session.execute(
                select(Review.label, Adjudication.label).join(Assignment, (Assignment.item_id == Review.item_id)
                                                            & (Assignment.user_id == Review.user_id)
                                                            & (Assignment.rubric_id == Review.rubric_id))
                .join(Adjudication, Adjudication.item_id == Review.item_id)
                .where(Assignment.reason == "re-review")).all()
        ratings: dict = defaultdict(dict)
        by_rubric: dict = defaultdict(list)
        by_period: dict = defaultdict(list)
        for item_id, rubric_id, label, created, name, _ in rows:
            ratings[(item_id, rubric_id)][name] = label
            by_rubric[rubric_id].append(label)
            by_period[label_shift.period_key(created)].append(label)
        versions = sorted(by_rubric)
        periods = sorted(by_period)
        return {
            "queue": {"open": status_counts.get("open", 0), "escalated": status_counts.get("escalated", 0),
                      "closed": status_counts.get("closed", 0), "pending_assignments": dict(sorted(pending.items()))},
            "agreement": {
                "reviews": len(rows),
                "krippendorff_alpha": reviewer_accuracy.krippendorff_alpha(ratings),
                "cohen_kappa": reviewer_accuracy.cohen_kappa_pairs(ratings, cal.min_pair_overlap),
                "reviewer_accuracy_on_gold": accuracy,
                "flagged_reviewers": reviewer_accuracy.flagged_reviewers(accuracy, cal),
                "accuracy_threshold": cal.accuracy_threshold,
            },
            "drift": {
                "by_rubric_version": {rubric_names[v]: label_shift.label_counts(by_rubric[v]) for v in versions},
                "rubric_shift": _shift_between_last_two(by_rubric, versions, rubric_names),
                "by_week": {p: label_shift.label_counts(by_period[p]) for p in periods},
                "week_shift": _shift_between_last_two(by_period, periods, {p: p for p in periods}),
                "rereview_agreement_with_final_label": (
                    round(sum(a == b for a, b in rereviews) / len(rereviews), 4) if rereviews else None),
                "rereviews": len(rereviews),
            },
        }

    def record_event(self, actor: str, action: str, entity: str, entity_id: int | None = None, **detail) -> None:
        """Append one entry to the audit log for something that happened outside the store (a release
        gate verdict, a training-data selection), so the log holds what was decided with what."""
        with self._write() as session:
            self._audit(session, actor, action, entity, entity_id, **detail)

    def rubrics(self) -> list[Rubric]:
        with self._read() as session:
            return list(session.scalars(select(Rubric).order_by(Rubric.name, Rubric.version)))

    def audit_log(self, limit: int | None = None) -> list[AuditEntry]:
        with self._read() as session:
            query = select(AuditEntry).order_by(AuditEntry.id)
            return list(session.scalars(query.limit(limit) if limit else query))
