"""The TDS test server's T-SQL (tests/sqlserver: translate, batch, functions, types), through
Microsoft's ODBC Driver 18 (FreeTDS where it differs): what it does not model is an error
naming the construct; batches, transactions, control flow and types answer as SQL Server
answers them."""
from __future__ import annotations

import datetime
import decimal
import struct
import threading
import uuid

import pyodbc
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, delete, insert

from tests.sqlserver import tds
from tests.sqlserver.process import TdsServerProcess

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One TDS test server for the module's tests (each makes its own tables)."""
    running = TdsServerProcess(tmp_path_factory.mktemp("tds-tsql"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def db(server):
    """An autocommit connection through Microsoft's driver, and a fresh table t."""
    connection = server.odbc(autocommit=True)
    connection.execute("DROP TABLE IF EXISTS t")
    connection.execute("CREATE TABLE t (id INT IDENTITY(1,1) PRIMARY KEY, "
                       "name NVARCHAR(10) NOT NULL UNIQUE, v INT)")
    yield connection
    connection.close()


def results(cursor) -> list:
    """Every result of a batch: rows, or the row count, or the error (by number)."""
    out = []
    while True:
        out.append([tuple(row) for row in cursor.fetchall()] if cursor.description
                   else cursor.rowcount)
        try:
            if not cursor.nextset():
                return out
        except pyodbc.Error as exc:
            out.append(_number(exc))


def _number(exc: pyodbc.Error) -> int:
    return int(str(exc.args[1]).rsplit("(", 2)[-2].split(")")[0])


def fails_with(connection, sql: str, *params) -> tuple[int, str]:
    with pytest.raises(pyodbc.Error) as caught:
        connection.execute(sql, *params).fetchall()
    return _number(caught.value), caught.value.args[1]


def rows(cursor) -> list[tuple]:
    return [tuple(row) for row in cursor.fetchall()]


def scalar(connection, sql: str, *params):
    return connection.execute(sql, *params).fetchone()[0]


# --- loud first: not modelled is an error naming the construct -----------------------------

@pytest.mark.parametrize("sql,construct", [
    ("MERGE INTO t USING t AS s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = 1;", "MERGE"),
    ("GOTO done", "GOTO"),
    ("SET ANSI_NULLS OFF", "SET ANSI_NULLS OFF"),
    ("DELETE FROM t OUTPUT deleted.id INTO t2 WHERE id = 1", "OUTPUT ... INTO"),
    ("DECLARE @rows TABLE (id INT)", "table variables"),
    ("CREATE TABLE money_kept (amount NUMERIC(20, 4))", "NUMERIC(20,4)"),
])
def test_what_is_not_modelled_fails_naming_the_construct(db, sql, construct):
    number, message = fails_with(db, sql)
    assert number == 50000
    assert f"not modelled: {construct}" in message


def test_answers_that_were_silently_different_are_sql_servers(db):
    assert tuple(db.execute("SELECT 'a' + 'b', 1 + 2, 7 / 2, N'x' + '1'").fetchone()) == (
        "ab", 3, 3, "x1")
    assert fails_with(db, "SELECT 1 / 0")[0] == 8134
    assert fails_with(db, "SELECT 5 % 0")[0] == 8134
    assert fails_with(db, "SELECT CAST('abc' AS INT)")[0] == 245
    assert scalar(db, "SELECT TRY_CAST('abc' AS INT)") is None
    assert scalar(db, "SELECT CAST(' 42 ' AS INT)") == 42
    assert scalar(db, "SELECT ? + ?", decimal.Decimal("1.5"), decimal.Decimal("2.25")) == 3.75
    # IF NOT EXISTS ... INSERT runs the INSERT (it was an empty statement)
    db.execute("IF NOT EXISTS (SELECT 1 FROM t WHERE name = 'a') INSERT INTO t (name, v) VALUES ('a', 1)")
    db.execute("IF NOT EXISTS (SELECT 1 FROM t WHERE name = 'a') INSERT INTO t (name, v) VALUES ('a', 2)"
               " ELSE UPDATE t SET v = 5 WHERE name = 'a'")
    assert rows(db.execute("SELECT name, v FROM t")) == [("a", 5)]
    # OUTPUT deleted.x is the value before the UPDATE
    assert rows(db.execute("UPDATE t SET v = v + 1 OUTPUT deleted.v AS old, inserted.v AS new "
                           "WHERE name = ?", "a")) == [(5, 6)]


# --- transactions and batches -------------------------------------------------------------------

def test_trancount_nests_and_an_inner_commit_only_counts_down(db):
    got = results(db.execute(
        "BEGIN TRAN; INSERT INTO t (name) VALUES ('kept?'); BEGIN TRAN; SELECT @@TRANCOUNT; "
        "COMMIT; SELECT @@TRANCOUNT; ROLLBACK; SELECT @@TRANCOUNT, COUNT(*) FROM t"))
    assert [r for r in got if isinstance(r, list)] == [[(2,)], [(1,)], [(0, 0)]]


def test_a_statement_error_ends_the_statement_and_the_batch_goes_on(db, server):
    db.execute("INSERT INTO t (name) VALUES ('one')")
    got = results(db.execute("SELECT 1; INSERT INTO t (name) VALUES ('one'); "
                             "INSERT INTO t (name) VALUES ('two')"))
    assert got[0] == [(1,)] and 2627 in got
    assert sorted(r[0] for r in rows(db.execute("SELECT name FROM t"))) == ["one", "two"]
    connection = server.freetds()
    try:   # FreeTDS raises at the failed statement too; the statement after it ran
        with pytest.raises(pyodbc.IntegrityError):
            connection.execute("INSERT INTO t (name) VALUES ('one'); "
                               "INSERT INTO t (name) VALUES ('three')")
    finally:
        connection.close()
    assert scalar(db, "SELECT COUNT(*) FROM t WHERE name = 'three'") == 1


def test_xact_abort_rolls_the_transaction_back_and_ends_the_batch(db):
    got = results(db.execute(
        "SET XACT_ABORT ON; BEGIN TRAN; INSERT INTO t (name) VALUES ('x'); "
        "INSERT INTO t (name) VALUES ('x'); SELECT 'not reached'"))
    assert 2627 in got and [("not reached",)] not in got
    assert tuple(db.execute("SELECT @@TRANCOUNT, COUNT(*) FROM t").fetchone()) == (0, 0)
    db.execute("SET XACT_ABORT OFF")
    got = results(db.execute("BEGIN TRAN; INSERT INTO t (name) VALUES ('x'); "
                             "INSERT INTO t (name) VALUES ('x'); INSERT INTO t (name) VALUES ('y')"))
    assert 2627 in got                           # without it the transaction stays open
    assert tuple(db.execute("SELECT @@TRANCOUNT, COUNT(*) FROM t").fetchone()) == (1, 2)
    db.execute("ROLLBACK")


def test_nocount_leaves_no_row_count(db):
    db.execute("INSERT INTO t (name) VALUES ('a')")
    assert db.execute("UPDATE t SET v = 1").rowcount == 1
    db.execute("SET NOCOUNT ON")
    assert db.execute("UPDATE t SET v = 2").rowcount == -1
    db.execute("SET NOCOUNT OFF")
    assert db.execute("UPDATE t SET v = 3").rowcount == 1


def test_a_failed_sp_prepexec_still_returns_its_handle(server, tmp_path):
    """SQL Server prepares, then runs: a statement that fails still has its handle (the
    RETURNVALUE), which the driver later frees with sp_unprepare."""
    from tests.sqlserver.server import TdsServer
    from tests.sqlserver.session import Session
    host = TdsServer(tmp_path / "prepexec.db", None, 0)
    session = Session(host, 51, host.database, 4096)
    try:
        session.run_batch("CREATE TABLE p (id INT PRIMARY KEY)", None)
        session.run_batch("INSERT INTO p VALUES (1)", None)
        tokens, _ = session.rpc(_prepexec("INSERT INTO p VALUES (@P1)", "@P1 int", 1),
                                _NoFaults())
    finally:
        session.close()
        host.listener.close()
    assert tokens.find(bytes([tds.ERROR])) >= 0                 # 2627 ...
    assert bytes([tds.RETURNVALUE]) + b"\x00\x00" + tds.b_varchar("@handle") in tokens


class _NoFaults:
    def take(self, statement):
        return None


def _prepexec(statement: str, declaration: str, value: int) -> bytes:
    """An sp_prepexec RPC as Microsoft's driver sends it."""
    headers = struct.pack("<IIH", 22, 18, 2) + struct.pack("<QI", 0, 1)

    def text(name: str, value: str, flags: int = 0) -> bytes:
        data = value.encode("utf-16-le")
        return (tds.b_varchar(name) + bytes([flags, tds.NVARCHAR]) + struct.pack("<H", 8000)
                + tds.COLLATION + struct.pack("<H", len(data)) + data)

    return (headers + struct.pack("<HHH", 0xFFFF, 13, 0)
            + tds.b_varchar("@handle") + bytes([1, tds.INTN, 4, 0])
            + text("@params", declaration) + text("@stmt", statement)
            + tds.b_varchar("@P1") + bytes([0, tds.INTN, 4, 4]) + struct.pack("<i", value))


# --- what ordinary jobs use -------------------------------------------------------------------------

def test_declare_set_select_assignment_and_rowcount(db):
    db.execute("INSERT INTO t (name, v) VALUES ('a', 1), ('b', 2)")
    got = results(db.execute(
        "DECLARE @n INT = 10, @label NVARCHAR(20); SET @n = @n + 1; "
        "SELECT @label = name FROM t WHERE v = 2; UPDATE t SET v = v + 1; "
        "SELECT @n, @label, @@ROWCOUNT"))
    assert got[-1] == [(11, "b", 2)]
    assert fails_with(db, "SELECT @undeclared")[0] == 137


def test_try_catch_throw_and_the_error_functions(db):
    got = results(db.execute(
        "BEGIN TRY INSERT INTO t (name) VALUES ('a'); SELECT 1 / 0; SELECT 'skipped' END TRY "
        "BEGIN CATCH SELECT ERROR_NUMBER(), ERROR_MESSAGE(), XACT_STATE() END CATCH"))
    assert got[-1] == [(8134, "Divide by zero error encountered.", 0)]
    assert fails_with(db, "THROW 50001, 'job refused', 1") == (
        50001, f"[42000] [Microsoft][ODBC Driver 18 for SQL Server][SQL Server]job refused (50001) "
        "(SQLExecDirectW)")
    # THROW; in CATCH re-raises; under XACT_ABORT the transaction is uncommittable (-1)
    number, _ = fails_with(db, "SET XACT_ABORT ON; BEGIN TRAN; BEGIN TRY SELECT CAST('x' AS INT) "
                               "END TRY BEGIN CATCH IF XACT_STATE() = -1 ROLLBACK; THROW; END CATCH")
    db.execute("SET XACT_ABORT OFF")
    assert number == 245 and scalar(db, "SELECT @@TRANCOUNT") == 0


def test_delete_and_update_returning_through_sqlalchemy(server):
    """SQLAlchemy's delete().returning() is DELETE ... OUTPUT deleted.*"""
    engine = create_engine(server.url())
    rows = Table("returning_rows", MetaData(), Column("id", Integer, primary_key=True,
                                                       autoincrement=False),
                 Column("name", String(20)))
    try:
        rows.metadata.drop_all(engine)
        rows.metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(insert(rows), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
            gone = connection.execute(delete(rows).where(rows.c.id == 1)
                                      .returning(rows.c.id, rows.c.name)).all()
            left = connection.execute(rows.select()).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in gone] == [(1, "a")]
    assert [tuple(r) for r in left] == [(2, "b")]


def test_truncate_object_id_and_xact_state(db):
    db.execute("INSERT INTO t (name) VALUES ('a'), ('b')")
    assert db.execute("TRUNCATE TABLE t").rowcount == -1
    db.execute("INSERT INTO t (name) VALUES ('c')")
    assert rows(db.execute("SELECT id, name FROM t")) == [(1, "c")]   # IDENTITY restarted
    assert scalar(db, "SELECT OBJECT_ID('dbo.t')") == scalar(
        db, "SELECT object_id FROM sys.objects WHERE name = 't'")
    assert scalar(db, "SELECT OBJECT_ID(N'no_such_table', N'U')") is None
    assert tuple(db.execute("IF OBJECT_ID('t') IS NOT NULL SELECT 'there'").fetchone()) == ("there",)
    got = results(db.execute("SELECT XACT_STATE(); BEGIN TRAN; SELECT XACT_STATE(); ROLLBACK"))
    assert [r for r in got if isinstance(r, list)] == [[(0,)], [(1,)]]


# --- types and rules ----------------------------------------------------------------------------------

def test_text_compares_and_is_unique_case_insensitively(db):
    db.execute("INSERT INTO t (name) VALUES ('Alpha')")
    assert scalar(db, "SELECT COUNT(*) FROM t WHERE name = 'ALPHA'") == 1
    assert fails_with(db, "INSERT INTO t (name) VALUES ('alpha')")[0] == 2627
    db.execute("DROP TABLE IF EXISTS cs")
    db.execute("CREATE TABLE cs (name NVARCHAR(10) COLLATE Latin1_General_CS_AS)")
    db.execute("INSERT INTO cs VALUES ('Alpha')")
    assert scalar(db, "SELECT COUNT(*) FROM cs WHERE name = 'ALPHA'") == 0


def test_declared_lengths_are_kept_2628(db):
    number, message = fails_with(db, "INSERT INTO t (name) VALUES (?)", "x" * 25)
    assert number == 2628 and "column 'name'" in message
    db.execute("INSERT INTO t (name) VALUES (?)", "x" * 10)
    assert scalar(db, "SELECT LEN(name) FROM t") == 10


def test_identity_insert_544(db):
    assert fails_with(db, "INSERT INTO t (id, name) VALUES (7, 'a')")[0] == 544
    db.execute("SET IDENTITY_INSERT t ON")
    db.execute("INSERT INTO t (id, name) VALUES (7, 'a')")
    db.execute("SET IDENTITY_INSERT t OFF")
    db.execute("INSERT INTO t (name) VALUES ('b')")
    db.execute("INSERT INTO t VALUES ('c', 3)")           # no column list: all but IDENTITY
    assert rows(db.execute("SELECT id, name FROM t ORDER BY id")) == [(7, "a"), (8, "b"), (9, "c")]


def test_exact_decimals_datetimeoffset_uniqueidentifier_and_datetime(db):
    db.add_output_converter(-155, lambda raw: struct.unpack("<6hI2h", raw))
    db.execute("DROP TABLE IF EXISTS typed")
    db.execute("CREATE TABLE typed (amount NUMERIC(15, 4), at DATETIMEOFFSET, "
               "ref UNIQUEIDENTIFIER, stamp DATETIME)")
    ref = uuid.uuid4()
    db.execute("INSERT INTO typed VALUES (?, ?, ?, ?)", decimal.Decimal("12345678901.2345"),
               "2026-01-02 03:04:05.123456+02:00", str(ref),
               datetime.datetime(2026, 1, 2, 3, 4, 5, 2000))
    cursor = db.execute("SELECT amount, at, ref, stamp FROM typed WHERE ref = ?", str(ref))
    amount, at, got_ref, stamp = cursor.fetchone()
    assert amount == decimal.Decimal("12345678901.2345")
    assert at == (2026, 1, 2, 3, 4, 5, 123456000, 2, 0)         # its own local time and offset
    assert got_ref == str(ref).upper()
    assert stamp == datetime.datetime(2026, 1, 2, 3, 4, 5, 3000)  # 1/300 s: .002 -> .003
    assert [column[1] for column in cursor.description][2:] == [str, datetime.datetime]


def test_getdate_is_local_time_with_fractions(db):
    before = datetime.datetime.now()
    now = scalar(db, "SELECT GETDATE()")
    assert isinstance(now, datetime.datetime)
    assert abs((now - before).total_seconds()) < 2          # local, not UTC
    assert now.microsecond % 1000 == 0 and now.microsecond // 1000 % 10 in (0, 3, 7)


def test_recursive_ctes_stop_at_maxrecursion_530(db):
    levels = "WITH c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300) SELECT COUNT(*) FROM c"
    assert fails_with(db, levels)[0] == 530
    assert scalar(db, levels + " OPTION (MAXRECURSION 300)") == 300
    assert scalar(db, levels.replace("300", "101")) == 101        # 100 recursions are allowed


def test_kill_needs_permission_and_the_victim_gets_596(server):
    victim = server.odbc()
    other_login = pyodbc.connect(f"DRIVER={{ODBC Driver 18 for SQL Server}};SERVER=127.0.0.1,"
                                 f"{server.port};DATABASE=test;UID=app;PWD=test;Encrypt=no",
                                 autocommit=True, timeout=10)
    admin = server.odbc()
    try:
        spid = scalar(victim, "SELECT @@SPID")
        assert fails_with(other_login, f"KILL {spid}")[0] == 6102
        kill = threading.Timer(0.3, admin.execute, args=(f"KILL {spid}",))
        kill.start()
        number, _ = fails_with(victim, "WAITFOR DELAY '00:00:05'")
        kill.join()
    finally:
        for connection in (victim, other_login, admin):
            connection.close()
    assert number == 596


def test_sqlalchemys_inspector_reads_the_catalog_views(server):
    """get_columns, get_pk_constraint, get_indexes, get_foreign_keys: the sys.* and
    INFORMATION_SCHEMA views SQLAlchemy's mssql dialect reads."""
    from sqlalchemy import inspect
    server.execute("DROP TABLE IF EXISTS inspected_child")
    server.execute("DROP TABLE IF EXISTS inspected")
    server.execute("CREATE TABLE inspected (id INT IDENTITY(1,1) PRIMARY KEY, "
                   "name NVARCHAR(40) NOT NULL, amount NUMERIC(12, 2) DEFAULT 0)")
    server.execute("CREATE UNIQUE INDEX ix_inspected_name ON inspected (name)")
    server.execute("CREATE TABLE inspected_child (id INT PRIMARY KEY, "
                   "parent INT REFERENCES inspected (id))")
    engine = create_engine(server.url())
    try:
        inspector = inspect(engine)
        columns = {c["name"]: c for c in inspector.get_columns("inspected")}
        primary = inspector.get_pk_constraint("inspected")
        indexes = inspector.get_indexes("inspected")
        foreign = inspector.get_foreign_keys("inspected_child")
    finally:
        engine.dispose()
    assert list(columns) == ["id", "name", "amount"]
    assert columns["id"]["identity"] == {"start": 1, "increment": 1}
    assert columns["name"]["type"].length == 40 and columns["name"]["nullable"] is False
    assert (columns["amount"]["type"].precision, columns["amount"]["type"].scale) == (12, 2)
    assert columns["amount"]["default"] == "((0))"
    assert primary["constrained_columns"] == ["id"]
    assert [(i["name"], i["unique"], i["column_names"]) for i in indexes] == [
        ("ix_inspected_name", True, ["name"])]
    assert [(f["constrained_columns"], f["referred_table"], f["referred_columns"])
            for f in foreign] == [(["parent"], "inspected", ["id"])]


def test_while_break_print_and_raiserror(db):
    """A batch delete loop as jobs write it; PRINT and RAISERROR below 11 are messages,
    11 to 18 an error that lets the batch go on."""
    db.execute("INSERT INTO t (name, v) VALUES ('a', 1), ('b', 2), ('c', 3), ('d', 4)")
    got = results(db.execute(
        "DECLARE @deleted INT = 0; WHILE 1 = 1 BEGIN DELETE FROM t WHERE id = "
        "(SELECT MIN(id) FROM t); IF @@ROWCOUNT = 0 BREAK; SET @deleted = @deleted + 1; "
        "IF @deleted >= 3 BREAK END; PRINT 'deleted'; SELECT @deleted"))
    assert got[-1] == [(3,)]
    assert scalar(db, "SELECT COUNT(*) FROM t") == 1
    cursor = db.execute("PRINT N'hello'; RAISERROR('careful', 10, 1); SELECT 1")
    messages = [text for _, text in cursor.messages]
    assert results(cursor)[-1] == [(1,)]
    assert [m.rsplit("]", 1)[-1] for m in messages] == ["hello", "careful"]
    assert fails_with(db, "RAISERROR('refused', 16, 1); INSERT INTO t (name) VALUES ('after')")[0] == 50000
    assert scalar(db, "SELECT COUNT(*) FROM t WHERE name = 'after'") == 1
