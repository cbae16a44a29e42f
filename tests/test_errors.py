"""worker.errors: the classifier, fed exceptions shaped exactly as the drivers raise
them (real exception classes, real SQLSTATEs and message formats), wrapped the way
SQLAlchemy wraps them."""
from __future__ import annotations

import socket
import sqlite3

import pyodbc
import pytest
from sqlalchemy import exc as sa_exc

from worker.errors import Verdict, classify, error_codes

R, I, N = Verdict.RETRY, Verdict.RETRY_IF_IDEMPOTENT, Verdict.NEVER
MS = "[Microsoft][ODBC Driver 18 for SQL Server][SQL Server]"
TDS = "[FreeTDS][SQL Server]"
MA = "[ma-3.1.15][10.11.19-MariaDB-0+deb12u1]"


def wrapped(orig: Exception) -> sa_exc.DBAPIError:
    """What SQLAlchemy raises: the right DBAPIError subclass around the driver error."""
    base = pyodbc.Error if isinstance(orig, pyodbc.Error) else sqlite3.Error
    return sa_exc.DBAPIError.instance("SELECT 1", {}, orig, base)


def odbc(cls, sqlstate: str, text: str, native: int, function="SQLExecDirectW"):
    return cls(sqlstate, f"[{sqlstate}] {text} ({native}) ({function})")


CASES = [
    # SQL Server, Microsoft driver
    ("mssql", odbc(pyodbc.Error, "40001", MS + "Transaction (Process ID 57) was deadlocked on "
                   "lock resources with another process and has been chosen as the deadlock "
                   "victim. Rerun the transaction.", 1205), R, False, "40001", 1205),
    ("mssql", odbc(pyodbc.Error, "HY000", MS + "Lock request time out period exceeded.", 1222),
     R, False, "HY000", 1222),
    ("mssql", odbc(pyodbc.Error, "HY000", MS + "Snapshot isolation transaction aborted due "
                   "to update conflict.", 3960), R, False, "HY000", 3960),
    ("mssql", odbc(pyodbc.Error, "HY000", MS + "Database 'x' on server 'y' is not currently "
                   "available.", 40613), R, True, "HY000", 40613),
    ("mssql", odbc(pyodbc.OperationalError, "08S01", MS.replace("[SQL Server]", "") +
                   "TCP Provider: Error code 0x68", 10054), R, True, "08S01", 10054),
    ("mssql", odbc(pyodbc.OperationalError, "08S01", MS.replace("[SQL Server]", "") +
                   "Communication link failure", 0), R, True, "08S01", 0),
    ("mssql", odbc(pyodbc.OperationalError, "08007", MS + "Connection failure during "
                   "transaction", 0, "SQLEndTran"), I, True, "08007", 0),
    ("mssql", odbc(pyodbc.OperationalError, "HYT00", MS.replace("[SQL Server]", "") +
                   "Query timeout expired", 0), I, False, "HYT00", 0),
    ("mssql", odbc(pyodbc.OperationalError, "HYT01", MS.replace("[SQL Server]", "") +
                   "Login timeout expired", 0, "SQLDriverConnect"), R, True, "HYT01", 0),
    ("mssql", odbc(pyodbc.Error, "HY000", "[Microsoft][ODBC SQL Server Driver]Connection is "
                   "busy with results for another command", 0), N, False, "HY000", 0),
    ("mssql", odbc(pyodbc.InterfaceError, "28000", MS + "Login failed for user 'app'.",
                   18456, "SQLDriverConnect"), N, False, "28000", 18456),
    ("mssql", odbc(pyodbc.IntegrityError, "23000", MS + "Violation of PRIMARY KEY "
                   "constraint 'PK_x'.", 2627), N, False, "23000", 2627),
    ("mssql", odbc(pyodbc.ProgrammingError, "42000", MS + "Incorrect syntax near 'SELEC'.",
                   102), N, False, "42000", 102),
    # SQL Server through FreeTDS: the deadlock arrives as 42000
    ("mssql", odbc(pyodbc.ProgrammingError, "42000", TDS + "Transaction (Process ID 60) was "
                   "deadlocked on lock resources with another process", 1205),
     R, False, "42000", 1205),
    ("mssql", odbc(pyodbc.OperationalError, "08S01", "[FreeTDS][SQL Server]Unable to "
                   "connect: Adaptive Server is unavailable or does not exist", 20009,
                   "SQLDriverConnect"), R, True, "08S01", 20009),
    # MariaDB through MariaDB Connector/ODBC (pyodbc hands deadlocks, lock waits and
    # killed connections over as its base Error: read by SQLSTATE and native number)
    ("mysql", odbc(pyodbc.Error, "40001", MA + "Deadlock found when trying to get lock; try "
                   "restarting transaction", 1213), R, False, "40001", 1213),
    ("mysql", odbc(pyodbc.Error, "HY000", MA + "Lock wait timeout exceeded; try restarting "
                   "transaction", 1205), R, False, "HY000", 1205),
    ("mysql", odbc(pyodbc.Error, "HY018", MA + "Connection was killed", 1927), R, True,
     "HY018", 1927),
    ("mysql", odbc(pyodbc.OperationalError, "08S01", MA + "Lost connection to server during "
                   "query", 2013), R, True, "08S01", 2013),
    ("mysql", odbc(pyodbc.OperationalError, "08S01", MA + "Server has gone away", 2006,
                   "SQLEndTran"), R, True, "08S01", 2006),
    ("mysql", odbc(pyodbc.ProgrammingError, "42000", MA + "You have an error in your SQL "
                   "syntax", 1064), N, False, "42000", 1064),
    ("mysql", odbc(pyodbc.IntegrityError, "23000", MA + "Duplicate entry '1' for key "
                   "'PRIMARY'", 1062), N, False, "23000", 1062),
    ("mysql", odbc(pyodbc.InterfaceError, "28000", MA + "Access denied for user 'x'", 1045,
                   "SQLDriverConnect"), N, False, "28000", 1045),
    ("mysql", odbc(pyodbc.Error, "70100", MA + "Query execution was interrupted", 1317),
     N, False, "70100", 1317),
    ("mysql", pyodbc.Error("01000", "[01000] [unixODBC][Driver Manager]Can't open lib "
                           "'MariaDB Nope' : file not found (0) (SQLDriverConnect)"),
     N, False, "01000", 0),
]


