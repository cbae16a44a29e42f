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
    return tds.freetds(autocommit=autocommit)


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

def accounts(tds, *rows):
    setup = connect(tds, autocommit=True)
    setup.execute("DROP TABLE IF EXISTS tds_accounts")
    setup.execute("CREATE TABLE tds_accounts (id INT PRIMARY KEY, balance INT)")
    for row in rows:
        setup.execute("INSERT INTO tds_accounts VALUES (?, ?)", *row)
    return setup


def in_thread(fn, *args):
    """Run fn in a thread; (thread, outcome dict with 'result' or 'error' and 'seconds')."""
    outcome: dict = {}

    def run():
        started = time.monotonic()
        try:
            outcome["result"] = fn(*args)
        except pyodbc.Error as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started
    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_two_writers_in_a_cycle_one_is_the_deadlock_victim_and_rolled_back(clean):
    """Row locks held to the end of the transaction: A holds row 1 and wants row 2, B
    holds row 2 and wants row 1. The server finds the cycle, sends the cheaper one
    (here B, one row written against A's two) 1205 and rolls its transaction back;
    A goes on."""
    setup = accounts(clean, (1, 100), (2, 100), (3, 100))
    first, second = connect(clean), connect(clean)
    try:
        before = clean.stats()
        first.execute("UPDATE tds_accounts SET balance = 1 WHERE id IN (1, 3)")
        second.execute("UPDATE tds_accounts SET balance = 2 WHERE id = 2")
        thread, outcome = in_thread(second.execute,
                                    "UPDATE tds_accounts SET balance = 2 WHERE id = 1")
        time.sleep(0.3)
        assert thread.is_alive()                       # B waits for A's row
        first.execute("UPDATE tds_accounts SET balance = 1 WHERE id = 2")   # closes the cycle
        thread.join(10)
        error = outcome["error"]
        assert error.args[0] == "40001" and "(1205)" in error.args[1]
        first.commit()
        assert [tuple(row) for row in setup.execute(
            "SELECT id, balance FROM tds_accounts ORDER BY id")] == [(1, 1), (2, 1), (3, 1)]
        assert second.execute("SELECT @@TRANCOUNT").fetchone()[0] == 1   # the driver began anew
        after = clean.stats()
        assert after["deadlocks"] - before["deadlocks"] == 1
        assert after["deadlock_victims"] - before["deadlock_victims"] == 1
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


# --- locks -------------------------------------------------------------------------------------

def lock_waits(tds) -> int:
    return tds.stats()["lock_waits"]


def test_two_writers_on_different_rows_never_wait(clean):
    setup = accounts(clean, (1, 100), (2, 100))
    first, second = connect(clean), connect(clean)
    try:
        waits = lock_waits(clean)
        first.execute("UPDATE tds_accounts SET balance = 1 WHERE id = 1")
        first.execute("INSERT INTO tds_accounts VALUES (3, 3)")
        second.execute("UPDATE tds_accounts SET balance = 2 WHERE id = 2")
        second.execute("INSERT INTO tds_accounts VALUES (4, 4)")
        second.commit()
        first.commit()
        assert lock_waits(clean) == waits
        assert [tuple(r) for r in setup.execute("SELECT * FROM tds_accounts ORDER BY id")] \
            == [(1, 1), (2, 2), (3, 3), (4, 4)]
    finally:
        first.close()
        second.close()
        setup.close()


def test_two_inserts_into_an_identity_table_never_wait(clean):
    """Each INSERT's row is its own once it has its IDENTITY number (before, both
    locked the -1 SQLite shows for a number not chosen yet, and waited)."""
    setup = connect(clean, autocommit=True)
    setup.execute("DROP TABLE IF EXISTS tds_numbered")
    setup.execute("CREATE TABLE tds_numbered (id INT IDENTITY(1,1) PRIMARY KEY, v INT)")
    first, second = connect(clean), connect(clean)
    try:
        waits = lock_waits(clean)
        first.execute("INSERT INTO tds_numbered (v) VALUES (1)")
        second.execute("INSERT INTO tds_numbered (v) VALUES (2)")
        second.commit()
        first.commit()
        assert lock_waits(clean) == waits
        assert setup.execute("SELECT COUNT(*) FROM tds_numbered").fetchone()[0] == 2
    finally:
        first.close()
        second.close()
        setup.close()


@pytest.mark.parametrize("first_ends", ["commit", "rollback"])
def test_a_second_insert_of_a_key_waits_for_the_first_transaction(clean, first_ends):
    """Key locks: the second INSERT waits; then 2627 if the first committed, its row if
    the first rolled back."""
    setup = accounts(clean)
    first, second = connect(clean), connect(clean)
    try:
        first.execute("INSERT INTO tds_accounts VALUES (7, 1)")
        thread, outcome = in_thread(second.execute, "INSERT INTO tds_accounts VALUES (7, 2)")
        time.sleep(0.3)
        assert thread.is_alive()
        getattr(first, first_ends)()
        thread.join(10)
        if first_ends == "commit":
            assert "(2627)" in outcome["error"].args[1]
        else:
            assert "error" not in outcome
        second.commit()
        expected = 1 if first_ends == "commit" else 2
        assert setup.execute("SELECT balance FROM tds_accounts WHERE id = 7").fetchone()[0] == expected
    finally:
        first.close()
        second.close()
        setup.close()


