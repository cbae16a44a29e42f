"""Example domain in the spirit of a manufacturing execution system: a table of
commands for machines on a shop floor. One job enqueues commands, one processes
pending ones in batches, one purges old processed ones.

Job functions receive their own Session and never commit, roll back or close
it: the worker does that, and retries the whole job on a transient error.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from sqlalchemy import DateTime, Index, Integer, String, delete, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from worker.db import create_tables

log = logging.getLogger(__name__)

PENDING, DONE = "pending", "done"
MACHINES = ("press-1", "press-2", "lathe-1", "mill-1")
ACTIONS = ("start", "stop", "calibrate", "report")


class Base(DeclarativeBase):
    pass


class Command(Base):
    __tablename__ = "commands"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    machine: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    result: Mapped[str | None] = mapped_column(String(200), nullable=True)

    __table_args__ = (Index("ix_commands_status_id", "status", "id"),)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # stored as naive UTC


def ensure_schema(session: Session) -> None:
    """Create the commands table if missing; safe when several jobs race to do it."""
    create_tables(session.connection(), Base.metadata)


def enqueue_commands(session: Session, count: int = 20) -> int:
    """Add `count` pending commands, spread over the machines."""
    ensure_schema(session)
    now = _now()
    session.add_all(
        Command(machine=MACHINES[i % len(MACHINES)], action=ACTIONS[i % len(ACTIONS)],
                status=PENDING, created_at=now)
        for i in range(count))
    log.info("enqueued %d commands", count)
    return count


def process_pending(session: Session, batch_size: int = 100) -> int:
    """Process up to `batch_size` pending commands, oldest first."""
    ensure_schema(session)
    pending = session.scalars(
        select(Command).where(Command.status == PENDING).order_by(Command.id)
        .limit(batch_size).with_for_update(skip_locked=True)).all()
    now = _now()
    for command in pending:
        command.status = DONE
        command.processed_at = now
        command.result = f"{command.action} sent to {command.machine}"
    log.info("processed %d pending commands", len(pending))
    return len(pending)


def purge_processed(session: Session, keep_days: float = 7) -> int:
    """Delete processed commands older than `keep_days` days."""
    ensure_schema(session)
    cutoff = _now() - timedelta(days=keep_days)
    deleted = session.execute(
        delete(Command).where(Command.status == DONE, Command.processed_at < cutoff)
    ).rowcount
    log.info("purged %d processed commands older than %g days", deleted, keep_days)
    return deleted