@pytest.mark.parametrize("dialect,orig,verdict,disconnect,sqlstate,native", CASES,
                         ids=[f"{c[0]}-{c[4]}-{c[5]}-{i}" for i, c in enumerate(CASES)])
def test_odbc_errors(dialect, orig, verdict, disconnect, sqlstate, native):
    diagnosis = classify(wrapped(orig), dialect)
    assert (diagnosis.verdict, diagnosis.disconnect) == (verdict, disconnect)
    assert (diagnosis.sqlstate, diagnosis.native) == (sqlstate, native)


def test_the_dialect_is_guessed_from_the_message_when_unknown():
    deadlock = odbc(pyodbc.Error, "HY000", MA + "Lock wait timeout exceeded", 1205)
    assert classify(wrapped(deadlock)).verdict is R
    victim = odbc(pyodbc.ProgrammingError, "42000", TDS + "was deadlocked", 1205)
    assert classify(wrapped(victim)).verdict is R


def test_pyodbc_own_errors_with_reversed_arguments():
    orig = pyodbc.Error("The driver did not supply an error!", "HY000")
    assert error_codes(orig)[0] == "HY000"
    assert classify(wrapped(orig), "mssql").verdict is N


def test_native_number_is_the_one_before_the_function_name():
    orig = odbc(pyodbc.Error, "HY000", MA + "Table (12) is full (99)", 1205)
    assert error_codes(orig)[1] == 1205


def sqlite_error(code: int, name: str, message: str) -> sqlite3.OperationalError:
    err = sqlite3.OperationalError(message)
    err.sqlite_errorcode, err.sqlite_errorname = code, name
    return err


@pytest.mark.parametrize("code,name,message,verdict", [
    (5, "SQLITE_BUSY", "database is locked", R),
    (517, "SQLITE_BUSY_SNAPSHOT", "database is locked", R),
    (6, "SQLITE_LOCKED", "database table is locked", N),
    (1, "SQLITE_ERROR", "no such table: x", N),
])
def test_sqlite_errors(code, name, message, verdict):
    assert classify(wrapped(sqlite_error(code, name, message)), "sqlite").verdict is verdict


def test_real_sqlite_busy_error_is_transient(tmp_path):
    holder = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(tmp_path / "x.db", timeout=0)
    with pytest.raises(sqlite3.OperationalError) as raised:
        other.execute("INSERT INTO t VALUES (1)")
    holder.close(), other.close()
    assert classify(wrapped(raised.value), "sqlite").verdict is R


@pytest.mark.parametrize("sqlstate,verdict,disconnect", [
    ("40001", R, False), ("40P01", R, False), ("08006", R, True), ("57P01", R, True),
    ("53300", R, False), ("55P03", R, False), ("08007", I, True), ("57014", N, False),
    ("25P02", N, False), ("23505", N, False), ("42P01", N, False),
])
def test_postgresql_sqlstates(sqlstate, verdict, disconnect):
    """psycopg's own exception class for each SQLSTATE (psycopg.errors.lookup)."""
    psycopg_errors = pytest.importorskip("psycopg.errors")
    error_class = psycopg_errors.lookup(sqlstate)
    err = sa_exc.DBAPIError.instance("SELECT 1", {}, error_class("boom"), error_class)
    diagnosis = classify(err, "postgresql")
    assert (diagnosis.verdict, diagnosis.disconnect) == (verdict, disconnect)
    assert diagnosis.sqlstate == sqlstate


