"""The TDS test server itself (tests/sqlserver), through Microsoft's ODBC Driver 18 and
FreeTDS: start-up and bad input, types, errors as SQL Server sends them, ATTENTION,
transactions that really conflict, faults re-read while it runs."""
from __future__ import annotations

import datetime
import decimal
import socket
import subprocess
import sys
import threading
import time

import pyodbc
import pytest

from tests.conftest import ROOT
from tests.sqlserver.process import MS_DRIVER, TdsServerProcess

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tds(tmp_path_factory):
    server = TdsServerProcess(tmp_path_factory.mktemp("tds-server"))
    yield server
    server.stop()


@pytest.fixture
def clean(tds):
    tds.set_faults("[]\n")
    yield tds
    tds.set_faults("[]\n")


def connect(tds, driver: str = "msodbc", autocommit: bool = False):
    if driver == "msodbc":
        return tds.odbc(autocommit=autocommit)
    return pyodbc.connect(f"DRIVER={{FreeTDS}};SERVER=127.0.0.1;PORT={tds.port};"
                          "DATABASE=test;UID=sa;PWD=test;TDS_Version=7.4",
                          autocommit=autocommit, timeout=10)


def start_server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.sqlserver", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=20)


# --- start-up, stop, bad input --------------------------------------------------------

def test_prints_listening_and_stops_on_sigterm(tmp_path):
    server = TdsServerProcess(tmp_path)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 5


