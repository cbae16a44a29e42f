"""The database layer: one engine, one sessionmaker, one scoped Session registry.

`Session` below is the only Session registry in the process. Job code that uses
the old global style (`Session.query(...)`) gets the Session of the job running
in its thread, because the runner calls the registry inside that thread and
clears it (`Session.remove()`) when the job ends.
"""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import scoped_session, sessionmaker

from .config import DatabaseSettings, masked_url
from .errors import Diagnosis, ExtraCodes, classify, is_disconnect

log = logging.getLogger("worker.db")

# The one registry. It is created unbound (no engine, no connection, no work at
# import time) so that `from worker import Session` works anywhere; Database
# binds it to its engine.
Session = scoped_session(sessionmaker())


class Database:
    """Engine + the registry's binding + error classification for one URL."""

    def __init__(self, settings: DatabaseSettings, extra_codes: ExtraCodes | None = None,
                 registry: scoped_session = Session) -> None:
        self.settings = settings
        self.url = make_url(settings.url)
        self.extra_codes = extra_codes
        self.registry = registry
        if self.url.get_driver_name() == "pyodbc":
            _disable_odbc_pooling()
        self.engine: Engine = create_engine(self.url, **_engine_options(settings))
        self.dialect = self.engine.dialect.name
        event.listen(self.engine, "handle_error", self._mark_disconnect)
        registry.configure(bind=self.engine)

    @property
    def display_url(self) -> str:
        return masked_url(self.settings.url)

    def classify(self, exc: BaseException) -> Diagnosis:
        return classify(exc, self.dialect, self.extra_codes)

    def _mark_disconnect(self, context: Any) -> None:
        # SQLAlchemy's own disconnect detection misses codes on some dialects
        # (mysql+pyodbc treats a killed connection as alive); a connection we
        # call dead is invalidated, so it never goes back into the pool.
        if not context.is_disconnect and is_disconnect(context.original_exception,
                                                       self.dialect):
            context.is_disconnect = True

    def ping(self) -> None:
        """Open one connection and run a trivial statement; raise on failure."""
        with self.engine.connect() as connection:
            connection.execute(select(1)).scalar_one()

    def checked_out(self) -> int:
        """Connections currently lent out by the pool (0 when every job cleaned up)."""
        checkedout = getattr(self.engine.pool, "checkedout", None)
        return checkedout() if checkedout else 0

    def dispose(self) -> None:
        self.engine.dispose()


def _engine_options(settings: DatabaseSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
        "pool_recycle": int(settings.pool_recycle) if settings.pool_recycle >= 0 else -1,
        "pool_pre_ping": settings.pool_pre_ping,
    }
    if settings.connect_args:
        options["connect_args"] = dict(settings.connect_args)
    return options


def _disable_odbc_pooling() -> None:
    # SQLAlchemy pools; if the ODBC driver manager pools too, it keeps
    # connections that SQLAlchemy has already invalidated.
    import pyodbc
    pyodbc.pooling = False


def installed_odbc_drivers() -> list[str]:
    try:
        import pyodbc
    except ImportError:
        return []
    return list(pyodbc.drivers())