def test_postgresql_refused_connection_is_transient():
    """psycopg raises a failed connect with no SQLSTATE at all: the message decides."""
    psycopg = pytest.importorskip("psycopg")
    with socket.socket() as closed:            # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(psycopg.OperationalError) as raised:
        psycopg.connect(f"host=127.0.0.1 port={port} dbname=x user=x connect_timeout=2")
    assert raised.value.sqlstate is None
    err = sa_exc.DBAPIError.instance(None, None, raised.value, psycopg.Error)
    diagnosis = classify(err, "postgresql")
    assert diagnosis.verdict is R and diagnosis.disconnect


def test_python_errors_are_never_retried():
    assert classify(ValueError("x"), "mssql").verdict is N
    assert classify(KeyError("x"), "sqlite").verdict is N


def test_sqlalchemy_disconnect_verdict_is_respected():
    err = sa_exc.DBAPIError.instance("SELECT 1", {}, odbc(pyodbc.Error, "HY000", "odd",
                                                          777), pyodbc.Error,
                                     connection_invalidated=True)
    diagnosis = classify(err, "mssql")
    assert diagnosis.verdict is R and diagnosis.disconnect


def test_should_retry_respects_idempotency():
    unknown = classify(wrapped(odbc(pyodbc.OperationalError, "08007", MS + "x", 0)), "mssql")
    assert not unknown.should_retry(idempotent=False)
    assert unknown.should_retry(idempotent=True)


def test_site_codes_override_the_tables():
    from worker.errors import ExtraCodes
    cannot_open = odbc(pyodbc.Error, "42000", MS + "Cannot open database \"mes\"", 4060)
    assert classify(wrapped(cannot_open), "mssql").verdict is N
    site = ExtraCodes(retry=frozenset({4060}), never=frozenset({1205}))
    assert classify(wrapped(cannot_open), "mssql", site).verdict is R
    victim = odbc(pyodbc.Error, "40001", MS + "deadlock victim", 1205)
    assert classify(wrapped(victim), "mssql", site).verdict is N
    assert classify(wrapped(odbc(pyodbc.Error, "HYT00", MS + "timeout", 0)), "mssql",
                    ExtraCodes(retry=frozenset({"HYT00"}))).verdict is R


def test_cannot_connect_to_mariadb_is_transient():
    refused = odbc(pyodbc.OperationalError, "HY000", MA.split("]")[0] + "]Can't connect to "
                   "server on '127.0.0.1' (111)", 2002, "SQLDriverConnect")
    diagnosis = classify(wrapped(refused), "mysql")
    assert diagnosis.verdict is R and diagnosis.disconnect and diagnosis.native == 2002


def test_azure_busy_asks_for_a_ten_second_pause():
    busy = odbc(pyodbc.Error, "HY000", MS + "The service is currently busy.", 40501)
    diagnosis = classify(wrapped(busy), "mssql")
    assert diagnosis.verdict is R and diagnosis.min_wait == 10.0


PERMANENT = [
    ("mysql", odbc(pyodbc.InterfaceError, "28000", MA + "Access denied for user 'x'", 1045,
                   "SQLDriverConnect")),
    ("mssql", odbc(pyodbc.InterfaceError, "28000", MS + "Login failed for user 'sa'.", 18456,
                   "SQLDriverConnect")),
    ("mysql", pyodbc.Error("01000", "[01000] [unixODBC][Driver Manager]Can't open lib "
                           "'MariaDB Nope' : file not found (0) (SQLDriverConnect)")),
    ("mssql", pyodbc.InterfaceError("IM002", "[IM002] [unixODBC][Driver Manager]Data source "
                                    "name not found and no default driver specified (0) "
                                    "(SQLDriverConnect)")),
]
WAITED_FOR = [
    ("mysql", odbc(pyodbc.OperationalError, "08S01", MA + "Can't connect to MySQL server on "
                   "'127.0.0.1' (111)", 2002, "SQLDriverConnect")),
    ("mssql", odbc(pyodbc.OperationalError, "HYT00", "[Microsoft][ODBC Driver 18 for SQL "
                   "Server]Login timeout expired", 0, "SQLDriverConnect")),
]


@pytest.mark.parametrize("dialect,orig", PERMANENT)
def test_errors_no_wait_can_fix_are_permanent(dialect, orig):
    """Issue 10 item 8: the daemon exits 69 on these instead of waiting for ever."""
    diagnosis = classify(wrapped(orig), dialect)
    assert diagnosis.verdict is N and diagnosis.permanent
    assert "connection lost" not in diagnosis.reason


@pytest.mark.parametrize("dialect,orig", WAITED_FOR)
def test_a_server_down_is_not_permanent(dialect, orig):
    assert not classify(wrapped(orig), dialect).permanent


def test_sqlite_cannot_open_the_file_is_permanent(tmp_path):
    from sqlalchemy import create_engine
    engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(sa_exc.OperationalError) as caught:
        engine.connect()
    engine.dispose()
    diagnosis = classify(caught.value, "sqlite")
    assert diagnosis.verdict is N and diagnosis.permanent