def test_port_in_use_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = start_server("--port", str(port), "--database", str(tmp_path / "x.db"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_database_that_cannot_be_created_is_one_line_and_exit_2(tmp_path):
    done = start_server("--port", "0", "--database", str(tmp_path / "missing" / "dir" / "x.db"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "cannot open database" in done.stderr


def test_bad_faults_file_at_start_is_one_line_and_exit_2(tmp_path):
    faults = tmp_path / "faults.yaml"
    faults.write_text("- match: [unclosed\n")
    done = start_server("--port", "0", "--database", str(tmp_path / "x.db"),
                        "--faults", str(faults))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "bad faults file" in done.stderr


# --- types ------------------------------------------------------------------------------

@pytest.mark.parametrize("driver", ["msodbc", "freetds"])
def test_types_round_trip(clean, driver):
    long_text = "x" * 5000
    connection = connect(clean, driver, autocommit=True)
    try:
        connection.execute("DROP TABLE IF EXISTS tds_types")
        connection.execute(
            "CREATE TABLE tds_types (i INT, b BIGINT, s SMALLINT, t TINYINT, f BIT, "
            "fl FLOAT, d DECIMAL(10, 2), n NVARCHAR(20), m NVARCHAR(max), v VARCHAR(20), "
            "bin VARBINARY(16), dt DATE, ts DATETIME2)")
        values = (2_000_000_000, 9_000_000_000_000, -300, 200, True, 1.25,
                  decimal.Decimal("12.34"), "grüße", long_text, "plain", b"\x00\x01\xff",
                  datetime.date(2026, 11, 24), datetime.datetime(2026, 11, 24, 12, 30, 5, 123456))
        connection.execute("INSERT INTO tds_types VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           *values)
        connection.execute("INSERT INTO tds_types (i) VALUES (NULL)")
        cursor = connection.execute("SELECT * FROM tds_types ORDER BY i DESC")
        first, second = cursor.fetchall()
        kinds = [column[1] for column in cursor.description]
    finally:
        connection.close()
    assert tuple(first) == values
    assert tuple(second) == (None,) * 13
    assert kinds == [int, int, int, int, bool, float, decimal.Decimal, str, str, str,
                     bytearray, datetime.date, datetime.datetime]


# --- errors, as SQL Server sends them ---------------------------------------------------------

@pytest.mark.parametrize("sql,number,sqlstate", [
    ("SELEC 1", 102, "42000"),
    ("SELECT * FROM no_such_table", 208, "42S02"),
    ("EXEC sp_no_such_procedure", 2812, "42000"),
    ("SELECT no_such_column FROM tds_stats", 207, "42S22"),
])
def test_errors_carry_sql_servers_number_and_message(clean, sql, number, sqlstate):
    connection = connect(clean)
    try:
        with pytest.raises(pyodbc.Error) as caught:
            connection.execute(sql)
        # the connection is still usable after it
        assert connection.execute("SELECT 1").fetchone()[0] == 1
    finally:
        connection.close()
    state, message = caught.value.args
    assert state == sqlstate
    assert f"[{MS_DRIVER}][SQL Server]" in message and f"({number})" in message


def test_duplicate_keys_are_2627_for_a_constraint_and_2601_for_a_unique_index(clean):
    connection = connect(clean, autocommit=True)
    try:
        connection.execute("DROP TABLE IF EXISTS tds_keys")
        connection.execute("CREATE TABLE tds_keys (a INT NOT NULL, b INT NOT NULL, "
                           "CONSTRAINT uq_a UNIQUE (a))")
        connection.execute("CREATE UNIQUE INDEX ix_b ON tds_keys (b)")
        connection.execute("INSERT INTO tds_keys VALUES (1, 1)")
        with pytest.raises(pyodbc.IntegrityError, match=r"\(2627\)"):
            connection.execute("INSERT INTO tds_keys VALUES (1, 2)")
        with pytest.raises(pyodbc.IntegrityError, match=r"ix_b.*\(2601\)"):
            connection.execute("INSERT INTO tds_keys VALUES (2, 1)")
    finally:
        connection.close()


def test_error_of_class_20_rolls_back_and_closes_the_connection(clean):
    clean.set_faults('- match: "select fatal"\n  error: {number: 4014, state: 1, class: 20, '
                     'message: "A fatal error occurred while reading the input stream."}\n')
    connection = connect(clean)
    try:
        with pytest.raises(pyodbc.Error, match=r"\(4014\)"):
            connection.execute("SELECT fatal = 1")
        with pytest.raises(pyodbc.Error) as caught:
            connection.execute("SELECT 1")
        assert caught.value.args[0] in ("08S01", "08003"), caught.value.args
    finally:
        connection.close()


# --- transactions -----------------------------------------------------------------------------

def test_two_writers_really_conflict_and_the_victim_is_rolled_back(clean):
    """Each connection has its own SQLite connection and transaction: a writer whose
    snapshot went stale under another's COMMIT is a deadlock victim (1205), and its
    transaction is rolled back, as SQL Server does."""
    setup = connect(clean, autocommit=True)
    setup.execute("DROP TABLE IF EXISTS tds_accounts")
    setup.execute("CREATE TABLE tds_accounts (id INT PRIMARY KEY, balance INT)")
    setup.execute("INSERT INTO tds_accounts VALUES (1, 100)")
    first, second = connect(clean), connect(clean)
    try:
        assert first.execute("SELECT balance FROM tds_accounts WHERE id = 1").fetchone()[0] == 100
        second.execute("UPDATE tds_accounts SET balance = 50 WHERE id = 1")
        second.commit()
        with pytest.raises(pyodbc.Error) as caught:
            first.execute("UPDATE tds_accounts SET balance = balance + 1 WHERE id = 1")
        assert caught.value.args[0] == "40001" and "(1205)" in caught.value.args[1]
        first.rollback()
        assert setup.execute("SELECT balance FROM tds_accounts").fetchone()[0] == 50
    finally:
        first.close()
        second.close()
        setup.close()


def test_spid_and_trancount(clean):
    one, two = connect(clean), connect(clean, autocommit=True)
    try:
        spid_one = one.execute("SELECT @@SPID").fetchone()[0]
        spid_two = two.execute("SELECT @@SPID").fetchone()[0]
        assert spid_one != spid_two and spid_one >= 51
        assert one.execute("SELECT @@TRANCOUNT").fetchone()[0] == 1   # autocommit off
        assert two.execute("SELECT @@TRANCOUNT").fetchone()[0] == 0
    finally:
        one.close()
        two.close()


def test_kill_ends_another_session_and_rolls_its_transaction_back(clean):
    """KILL spid, as a DBA sends it: that connection gets 596 mid-statement and is closed,
    its open transaction is rolled back, and sys.dm_exec_sessions no longer lists it."""
    setup = connect(clean, autocommit=True)
    setup.execute("DROP TABLE IF EXISTS tds_killed")
    setup.execute("CREATE TABLE tds_killed (id INT PRIMARY KEY)")
    victim = connect(clean)
    try:
        spid = victim.execute("SELECT @@SPID").fetchone()[0]
        victim.execute("INSERT INTO tds_killed VALUES (1)")
        listed = dict(setup.execute("SELECT session_id, open_transaction_count FROM "
                                    "sys.dm_exec_sessions").fetchall())
        assert listed[spid] == 1                          # its transaction is open
        killer = connect(clean, autocommit=True)      # a connection per thread
        kill = threading.Timer(0.3, killer.execute, args=(f"KILL {spid}",))
        kill.start()
        with pytest.raises(pyodbc.Error) as caught:
            victim.execute("WAITFOR DELAY '00:00:05'")
        kill.join()
        killer.close()
        assert "(596)" in caught.value.args[1], caught.value.args   # then the socket closes
        for _ in range(50):
            sessions = [row[0] for row in setup.execute(
                "SELECT session_id FROM sys.dm_exec_sessions").fetchall()]
            if spid not in sessions:
                break
            time.sleep(0.05)
        assert spid not in sessions
        assert setup.execute("SELECT COUNT(*) FROM tds_killed").fetchone()[0] == 0
        with pytest.raises(pyodbc.Error, match=r"\(6106\)"):
            setup.execute(f"KILL {spid}")
        own = setup.execute("SELECT @@SPID").fetchone()[0]
        with pytest.raises(pyodbc.Error, match=r"\(6104\)"):
            setup.execute(f"KILL {own}")
    finally:
        victim.close()
        setup.close()


def test_dm_tran_views_tell_an_untouched_transaction_from_one_with_work(clean):
    """Microsoft's driver, autocommit off, begins the next transaction with each COMMIT
    (open_transaction_count stays 1); the dm_tran views say whether it has touched the
    database yet, which is what a leftover transaction means."""
    admin = connect(clean, autocommit=True)
    admin.execute("DROP TABLE IF EXISTS tds_touched")
    admin.execute("CREATE TABLE tds_touched (id INT PRIMARY KEY)")
    worker = connect(clean)

    def state(spid):
        count = admin.execute("SELECT open_transaction_count FROM sys.dm_exec_sessions "
                              "WHERE session_id = ?", spid).fetchone()[0]
        touched = admin.execute(
            "SELECT COUNT(*) FROM sys.dm_tran_session_transactions AS s JOIN "
            "sys.dm_tran_database_transactions AS d ON d.transaction_id = s.transaction_id "
            "WHERE s.session_id = ? AND d.database_transaction_begin_time IS NOT NULL",
            spid).fetchone()[0]
        return count, touched

    try:
        spid = worker.execute("SELECT @@SPID").fetchone()[0]
        worker.commit()
        assert state(spid) == (1, 0)
        worker.execute("INSERT INTO tds_touched VALUES (1)")
        assert state(spid) == (1, 1)
        worker.rollback()
        assert state(spid) == (1, 0)
    finally:
        worker.close()
        admin.close()


def test_rollback_to_a_savepoint_keeps_the_transaction(clean):
    """SAVE TRANSACTION / ROLLBACK TRANSACTION name (SQLAlchemy's begin_nested on
    SQL Server): only the work after the savepoint is undone."""
    setup = connect(clean, autocommit=True)
    setup.execute("DROP TABLE IF EXISTS tds_saved")
    setup.execute("CREATE TABLE tds_saved (id INT PRIMARY KEY)")
    connection = connect(clean)
    try:
        connection.execute("INSERT INTO tds_saved VALUES (1)")
        connection.execute("SAVE TRANSACTION before_two")
        connection.execute("INSERT INTO tds_saved VALUES (2)")
        connection.execute("ROLLBACK TRANSACTION before_two")
        assert connection.execute("SELECT @@TRANCOUNT").fetchone()[0] == 1
        connection.execute("INSERT INTO tds_saved VALUES (3)")
        connection.commit()
        assert [row[0] for row in setup.execute(
            "SELECT id FROM tds_saved ORDER BY id").fetchall()] == [1, 3]
    finally:
        connection.close()
        setup.close()


# --- ATTENTION --------------------------------------------------------------------------------

@pytest.mark.parametrize("driver", ["msodbc", "freetds"])
def test_cancel_sends_attention_which_stops_waitfor(clean, driver):
    connection = connect(clean, driver)
    cursor = connection.cursor()
    before = clean.stats()["attentions"]
    threading.Timer(0.5, cursor.cancel).start()
    started = time.monotonic()
    try:
        cursor.execute("WAITFOR DELAY '00:00:30'")
    except pyodbc.Error as exc:      # FreeTDS: HY008; Microsoft's driver returns normally
        assert exc.args[0] == "HY008"
    elapsed = time.monotonic() - started
    try:
        assert elapsed < 3
        assert clean.stats()["attentions"] == before + 1
        assert connection.execute("SELECT 7").fetchone()[0] == 7     # still usable
    finally:
        connection.close()


# --- faults ------------------------------------------------------------------------------------

def test_faults_are_reread_and_a_broken_file_keeps_the_previous_ones(clean):
    connection = connect(clean, autocommit=True)
    try:
        assert connection.execute("SELECT 1 AS probe").fetchone()[0] == 1
        clean.set_faults('- match: "as probe"\n  error: {number: 1222, state: 56, class: 16, '
                         'message: "Lock request time out period exceeded."}\n')
        with pytest.raises(pyodbc.Error, match=r"Lock request time out period exceeded\. \(1222\)"):
            connection.execute("SELECT 1 AS probe")
        clean.set_faults("- match: [not, a, string\n")
        with pytest.raises(pyodbc.Error, match=r"\(1222\)"):        # still in force
            connection.execute("SELECT 1 AS probe")
        assert "not re-read" in clean.log
        clean.set_faults("[]\n")
        assert connection.execute("SELECT 1 AS probe").fetchone()[0] == 1
    finally:
        connection.close()


def test_delay_fault_holds_the_answer(clean):
    clean.set_faults('- match: "as slow"\n  times: 1\n  delay: 600ms\n')
    connection = connect(clean, autocommit=True)
    try:
        started = time.monotonic()
        assert connection.execute("SELECT 2 AS slow").fetchone()[0] == 2
        assert time.monotonic() - started >= 0.6
    finally:
        connection.close()


def test_stats_count_logins_statements_and_commits(clean):
    before = clean.stats()
    connection = connect(clean)
    connection.execute("SELECT 1").fetchall()
    connection.commit()
    connection.close()
    after = clean.stats()
    assert after["logins"] == before["logins"] + 1
    assert after["commits"] == before["commits"] + 1
    assert after["statements"] > before["statements"]


@pytest.mark.parametrize("driver", ["msodbc", "freetds"])
def test_executemany_runs_every_row(clean, driver):
    """pyodbc's executemany: Microsoft's driver sends an sp_prepexec per row, FreeTDS an
    sp_prepexec and an sp_unprepare per row (sp_execute was never seen)."""
    connection = connect(clean, driver)
    before = clean.stats()
    try:
        connection.execute("DROP TABLE IF EXISTS tds_many")
        connection.execute("CREATE TABLE tds_many (n INT NOT NULL)")
        cursor = connection.cursor()
        cursor.executemany("INSERT INTO tds_many (n) VALUES (?)", [(n,) for n in range(5)])
        connection.commit()
        rows = connection.execute("SELECT n FROM tds_many ORDER BY n").fetchall()
    finally:
        connection.close()
    after = clean.stats()
    assert [row[0] for row in rows] == [0, 1, 2, 3, 4]
    assert after["statements"] - before["statements"] >= 5 + 3