def test_lock_timeout_is_1222_and_the_transaction_goes_on(clean):
    setup = accounts(clean, (1, 100), (2, 100))
    first, second = connect(clean), connect(clean)
    try:
        first.execute("UPDATE tds_accounts SET balance = 1 WHERE id = 1")
        second.execute("SET LOCK_TIMEOUT 200")
        second.execute("UPDATE tds_accounts SET balance = 2 WHERE id = 2")
        started = time.monotonic()
        with pytest.raises(pyodbc.Error) as caught:
            second.execute("SELECT balance FROM tds_accounts WHERE id = 1")
        assert "(1222)" in caught.value.args[1] and time.monotonic() - started < 2
        assert second.execute("SELECT @@TRANCOUNT").fetchone()[0] == 1
        second.commit()                       # its own update survives the timeout
        first.rollback()
        assert setup.execute("SELECT balance FROM tds_accounts WHERE id = 2").fetchone()[0] == 2
    finally:
        first.close()
        second.close()
        setup.close()


def test_deadlock_priority_low_is_the_victim_even_when_dearer(clean):
    setup = accounts(clean, (1, 100), (2, 100), (3, 100), (4, 100))
    first, second = connect(clean), connect(clean)
    try:
        second.execute("SET DEADLOCK_PRIORITY LOW")
        first.execute("UPDATE tds_accounts SET balance = 1 WHERE id = 1")
        second.execute("UPDATE tds_accounts SET balance = 2 WHERE id IN (2, 3, 4)")
        thread, outcome = in_thread(first.execute,
                                    "UPDATE tds_accounts SET balance = 1 WHERE id = 2")
        time.sleep(0.3)
        with pytest.raises(pyodbc.Error) as caught:
            second.execute("UPDATE tds_accounts SET balance = 2 WHERE id = 1")
        assert "(1205)" in caught.value.args[1]
        thread.join(10)
        assert "error" not in outcome
        first.commit()
    finally:
        first.close()
        second.close()
        setup.close()


def test_updlock_readpast_claimers_each_get_another_row_and_nolock_reads_dirty(clean):
    setup = accounts(clean, (1, 0), (2, 0), (3, 0))
    first, second = connect(clean), connect(clean)
    claim = "SELECT TOP 1 id FROM tds_accounts WITH (UPDLOCK, READPAST) ORDER BY id"
    try:
        assert first.execute(claim).fetchone()[0] == 1
        assert second.execute(claim).fetchone()[0] == 2
        first.execute("UPDATE tds_accounts SET balance = 9 WHERE id = 1")
        assert setup.execute("SELECT balance FROM tds_accounts WITH (NOLOCK) WHERE id = 1") \
            .fetchone()[0] == 9
        # Without READPAST, an UPDLOCK reader waits for the U lock on row 2.
        thread, outcome = in_thread(first.execute,
                                    "SELECT id FROM tds_accounts WITH (UPDLOCK) WHERE id = 2")
        time.sleep(0.3)
        assert thread.is_alive()
        second.commit()
        thread.join(10)
        assert "error" not in outcome
    finally:
        first.close()
        second.close()
        setup.close()


def test_holdlock_keeps_an_insert_out_until_the_reader_ends(clean):
    setup = accounts(clean, (1, 0))
    reader, writer = connect(clean), connect(clean)
    try:
        assert reader.execute("SELECT COUNT(*) FROM tds_accounts WITH (UPDLOCK, HOLDLOCK) "
                              "WHERE id = 5").fetchone()[0] == 0
        thread, outcome = in_thread(writer.execute, "INSERT INTO tds_accounts VALUES (5, 1)")
        time.sleep(0.3)
        assert thread.is_alive()
        reader.execute("INSERT INTO tds_accounts VALUES (5, 2)")
        reader.commit()
        thread.join(10)
        assert "(2627)" in outcome["error"].args[1]
    finally:
        reader.close()
        writer.close()
        setup.close()


@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_isolation_levels_above_read_committed_keep_shared_locks(clean, level):
    """READ COMMITTED releases a row's S lock after the statement; REPEATABLE READ and
    SERIALIZABLE keep it, so a writer waits for the reader's transaction."""
    setup = accounts(clean, (1, 100))
    reader, writer = connect(clean), connect(clean)
    update = "UPDATE tds_accounts SET balance = 1 WHERE id = 1"
    try:
        assert reader.execute("SELECT balance FROM tds_accounts WHERE id = 1").fetchone()[0] == 100
        writer.execute("SET LOCK_TIMEOUT 0")
        writer.execute(update)                       # READ COMMITTED: no lock kept
        writer.rollback()
        reader.commit()
        reader.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
        writer.execute("SET LOCK_TIMEOUT -1")
        assert reader.execute("SELECT balance FROM tds_accounts WHERE id = 1").fetchone()[0] == 100
        thread, outcome = in_thread(writer.execute, update)
        time.sleep(0.3)
        assert thread.is_alive()
        reader.commit()
        thread.join(10)
        assert "error" not in outcome
        writer.commit()
    finally:
        reader.close()
        writer.close()
        setup.close()


