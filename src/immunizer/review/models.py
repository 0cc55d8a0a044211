"""The review store's tables (SQLAlchemy 2). The schema itself is created by the Alembic
migrations in `migrations/`; these classes are how the code reads and writes it."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, event)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("reviewer", "adjudicator", "admin")
SEVERITIES = ("low", "medium", "high", "critical")
# open: waiting for reviews; escalated: waiting for an adjudicator; closed: final label recorded.
ITEM_STATUSES = ("open", "escalated", "closed")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class Rubric(Base):
    """One version of the labelling policy. Rows are never edited: a change is a new version."""

    __tablename__ = "rubrics"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    labels: Mapped[list] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Failed logins since the last success; at the limit the account locks for a while (store.py)."""
    locked_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    session_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Session cookies carry the epoch they were issued in; raising it ends every session of the user."""


class Item(Base):
    """Something a human should look at, with where it came from (provenance) and consent."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(50), index=True)
    payload: Mapped[dict] = mapped_column(JSON)
    content_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # re-imports skip repeats
    severity: Mapped[str] = mapped_column(String(20))
    judge_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    novelty: Mapped[float] = mapped_column(Float, default=1.0)
    priority: Mapped[float] = mapped_column(Float, index=True)
    required_reviews: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="open", index=True)
    consent: Mapped[bool] = mapped_column(Boolean)
    # provenance
    source: Mapped[str] = mapped_column(String(200))
    model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    data_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prompt_template: Mapped[str | None] = mapped_column(Text, nullable=True)
    decoding: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    gold: Mapped[GoldLabel | None] = relationship(back_populates="item", uselist=False)


class GoldLabel(Base):
    """A known answer: gold items are mixed into queues to measure each reviewer's accuracy."""

    __tablename__ = "gold_labels"
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)
    rubric_id: Mapped[int] = mapped_column(ForeignKey("rubrics.id"))
    label: Mapped[str] = mapped_column(String(100))
    item: Mapped[Item] = relationship(back_populates="gold")


class Assignment(Base):
    """Item handed to a reviewer under a rubric version; reason: triage, gold or re-review."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "user_id", "rubric_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    rubric_id: Mapped[int] = mapped_column(ForeignKey("rubrics.id"))
    reason: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Review(Base):
    __tablename__ = "reviews"
    # one review per reviewer, item and rubric version: a resubmission cannot double-count
    __table_args__ = (UniqueConstraint("item_id", "user_id", "rubric_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    rubric_id: Mapped[int] = mapped_column(ForeignKey("rubrics.id"), index=True)
    label: Mapped[str] = mapped_column(String(100))
    rationale: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Escalation(Base):
    __tablename__ = "escalations"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    reasons: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Adjudication(Base):
    """The final label of an item. method: `adjudicator` (a person decided) or `consensus`
    (the reviewers agreed and no escalation rule fired; user_id is then null)."""

    __tablename__ = "adjudications"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), unique=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    rubric_id: Mapped[int] = mapped_column(ForeignKey("rubrics.id"))
    label: Mapped[str] = mapped_column(String(100))
    rationale: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEntry(Base):
    """Append-only: the migration adds database triggers that refuse UPDATE and DELETE."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(50))
    entity: Mapped[str] = mapped_column(String(50))
    entity_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


@event.listens_for(Rubric, "before_update")
def _rubrics_are_immutable(mapper, connection, target):
    raise ValueError("rubric versions are immutable: add a new version with ReviewStore.add_rubric")
