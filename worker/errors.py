"""Which database errors are worth re-running a job for.

Table-driven, from Microsoft's transient-fault codes for Azure SQL, the retry list of
Microsoft.Data.SqlClient, EF Core's SqlServerTransientExceptionDetector, SQLAlchemy's
dialects and the MariaDB and PostgreSQL manuals. Every error gets one of
three verdicts (retry, retry only if the job is idempotent, never) and a flag
saying whether the connection is dead and must leave the pool.

Errors are read by their codes, not their Python classes: pyodbc maps deadlocks,
lock timeouts and killed connections to its plain `Error`, which SQLAlchemy wraps
as the base `DBAPIError`, not `OperationalError`.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterable


class Verdict(enum.Enum):
    RETRY = "retry"
    RETRY_IF_IDEMPOTENT = "retry-if-idempotent"  # the outcome is unknown
    NEVER = "never"


@dataclass(frozen=True)
class Diagnosis:
    verdict: Verdict
    reason: str
    disconnect: bool = False       # the connection is dead: never pool it again
    sqlstate: str | None = None
    native: int | None = None
    min_wait: float = 0.0          # the server asks for at least this long a pause
    # A login refused, a driver not installed, a file that cannot be opened: waiting
    # can never fix it, so the daemon does not wait for the database at start-up.
    permanent: bool = False

    def should_retry(self, idempotent: bool) -> bool:
        if self.verdict is Verdict.RETRY:
            return True
        return self.verdict is Verdict.RETRY_IF_IDEMPOTENT and idempotent

    @property
    def codes(self) -> str:
        return f"SQLSTATE {self.sqlstate or '-'}, native {self.native if self.native is not None else '-'}"


@dataclass(frozen=True)
class Rule:
    verdict: Verdict
    reason: str
    disconnect: bool = False
    min_wait: float = 0.0
    permanent: bool = False        # see Diagnosis.permanent


R = Verdict.RETRY
I = Verdict.RETRY_IF_IDEMPOTENT
N = Verdict.NEVER


def _rules(codes: Iterable, verdict: Verdict, reason: str, disconnect: bool = False) -> dict:
    return {code: Rule(verdict, reason, disconnect) for code in codes}


def _permanent(codes: Iterable, reason: str) -> dict:
    """Never retried, and never waited for at start-up."""
    return {code: Rule(N, reason, permanent=True) for code in codes}


# Native error numbers, per dialect family. Checked before the SQLSTATE because
# drivers disagree on SQLSTATEs (FreeTDS reports SQL Server's deadlock as 42000).
NATIVE_RULES: dict[str, dict[int, Rule]] = {
    "mssql": {
        **_rules([1205], R, "deadlock victim"),
        **_rules([1222, 1204], R, "lock timeout"),
        **_rules([3960, 41301, 41302, 41305, 41325], R, "snapshot / in-memory OLTP conflict"),
        **_rules([40613, 40197, 49918, 49919, 49920, 10928, 10929, 4221, 42108,
                  42109, 615, 926], R, "server failover or throttling", disconnect=True),
        40501: Rule(R, "service busy (Azure SQL asks for 10 s)", True, min_wait=10.0),
        **_rules([64, 233, 997, 121, 10053, 10054, 10060], R, "transport failure",
                 disconnect=True),
        # KILL: the session's transaction is rolled back and its connection closed
        **_rules([596], R, "session killed", disconnect=True),
        **_permanent([18456], "login failed"),
    },
    "mysql": {
        **_rules([1213], R, "deadlock"),
        **_rules([1205], R, "lock wait timeout"),
        **_rules([2006, 2013, 2055], R, "lost connection", disconnect=True),
        **_rules([2002, 2003], R, "cannot connect (server down or restarting)",
                 disconnect=True),
        **_rules([1927], R, "connection killed", disconnect=True),
        **_rules([4031], R, "disconnected for inactivity", disconnect=True),
        **_rules([1040], R, "too many connections", disconnect=True),
        **_rules([1053], R, "server shutting down", disconnect=True),
        **_rules([1317, 1969], N, "query interrupted / statement timeout"),
        **_rules([1062], N, "duplicate key"),
        **_permanent([1045], "access denied (user or password)"),
        **_rules([1064], N, "syntax error"),
    },
    "sqlite": {
        # primary result codes (extended codes are reduced with & 0xFF first)
        **_rules([5], R, "database is locked (SQLITE_BUSY)"),
        **_rules([6], N, "table locked inside one connection (SQLITE_LOCKED)"),
        **_permanent([14], "unable to open the database file (SQLITE_CANTOPEN)"),
    },
}

# SQLSTATEs, per dialect family; "*" applies to every dialect.
SQLSTATE_RULES: dict[str, dict[str, Rule]] = {
    "*": {
        **_rules(["40001"], R, "serialization failure / deadlock"),
        **_rules(["08S01", "08001", "08003", "08004", "08006", "08000", "08S02", "01002"],
                 R, "connection failure", disconnect=True),
        **_rules(["08007", "40003"], I, "connection lost, outcome unknown", disconnect=True),
        **_rules(["HYT01"], R, "login timeout", disconnect=True),
        **_rules(["HYT00"], I, "query timeout, outcome unknown"),
        **_permanent(["28000"], "login failed"),
        **_permanent(["IM002", "IM003"], "ODBC driver or data source not installed"),
    },
    "postgresql": {
        **_rules(["40P01"], R, "deadlock"),
        **_rules(["57P01", "57P02", "57P03"], R, "server shutting down or starting",
                 disconnect=True),
        **_rules(["53300"], R, "too many connections"),
        **_rules(["55P03"], R, "lock not available"),
        **_rules(["57014"], N, "statement cancelled"),
        **_rules(["25P02"], N, "in failed transaction"),
        **_permanent(["28P01"], "password authentication failed"),
    },
    "mysql": {
        **_rules(["HY018"], R, "connection killed", disconnect=True),
    },
}

# Message fragments, for errors whose codes say too little; "*": every dialect.
MESSAGE_RULES: dict[str, list[tuple[str, Rule]]] = {
    # unixODBC cannot load the driver named in the URL (SQLSTATE 01000, native 0)
    "*": [("can't open lib", Rule(N, "ODBC driver not installed", permanent=True))],
    "mssql": [("connection is busy with results for another command",
               Rule(N, "two statements at once on one connection: a threading bug")),
              # Microsoft's driver reports a login timeout as HYT00 (not HYT01): no
              # statement ran, so it is not a query timeout of unknown outcome
              ("login timeout expired", Rule(R, "login timeout", disconnect=True))],
    # psycopg: 57014 is both PostgreSQL's statement_timeout and a cancel request
    # (our deadline's, or a DBA's): the message says which. Failures to connect or
    # a connection dropped by the network come without any SQLSTATE.
    "postgresql": [
        ("canceling statement due to statement timeout",
         Rule(N, "server statement_timeout (not the job's deadline)")),
        ("canceling statement due to user request", Rule(N, "statement cancelled")),
        ("connection refused", Rule(R, "cannot connect (server down or restarting)", True)),
        ("could not connect to server", Rule(R, "cannot connect", True)),
        ("server closed the connection unexpectedly", Rule(R, "lost connection", True)),
        ("the connection is lost", Rule(R, "lost connection", True)),
        ("ssl syscall error", Rule(R, "lost connection", True)),
    ],
    "sqlite": [("database is locked", Rule(R, "database is locked (SQLITE_BUSY)")),
               ("database table is locked", Rule(N, "table locked inside one connection")),
               ("unable to open database file",
                Rule(N, "unable to open the database file", permanent=True))],
}

_SQLSTATE = re.compile(r"^[0-9A-Z]{5}$")
# The native number is the last "(NNNN)" before the ODBC function name:
#   "... Deadlock found ... (1213) (SQLExecDirectW)"
_ODBC_NATIVE = re.compile(r"\((-?\d+)\)\s*\(SQL[A-Za-z]+\)")
_TRAILING_NATIVE = re.compile(r"\((-?\d+)\)\s*$")


def _family(dialect: str | None) -> str | None:
    if dialect in ("mariadb", "mysql"):
        return "mysql"
    return dialect


def _guess_family(orig: BaseException, message: str) -> str | None:
    module = type(orig).__module__ or ""
    if module.startswith("sqlite3"):
        return "sqlite"
    if module.startswith(("psycopg", "asyncpg", "pg8000")):
        return "postgresql"
    if module.startswith(("pymysql", "MySQLdb", "mariadb", "mysql")):
        return "mysql"
    if module.startswith(("pymssql", "mssql_python")):
        return "mssql"
    lowered = message.lower()
    if "sql server" in lowered or "[freetds]" in lowered or "[microsoft]" in lowered:
        return "mssql"
    if "mysql" in lowered or "mariadb" in lowered or "[ma-" in lowered:
        return "mysql"
    return None


def error_codes(exc: BaseException) -> tuple[str | None, int | None, str]:
    """(SQLSTATE, native error number, message) of a driver error or its wrapper."""
    orig = getattr(exc, "orig", None) or exc
    sqlstate: str | None = None
    native: int | None = None
    message = ""
    args = getattr(orig, "args", ()) or ()
    # sqlite3 (Python 3.11+)
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        native = code
    # psycopg 3 / psycopg2
    for attribute in ("sqlstate", "pgcode"):
        value = getattr(orig, attribute, None)
        if isinstance(value, str) and _SQLSTATE.match(value):
            sqlstate = value
    # mssql-python: (driver_error, ddbc_error), the SQLSTATE's description and the
    # driver's message; neither the SQLSTATE nor the native number is kept
    driver_error, ddbc_error = (getattr(orig, "driver_error", None),
                                getattr(orig, "ddbc_error", None))
    if isinstance(driver_error, str) and isinstance(ddbc_error, str):
        sqlstate = sqlstate or _mssql_python_sqlstate(driver_error)
        message = ddbc_error
        native = native if native is not None else _sql_server_number(ddbc_error)
    # pyodbc: (sqlstate, message), sometimes reversed for pyodbc's own errors
    strings = [a for a in args[:2] if isinstance(a, str)]
    for index, value in enumerate(strings):
        if _SQLSTATE.match(value) and len(strings) == 2:
            sqlstate = sqlstate or value
            message = strings[1 - index]
            break
    # PyMySQL / mysqlclient / pymssql: (number, message)
    if native is None and args and isinstance(args[0], int) and not isinstance(args[0], bool):
        native = args[0]
        message = str(args[1]) if len(args) > 1 else ""
    if not message:
        message = " ".join(str(a) for a in args) if args else str(orig)
    if native is None:
        found = _ODBC_NATIVE.findall(message)
        if found:
            native = int(found[-1])
        else:
            trailing = _TRAILING_NATIVE.search(message)
            if trailing:
                native = int(trailing.group(1))
    return sqlstate, native, message


# SQL Server's own message texts, for drivers that drop the error number
# (mssql-python): the native number each one stands for.
SQL_SERVER_MESSAGES = (
    ("was deadlocked on lock resources", 1205),
    ("lock request time out period exceeded", 1222),
    ("is not currently available. please retry the connection later", 40613),
    ("the service is currently busy. retry the request after 10 seconds", 40501),
    ("not enough resources to process request", 49918),
    ("the service has encountered an error processing your request", 40197),
    ("login failed for user", 18456),
    ("the session is in the kill state", 596),
)


def _sql_server_number(message: str) -> int | None:
    lowered = message.lower()
    for fragment, number in SQL_SERVER_MESSAGES:
        if fragment in lowered:
            return number
    return None


_MSSQL_PYTHON_STATES = ("40001", "40003", "08S01", "08001", "08003", "08004", "08007",
                        "08S02", "01002", "HYT00", "HYT01", "HY008", "28000", "23000",
                        "42000", "42S02", "HY000")


def _mssql_python_sqlstate(description: str) -> str | None:
    """The SQLSTATE whose description mssql-python put in the exception, found by
    asking its own table (so a renamed description cannot go stale here)."""
    try:
        from mssql_python.exceptions import sqlstate_to_exception
    except ImportError:
        return None
    for state in _MSSQL_PYTHON_STATES:
        try:
            candidate = sqlstate_to_exception(state, "")
        except Exception:  # its table is its own business: no answer, no SQLSTATE
            return None
        if candidate is not None and candidate.driver_error == description:
            return state
    return None


def classify(exc: BaseException, dialect: str | None = None,
             extra: "ExtraCodes | None" = None) -> Diagnosis:
    """The verdict for one exception raised while a job ran."""
    from sqlalchemy import exc as sa_exc  # lazy: keeps `import worker.errors` cheap

    if isinstance(exc, sa_exc.TimeoutError):  # QueuePool timeout: all connections busy
        return Diagnosis(Verdict.RETRY, "timed out waiting for a pooled connection")
    orig = getattr(exc, "orig", None)
    if not isinstance(exc, sa_exc.DBAPIError) and not _looks_like_dbapi_error(exc):
        return Diagnosis(Verdict.NEVER, f"not a database error ({type(exc).__name__})")
    sqlstate, native, message = error_codes(exc)
    family = _family(dialect) or _guess_family(orig or exc, message)
    rule = _lookup(family, sqlstate, native, message, extra)
    invalidated = bool(getattr(exc, "connection_invalidated", False))
    if rule is None:
        if invalidated:  # SQLAlchemy's own disconnect verdict
            rule = Rule(Verdict.RETRY, "connection lost", disconnect=True)
        else:
            rule = Rule(Verdict.NEVER, "not a transient error")
    return Diagnosis(rule.verdict, rule.reason, rule.disconnect or invalidated,
                     sqlstate, native, rule.min_wait, rule.permanent)


def is_disconnect(exc: BaseException, dialect: str | None = None) -> bool:
    """True when the connection that raised this is unusable."""
    sqlstate, native, message = error_codes(exc)
    family = _family(dialect) or _guess_family(exc, message)
    rule = _lookup(family, sqlstate, native, message, None)
    return bool(rule and rule.disconnect)


@dataclass(frozen=True)
class ExtraCodes:
    """Site-specific additions: codes (native numbers or SQLSTATEs) to retry or never retry."""
    retry: frozenset = frozenset()
    never: frozenset = frozenset()


def _lookup(family: str | None, sqlstate: str | None, native: int | None,
            message: str, extra: ExtraCodes | None) -> Rule | None:
    if extra is not None:
        for code in (native, sqlstate):
            if code is not None and code in extra.never:
                return Rule(Verdict.NEVER, "listed in retry.permanent_codes")
            if code is not None and code in extra.retry:
                return Rule(Verdict.RETRY, "listed in retry.transient_codes")
    lowered = message.lower()
    for scope in (family or "", "*"):
        for fragment, rule in MESSAGE_RULES.get(scope, []):
            if fragment in lowered:
                return rule
    if native is not None and family in NATIVE_RULES:
        key = native & 0xFF if family == "sqlite" else native
        if key in NATIVE_RULES[family]:
            return NATIVE_RULES[family][key]
    if sqlstate is not None:
        for scope in (family or "", "*"):
            rule = SQLSTATE_RULES.get(scope, {}).get(sqlstate)
            if rule is not None:
                return rule
    return None


_DRIVER_MODULES = ("pyodbc", "sqlite3", "psycopg", "psycopg2", "pymysql", "MySQLdb",
                   "pymssql", "mariadb", "mssql_python")


def _looks_like_dbapi_error(exc: BaseException) -> bool:
    """A raw driver exception (as a job using a raw connection may raise it)."""
    return (type(exc).__module__ or "").split(".")[0] in _DRIVER_MODULES


def describe(exc: BaseException, limit: int = 300) -> str:
    """One line for logs and summaries: the driver's message, never the SQL parameters."""
    orig = getattr(exc, "orig", None)
    shown = orig if orig is not None else exc
    try:
        text = " ".join(str(shown).split())
    except Exception:  # a job's exception whose __str__ itself fails
        text = f"<{type(shown).__name__} whose message cannot be shown>"
    # Masked here, so that no place a run's error goes (the summary, the run table,
    # --history, hooks, the status page) can show a password the message quotes.
    from .config.masking import mask_secrets   # here: worker.config imports this module
    text = mask_secrets(text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