def test_sp_getapplock_waits_for_the_holders_transaction(clean):
    first, second = connect(clean), connect(clean)
    take = ("EXEC sp_getapplock @Resource = N'schema', @LockMode = 'Exclusive', "
            "@LockOwner = 'Transaction'")
    try:
        first.execute(take)
        thread, outcome = in_thread(second.execute, take)
        time.sleep(0.3)
        assert thread.is_alive()
        first.commit()
        thread.join(10)
        assert "error" not in outcome
        second.commit()
    finally:
        first.close()
        second.close()


def test_create_table_race_the_loser_waits_then_gets_2714(clean):
    setup = connect(clean, autocommit=True)
    setup.execute("DROP TABLE IF EXISTS tds_raced")
    first, second = connect(clean), connect(clean)
    try:
        first.execute("CREATE TABLE tds_raced (id INT)")
        # not visible to others before it commits, as in SQL Server's catalog
        assert second.execute("SELECT COUNT(*) FROM INFORMATION_SCHEMA.TABLES "
                              "WHERE TABLE_NAME = 'tds_raced'").fetchone()[0] == 0
        thread, outcome = in_thread(second.execute, "CREATE TABLE tds_raced (id INT)")
        time.sleep(0.3)
        assert thread.is_alive()
        first.commit()
        thread.join(10)
        assert "(2714)" in outcome["error"].args[1]
    finally:
        first.close()
        second.close()
        setup.close()


def test_a_rolled_back_create_table_is_gone(clean):
    setup = connect(clean, autocommit=True)
    setup.execute("DROP TABLE IF EXISTS tds_undone")
    first = connect(clean)
    try:
        first.execute("CREATE TABLE tds_undone (id INT)")
        first.execute("INSERT INTO tds_undone VALUES (1)")
        first.rollback()
        with pytest.raises(pyodbc.Error) as caught:
            setup.execute("SELECT * FROM tds_undone")
        assert "(208)" in caught.value.args[1]
    finally:
        first.close()
        setup.close()


# --- ATTENTION --------------------------------------------------------------------------------

def cancelled_after(cursor, sql: str, seconds: float) -> float:
    """Run sql, cancel it from another thread after `seconds`: how long execute took.
    The connection is not used again until SQLCancel has returned."""
    canceller = threading.Timer(seconds, cursor.cancel)
    canceller.start()
    started = time.monotonic()
    try:
        cursor.execute(sql)
    except pyodbc.Error as exc:
        # FreeTDS: HY008. Microsoft's driver returns normally, or HY010 when its execute
        # returns while SQLCancel still runs (1 run in 15, on main as well)
        assert exc.args[0] in ("HY008", "HY010"), exc
    elapsed = time.monotonic() - started
    canceller.join()
    return elapsed


@pytest.mark.parametrize("driver", ["msodbc", "freetds"])
def test_cancel_sends_attention_which_stops_waitfor(clean, driver):
    connection = connect(clean, driver)
    cursor = connection.cursor()
    before = clean.stats()["attentions"]
    elapsed = cancelled_after(cursor, "WAITFOR DELAY '00:00:30'", 0.5)
    try:
        assert elapsed < 3
        assert clean.stats()["attentions"] == before + 1
        assert connection.execute("SELECT 7").fetchone()[0] == 7     # still usable
    finally:
        connection.close()


@pytest.mark.parametrize("driver", ["msodbc", "freetds"])
def test_cancel_ends_a_lock_wait_and_rolls_back_only_that_statement(clean, driver):
    """ATTENTION ends the lock wait at once; the transaction, its earlier work and
    @@TRANCOUNT stay; a rollback afterwards undoes everything, later rows included."""
    setup = accounts(clean, (1, 100), (2, 100))
    holder, waiter = connect(clean), connect(clean, driver)
    try:
        holder.execute("UPDATE tds_accounts SET balance = 1 WHERE id = 1")
        waiter.execute("UPDATE tds_accounts SET balance = 2 WHERE id = 2")
        assert cancelled_after(waiter.cursor(),
                               "UPDATE tds_accounts SET balance = 2 WHERE id = 1", 0.5) < 2
        assert waiter.execute("SELECT @@TRANCOUNT").fetchone()[0] == 1
        assert waiter.execute("SELECT balance FROM tds_accounts WHERE id = 2").fetchone()[0] == 2
        waiter.execute("INSERT INTO tds_accounts VALUES (3, 3)")
        waiter.rollback()
        holder.rollback()
        assert [tuple(r) for r in setup.execute("SELECT * FROM tds_accounts ORDER BY id")] \
            == [(1, 100), (2, 100)]
    finally:
        holder.close()
        waiter.close()
        setup.close()


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
