"""One TDS connection: its SQLite connection, its session id, its transaction, and
the answers to its requests (SQL batches, RPCs, transaction manager requests)."""
from __future__ import annotations

import datetime
import logging
import re
import sqlite3
import struct
import threading
import uuid
from dataclasses import dataclass

from . import catalog, functions, tds
from .batch import BatchRun, SessionOptions
from .faults import Fault, ServerError
from .locks import SESSION, TRANSACTION, LockWaitEnded, Owner
from .login import PRODUCT_VERSION, SERVER_NAME
from .translate import Step, TranslationError, translate_batch
from .types import result_columns

log = logging.getLogger("tds.session")

# RPC procedure ids (ProcIDSwitch = 0xFFFF)
PROCEDURES = {10: "sp_executesql", 11: "sp_prepare", 12: "sp_execute", 13: "sp_prepexec",
              15: "sp_unprepare"}

CATALOG_SQL = [
    "CREATE TEMP VIEW tds_is_tables AS SELECT 'test' AS TABLE_CATALOG, 'dbo' AS TABLE_SCHEMA,"
    " name AS TABLE_NAME, CASE type WHEN 'table' THEN 'BASE TABLE' ELSE 'VIEW' END AS TABLE_TYPE"
    " FROM main.sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%'"
    " AND tds_visible(name)",
    "CREATE TEMP VIEW tds_is_columns AS SELECT 'test' AS TABLE_CATALOG, 'dbo' AS TABLE_SCHEMA,"
    " m.name AS TABLE_NAME, c.name AS COLUMN_NAME, c.cid + 1 AS ORDINAL_POSITION,"
    " CASE c.\"notnull\" WHEN 1 THEN 'NO' ELSE 'YES' END AS IS_NULLABLE, lower(c.type) AS DATA_TYPE"
    " FROM main.sqlite_master m, pragma_table_info(m.name) c WHERE m.type = 'table'",
    "CREATE TEMP VIEW tds_sys_schemas AS SELECT 1 AS schema_id, 'dbo' AS name",
    "CREATE TEMP VIEW tds_sys_tables AS SELECT rowid AS object_id, name, 1 AS schema_id, 'U' AS type"
    " FROM main.sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND tds_visible(name)",
    "CREATE TEMP VIEW tds_sys_objects AS SELECT rowid AS object_id, name, 1 AS schema_id,"
    " CASE type WHEN 'table' THEN 'U' WHEN 'view' THEN 'V' ELSE 'X' END AS type"
    " FROM main.sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%'"
    " AND tds_visible(name)",
    "CREATE TEMP VIEW tds_sys_system_views AS SELECT 'dm_exec_sessions' AS name",
    # filled from the server's sessions whenever a statement reads it (server.fill_sessions)
    "CREATE TEMP TABLE tds_sys_dm_exec_sessions (session_id SMALLINT, is_user_process BIT,"
    " login_name NVARCHAR(128), program_name NVARCHAR(128), transaction_isolation_level SMALLINT,"
    " open_transaction_count INT)",
    # which transaction each session has, and when it first touched the database (NULL
    # for the empty transaction a driver begins after each COMMIT): server.fill_sessions
    "CREATE TEMP TABLE tds_sys_dm_tran_session_transactions (session_id SMALLINT,"
    " transaction_id BIGINT, is_local BIT)",
    "CREATE TEMP TABLE tds_sys_dm_tran_database_transactions (transaction_id BIGINT,"
    " database_id INT, database_transaction_begin_time DATETIME2)",
] + catalog.SQL


class ServerFailure(Exception):
    """A statement failed: SQL Server's error for it."""

    def __init__(self, error: ServerError) -> None:
        super().__init__(error.message)
        self.error = error


class Disconnect(Exception):
    """Close the socket now (a fault)."""


class Interrupted(Exception):
    """An ATTENTION arrived while the request ran."""


DEADLOCK_VICTIM = ("Transaction (Process ID {spid}) was deadlocked on lock resources with "
                   "another process and has been chosen as the deadlock victim. Rerun the "
                   "transaction.")
DEADLOCK_PRIORITIES = {"low": -5, "normal": 0, "high": 5}
_LOCK_TIMEOUT = re.compile(r"^\s*SET\s+LOCK_TIMEOUT\s+(-?\d+)\s*;?\s*$", re.I)
_DEADLOCK_PRIORITY = re.compile(r"^\s*SET\s+DEADLOCK_PRIORITY\s+(LOW|NORMAL|HIGH|-?\d+)\s*;?\s*$", re.I)
_ISOLATION = re.compile(r"^\s*SET\s+TRANSACTION\s+ISOLATION\s+LEVEL\s+(READ\s+UNCOMMITTED|"
                        r"READ\s+COMMITTED|REPEATABLE\s+READ|SERIALIZABLE|SNAPSHOT)\s*;?\s*$", re.I)
_APPLOCK = re.compile(r"^\s*EXEC(?:UTE)?\s+(?:@\w+\s*=\s*)?(?:\[?\w+\]?\.)*\[?"
                      r"(sp_getapplock|sp_releaseapplock)\]?\s*(.*?)\s*;?\s*$", re.I | re.S)
_APPLOCK_ARGUMENT = re.compile(r"\s*(@\w+)\s*=\s*(N?'(?:[^']|'')*'|-?\d+|@\w+)\s*(?:,|$)", re.I)
APPLOCK_MODES = {"shared": "S", "update": "U", "exclusive": "X", "intentshared": "S",
                 "intentexclusive": "X"}


def lock_wait_error(reason: str, spid: int) -> Exception:
    """What a lock wait that ended without its lock answers."""
    if reason == "cancel":
        return Interrupted()
    if reason == "deadlock":
        return ServerFailure(ServerError(1205, 51, 13, DEADLOCK_VICTIM.format(spid=spid)))
    return ServerFailure(ServerError(1222, 45, 16, "Lock request time out period exceeded."))


def register_functions(storage) -> None:
    """The functions standing for @@SPID and friends, on the storage's one
    connection: they answer for the session whose statement runs."""
    db = storage.db
    db.create_function("tds_spid", 0, lambda: storage.current.spid)
    db.create_function("tds_trancount", 0, lambda: storage.current.trancount
                       if storage.current.in_transaction else 0)
    functions.register(db, lambda: storage.current)
    db.create_function("tds_version", 0, lambda: (
        f"Microsoft SQL Server 2022 (RTM) - {PRODUCT_VERSION} (X64) (TDS test server over SQLite)"))
    db.create_function("tds_servername", 0, lambda: SERVER_NAME)
    db.create_function("serverproperty", 1, _server_property)
    db.create_function("sysutcdatetime", 0, lambda: datetime.datetime.now(
        datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f"))
    db.create_function("getutcdate", 0, lambda: datetime.datetime.now(
        datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3])
    db.create_function("uuid", 0, lambda: str(uuid.uuid4()).upper())


@dataclass
class Prepared:
    statement: str
    names: list[str]


class Session:
    """State of one connection. Requests are run one at a time by the connection's
    thread; `attention` is set by its reader thread."""

    def __init__(self, server, spid: int, packet_size: int, program_name: str = "",
                 login_name: str = "sa") -> None:
        self.server = server
        self.spid = spid
        self.program_name = program_name
        self.login_name = login_name
        self.busy = False                     # a request is running (KILL answers it with 596)
        self.killed = False
        self.attention = threading.Event()
        self.in_transaction = False
        self.trancount = 0                    # @@TRANCOUNT: BEGIN TRAN nests, COMMIT counts down
        self.doomed = False                   # XACT_STATE() -1: only a rollback may follow
        self.options = SessionOptions()
        self.rowcount = 0                     # @@ROWCOUNT
        self.last_error = 0                   # @@ERROR
        self.caught_error: ServerError | None = None    # ERROR_NUMBER() etc. in CATCH
        self.pending_error: ServerError | None = None   # raised by a function (functions.py)
        self.touched_at: str | None = None   # first statement of the open transaction
        self.implicit_transactions = False
        self.descriptor = 0
        self.prepared: dict[int, Prepared] = {}
        self.packet_size = packet_size
        # the server's storage (one SQLite connection for every session) and this
        # connection's part in it: its locks, its undo log, its isolation
        self.storage = server.storage
        self.db = self.storage.db
        self.owner = Owner(spid)
        self.undo: list = []
        self.conflict = None            # set by a trigger that met another's lock
        self.isolation = "read committed"
        self.savepoints: dict[str, int] = {}
        self.envchanges: list[bytes] = []   # the request's ENVCHANGEs, kept on an ATTENTION

    def xact_state(self) -> int:
        if not self.in_transaction:
            return 0
        return -1 if self.doomed else 1

    def query(self, step: Step, params: dict) -> list:
        """The rows of one SQLite statement the batch runs for itself (a condition, a
        variable's value, the old rows of UPDATE ... OUTPUT deleted), under the lock
        manager like any statement. Raises ServerFailure, Interrupted."""
        return self._execute(step, params)[1] or []

    def _execute(self, step: Step, params: dict, before=None) -> tuple:
        """storage.execute, its failures as SQL Server's: (description, rows, rowcount)."""
        try:
            return self.storage.execute(self, step, params, before=before)
        except LockWaitEnded as exc:
            raise lock_wait_error(exc.reason, self.spid) from None
        except sqlite3.Error as exc:
            if "interrupted" in str(exc):
                raise Interrupted() from None
            with self.storage.condition:
                raise ServerFailure(self.take_pending_error()
                                    or sqlite_error(exc, self.spid, self.db)) from None

    def identity_column(self, table: str) -> tuple[str | None, tuple[str, ...]]:
        """(the table's IDENTITY column, all its columns). IDENTITY columns are the only
        INTEGER PRIMARY KEYs (rowid aliases) translate.py writes; the storage knows
        each table's."""
        with self.storage.condition:
            for name, info in self.storage.tables.items():
                if name.lower() == table.lower():
                    identity = (None if info.rowid_column is None
                                else info.columns[info.rowid_column].lower())
                    return identity, info.columns
        return None, ()

    def reset_identity(self, table: str) -> None:
        """TRUNCATE TABLE starts the IDENTITY over (not undone by a ROLLBACK)."""
        with self.storage.condition:
            try:
                self.db.execute("DELETE FROM main.sqlite_sequence WHERE name = ?", (table,))
            except sqlite3.OperationalError:   # no AUTOINCREMENT table yet
                pass

    def take_pending_error(self) -> ServerError | None:
        error, self.pending_error = self.pending_error, None
        return error

    def close(self) -> None:
        """The connection is gone: its transaction rolls back, its locks go."""
        self.in_transaction = False
        self.storage.close(self)

    def interrupt(self) -> None:
        """From the reader thread: stop the statement (storage's progress handler)
        or the lock wait."""
        self.attention.set()
        self.storage.wake()

    # --- transactions ---------------------------------------------------------------

    def begin(self) -> bytes:
        self.in_transaction = True
        self.trancount = 1
        self.doomed = False
        self.touched_at = None
        self.savepoints.clear()
        self.descriptor = self.server.next_descriptor()
        token = tds.envchange(tds.ENV_BEGIN_TRAN, tds.b_varbyte(struct.pack("<Q", self.descriptor)),
                              b"\x00")
        self.envchanges.append(token)
        return token

    def end(self, commit: bool) -> bytes:
        """COMMIT or ROLLBACK; the ENVCHANGE telling the client, or b'' if no
        transaction was open."""
        if not self.in_transaction:
            return b""
        if commit:
            self.storage.commit(self)
        else:
            self.storage.rollback(self)
        self.in_transaction = False
        self.trancount = 0
        self.doomed = False
        self.server.count("commits" if commit else "rollbacks")
        old = self.descriptor
        self.descriptor = 0
        token = tds.envchange(tds.ENV_COMMIT_TRAN if commit else tds.ENV_ROLLBACK_TRAN, b"\x00",
                              tds.b_varbyte(struct.pack("<Q", old)))
        self.envchanges.append(token)
        return token

    def abort_transaction(self) -> bytes:
        """What SQL Server does after a deadlock or an error of class 20 or more."""
        return self.end(commit=False)

    def transaction_manager(self, payload: bytes) -> tuple[bytes, str]:
        """A transaction manager request: (reply tokens, the statement it stands for)."""
        reader = tds.Reader(payload)
        tds.skip_all_headers(reader)
        request = reader.unpack("H")
        if request == 5:                                  # TM_BEGIN_XACT
            return self.begin() + tds.done(), "BEGIN TRANSACTION"
        if request in (7, 8):                             # TM_COMMIT_XACT / TM_ROLLBACK_XACT
            reader.b_varchar()
            flags = reader.byte() if not reader.done else 0
            commit = request == 7
            tokens = self.end(commit)
            if flags & 0x01:                              # fBeginXact: start the next one
                tokens += self.begin()
            return tokens + tds.done(), "COMMIT TRANSACTION" if commit else "ROLLBACK TRANSACTION"
        if request == 0:                                  # TM_GET_DTC_ADDRESS
            return tds.done(), "GET DTC ADDRESS"
        raise ServerFailure(ServerError(8004, 1, 16,
                                        f"Transaction manager request {request} is not supported."))

    # --- statements -------------------------------------------------------------------

    def run_batch(self, text: str, fault: Fault | None, token_done: int = tds.DONE,
                  params: dict | None = None) -> tuple[bytes, int]:
        """Run a batch; (tokens ending in a DONE-type token with MORE set, row count
        of the last statement). Raises ServerFailure, Disconnect, Interrupted."""
        if fault is not None:
            self.apply_fault(fault)
        found = _APPLOCK.match(text)
        if found:
            arguments = {name.lower(): _argument(value, params or {})
                         for name, value in _APPLOCK_ARGUMENT.findall(found.group(2))}
            return self.applock(found.group(1).lower(), arguments, token_done), 0
        nodes = translate_batch(text)
        return BatchRun(self, params or {}, token_done).run(nodes), self.rowcount

    def apply_fault(self, fault: Fault) -> None:
        if fault.delay:
            if self.attention.wait(fault.delay):
                raise Interrupted()
        if fault.disconnect == "before":
            raise Disconnect()
        if fault.error is not None:
            error = fault.error
            raise ServerFailure(ServerError(error.number, error.state, error.severity,
                                            error.message.replace("{spid}", str(self.spid))))

    def _run_step(self, step: Step, params: dict, token_done: int) -> tuple[bytes, int]:
        more = tds.DONE_MORE
        if step.kind == "waitfor":
            if self.attention.wait(step.seconds):
                raise Interrupted()
            return tds.done(more, token=token_done), 0
        if step.kind == "begin":
            if self.in_transaction:
                return tds.done(more, token=token_done), 0
            return self.begin() + tds.done(more, token=token_done), 0
        if step.kind in ("commit", "rollback"):
            if not self.in_transaction and not step.flag:
                number = 3902 if step.kind == "commit" else 3903
                raise ServerFailure(ServerError(number, 1, 16, (
                    f"The {step.kind.upper()} TRANSACTION request has no corresponding "
                    "BEGIN TRANSACTION.")))
            return self.end(step.kind == "commit") + tds.done(more, token=token_done), 0
        if step.kind == "kill":
            self.server.kill(step.data_type, by=self)
            return tds.done(more, token=token_done), 0
        if step.kind in ("save", "rollback_to"):
            return self._savepoint(step) + tds.done(more, token=token_done), 0
        if step.kind == "implicit":
            self.implicit_transactions = step.flag
            return tds.done(more, token=token_done), 0
        if step.kind == "noop":
            self._set_option(step.text)
            return tds.done(more, token=token_done), 0
        if step.kind == "typeinfo":
            return type_info(step.data_type, token_done), 1
        return self._run_sql(step, params, token_done)

    def _savepoint(self, step: Step) -> bytes:
        """SAVE TRANSACTION name, ROLLBACK TRANSACTION name: SQLite's SAVEPOINT and
        ROLLBACK TO, inside the open transaction."""
        prefix = b""
        if not self.in_transaction and self.implicit_transactions and step.kind == "save":
            prefix = self.begin()
        if not self.in_transaction:
            number, message = ((628, "Cannot issue SAVE TRANSACTION when there is no active "
                                "transaction.") if step.kind == "save" else
                               (3903, "The ROLLBACK TRANSACTION request has no corresponding "
                                "BEGIN TRANSACTION."))
            raise ServerFailure(ServerError(number, 1, 16, message))
        name = step.text.lower()
        if step.kind == "save":
            self.savepoints[name] = len(self.undo)
            return prefix
        if name not in self.savepoints:    # not a savepoint: the BEGIN TRAN's own name
            return self.end(commit=False)
        mark = self.savepoints[name]
        self.storage.rollback(self, mark, release=False)
        for other in [n for n, at in self.savepoints.items() if at > mark]:
            del self.savepoints[other]
        return b""

    def _run_sql(self, step: Step, params: dict, token_done: int) -> tuple[bytes, int]:
        prefix = b""
        if not self.in_transaction and self.implicit_transactions:
            prefix = self.begin()
        lowered = step.sql.lower()

        def fill(db):
            if "tds_stats" in lowered:
                self.server.fill_stats(db)
            if "tds_sys_dm_" in lowered:
                self.server.fill_sessions(db)
        if self.in_transaction and self.touched_at is None:
            self.touched_at = datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S.%f")
        missing = [name for name in step.params if name not in params]
        if missing:
            raise ServerFailure(ServerError(137, 2, 15,
                                            f'Must declare the scalar variable "@{missing[0]}".'))
        description, rows, rowcount = self._execute(
            step, {name: params[name] for name in step.params}, before=fill)
        if rows is None:
            count = max(rowcount, 0)
            status = tds.DONE_MORE | (tds.DONE_COUNT if rowcount >= 0 and _is_dml(step.sql) else 0)
            return prefix + tds.done(status, count, token=token_done,
                                     command=_command(step.sql)), count
        names = [d[0] for d in description]
        columns, values = result_columns(names, rows)
        body = bytearray(prefix + tds.colmetadata(columns))
        for value in values:
            body += tds.row(columns, value)
        body += tds.done(tds.DONE_MORE | tds.DONE_COUNT, len(values), token=token_done)
        return bytes(body), len(values)

    def _set_option(self, text: str) -> None:
        """The SET options the lock manager reads; the others change nothing here."""
        found = _LOCK_TIMEOUT.match(text)
        if found:
            self.owner.lock_timeout_ms = int(found.group(1))
            return
        found = _DEADLOCK_PRIORITY.match(text)
        if found:
            value = found.group(1).lower()
            self.owner.deadlock_priority = DEADLOCK_PRIORITIES.get(value) if value in \
                DEADLOCK_PRIORITIES else max(-10, min(10, int(value)))
            return
        found = _ISOLATION.match(text)
        if found:
            self.isolation = " ".join(found.group(1).lower().split())

    def applock(self, procedure: str, arguments: dict, token_done: int) -> bytes:
        """sp_getapplock / sp_releaseapplock: a lock on a name, the transaction's
        (the default) or the session's; the return status as SQL Server gives it
        (0 granted, 1 granted after a wait, -1 timed out, -2 cancelled, -3 deadlock
        victim, -999 a bad argument)."""
        resource = ("app", str(arguments.get("@resource", "")))
        owner_kind = str(arguments.get("@lockowner") or "Transaction").lower()
        duration = SESSION if owner_kind == "session" else TRANSACTION
        prefix = b""
        if duration == TRANSACTION and not self.in_transaction and self.implicit_transactions:
            prefix = self.begin()
        if duration == TRANSACTION and not self.in_transaction:
            raise ServerFailure(ServerError(1223 if procedure == "sp_releaseapplock" else 1221, 1, 16,
                                            "You attempted to acquire a transactional application "
                                            "lock without an active transaction."))
        if procedure == "sp_releaseapplock":
            with self.storage.condition:
                status = 0 if self.storage.locks.release_one(self.owner, resource) else -999
        else:
            mode = APPLOCK_MODES.get(str(arguments.get("@lockmode") or "").lower())
            timeout = arguments.get("@locktimeout")
            if mode is None:
                status = -999
            else:
                with self.storage.condition:
                    self.owner.rollback_cost = len(self.undo)
                    try:
                        status = int(self.storage.locks.acquire(
                            self.owner, resource, mode, duration, cancelled=self.attention.is_set,
                            timeout_ms=None if timeout is None else int(timeout)))
                    except LockWaitEnded as exc:
                        if exc.reason == "cancel":
                            raise Interrupted() from None
                        status = {"timeout": -1, "deadlock": -3}[exc.reason]
        return prefix + tds.returnstatus(status) + tds.done(tds.DONE_MORE, token=token_done)

    # --- RPC ----------------------------------------------------------------------------

    def rpc(self, payload: bytes, faults) -> tuple[bytes, str]:
        """An RPC request, perhaps several calls batched: (reply tokens, the statement
        text of the last call)."""
        reader = tds.Reader(payload)
        tds.skip_all_headers(reader)
        calls = []
        while True:
            calls.append(_read_call(reader))
            if reader.done:
                break
            reader.byte()                        # 0xFF (0x80 before TDS 7.2) between calls
        out = bytearray()
        statement = ""
        for index, (name, parameters) in enumerate(calls):
            procedure = name.split(".")[-1].strip("[]").lower()
            log.debug("spid %d calls %s", self.spid, procedure)
            tokens, statement = self._procedure(procedure, name, parameters, faults)
            out += tokens if index == len(calls) - 1 else _more(tokens)
        return bytes(out), statement

    def _procedure(self, procedure: str, name: str, parameters, faults) -> tuple[bytes, str]:
        handle_out = None
        if procedure == "sp_executesql":
            statement = str(parameters[0].value)
            names = _declared_names(parameters[1].value if len(parameters) > 1 else "")
            values = parameters[2:]
        elif procedure in ("sp_prepexec", "sp_prepare"):
            names = _declared_names(parameters[1].value)
            statement = str(parameters[2].value)
            handle_out = self.server.next_handle()
            self.prepared[handle_out] = Prepared(statement, names)
            values = parameters[3:]
            if procedure == "sp_prepare":
                return (tds.returnstatus(0) + tds.returnvalue_int(0, parameters[0].name, handle_out)
                        + tds.done(tds.DONE_FINAL, token=tds.DONEPROC)), statement
        elif procedure == "sp_execute":
            prepared = self.prepared.get(parameters[0].value)
            if prepared is None:
                raise ServerFailure(ServerError(8179, 4, 16, (
                    f"Could not find prepared statement with handle {parameters[0].value}.")))
            statement, names, values = prepared.statement, prepared.names, parameters[1:]
        elif procedure in ("sp_datatype_info_100", "sp_datatype_info"):
            data_type = parameters[0].value if parameters else 0
            return (type_info(int(data_type or 0), tds.DONEINPROC) + tds.returnstatus(0)
                    + tds.done(tds.DONE_FINAL, token=tds.DONEPROC)), procedure
        elif procedure in ("sp_getapplock", "sp_releaseapplock"):
            arguments = {(p.name or "").lower(): p.value for p in parameters}
            return (self.applock(procedure, arguments, tds.DONEINPROC)[:-13]
                    + tds.done(tds.DONE_FINAL, token=tds.DONEPROC)), procedure
        elif procedure == "sp_unprepare":
            self.prepared.pop(parameters[0].value if parameters else None, None)
            return tds.returnstatus(0) + tds.done(tds.DONE_FINAL, token=tds.DONEPROC), "sp_unprepare"
        else:
            raise ServerFailure(ServerError(2812, 62, 16,
                                            f"Could not find stored procedure '{name}'."))
        bound = {}
        for index, parameter in enumerate(values):
            key = parameter.name.lstrip("@") if parameter.name else (
                names[index] if index < len(names) else f"P{index + 1}")
            bound[key] = parameter.value
        fault = faults.take(statement)
        tokens, _ = self.run_batch(statement, fault, token_done=tds.DONEINPROC, params=bound)
        tokens += tds.returnstatus(0)
        if handle_out is not None:
            tokens += tds.returnvalue_int(0, parameters[0].name, handle_out)
        return tokens + tds.done(tds.DONE_FINAL, token=tds.DONEPROC), statement


# sp_datatype_info_100: what SQLGetTypeInfo answers for the types drivers ask about
# on connect (pyodbc reads COLUMN_SIZE: the longest varchar, the datetime precision).
TYPE_INFO_COLUMNS = [
    tds.Column("TYPE_NAME", "nvarchar", 256), tds.Column("DATA_TYPE", "smallint"),
    tds.Column("PRECISION", "int"), tds.Column("LITERAL_PREFIX", "varchar", 32),
    tds.Column("LITERAL_SUFFIX", "varchar", 32), tds.Column("CREATE_PARAMS", "varchar", 32),
    tds.Column("NULLABLE", "smallint"), tds.Column("CASE_SENSITIVE", "smallint"),
    tds.Column("SEARCHABLE", "smallint"), tds.Column("UNSIGNED_ATTRIBUTE", "smallint"),
    tds.Column("MONEY", "smallint"), tds.Column("AUTO_INCREMENT", "smallint"),
    tds.Column("LOCAL_TYPE_NAME", "nvarchar", 256), tds.Column("MINIMUM_SCALE", "smallint"),
    tds.Column("MAXIMUM_SCALE", "smallint"), tds.Column("SQL_DATA_TYPE", "smallint"),
    tds.Column("SQL_DATETIME_SUB", "smallint"), tds.Column("NUM_PREC_RADIX", "int"),
    tds.Column("INTERVAL_PRECISION", "smallint"), tds.Column("USERTYPE", "smallint"),
]
TYPE_INFO_ROWS = {
    12: ("varchar", 12, 8000, "'", "'", "max length", 1, 0, 3, None, 0, None, "varchar",
         None, None, 12, None, None, None, 2),
    -9: ("nvarchar", -9, 4000, "N'", "'", "max length", 1, 0, 3, None, 0, None, "nvarchar",
         None, None, -9, None, None, None, 0),
    -3: ("varbinary", -3, 8000, "0x", None, "max length", 1, 0, 2, None, 0, None,
         "varbinary", None, None, -3, None, None, None, 4),
    93: ("datetime2", 93, 27, "'", "'", "scale", 1, 0, 3, None, 0, None, "datetime2", 0, 7,
         9, 3, None, None, 0),
}


def type_info(data_type: int, token_done: int) -> bytes:
    rows = [TYPE_INFO_ROWS[data_type]] if data_type in TYPE_INFO_ROWS else []
    body = bytearray(tds.colmetadata(TYPE_INFO_COLUMNS))
    for values in rows:
        body += tds.row(TYPE_INFO_COLUMNS, values)
    return bytes(body) + tds.done(tds.DONE_MORE | tds.DONE_COUNT, len(rows), token=token_done)


def _read_call(reader: tds.Reader) -> tuple[str, list]:
    """One call of an RPC request: the procedure's name (or well-known id) and its
    parameters."""
    length = reader.unpack("H")
    if length == 0xFFFF:
        number = reader.unpack("H")
        name = PROCEDURES.get(number, f"procedure id {number}")
    else:
        name = reader.take(length * 2).decode("utf-16-le")
    reader.unpack("H")                                   # option flags
    parameters = []
    while not reader.done and reader.data[reader.offset] not in (0x80, 0xFF):
        parameters.append(tds.read_parameter(reader))
    return name, parameters


def _more(tokens: bytes) -> bytes:
    """Set MORE on the final DONEPROC of a call that another call follows."""
    status = int.from_bytes(tokens[-12:-10], "little") | tds.DONE_MORE
    return tokens[:-12] + status.to_bytes(2, "little") + tokens[-10:]


def _argument(text: str, params: dict):
    """One argument of an EXEC in a batch: a string, a number or a bound parameter."""
    if text.startswith("@"):
        return params.get(text[1:])
    if text.upper().startswith("N'"):
        text = text[1:]
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    return int(text)


def _declared_names(declaration) -> list[str]:
    return re.findall(r"@(\w+)", str(declaration or ""))


_COMMANDS = {"SELECT": 0xC1, "INSERT": 0xC3, "DELETE": 0xC4, "UPDATE": 0xC5, "CREATE": 0xC6,
             "DROP": 0xC7}


def _command(sql: str) -> int:
    """DONE's CurCmd: the kind of statement the count belongs to."""
    return _COMMANDS.get(sql.lstrip().split(" ", 1)[0].upper(), 0xC1)


def _is_dml(sql: str) -> bool:
    return sql.lstrip().split(" ", 1)[0].upper() in ("INSERT", "UPDATE", "DELETE", "REPLACE")


def _server_property(name):
    return {"productversion": PRODUCT_VERSION, "productlevel": "RTM",
            "edition": "Developer Edition (64-bit)", "engineedition": 3,
            "servername": SERVER_NAME, "machinename": SERVER_NAME,
            "collation": "SQL_Latin1_General_CP1_CI_AS"}.get(str(name).lower())


_NO_TABLE = re.compile(r"no such table: (?:\w+\.)?(\S+)")
_NO_COLUMN = re.compile(r"no such column: (\S+)")
_TABLE_EXISTS = re.compile(r"(?:table|index) (\S+) already exists")
_UNIQUE = re.compile(r"UNIQUE constraint failed: (\w+)\.")
_LENGTH = re.compile(r"CHECK constraint failed: tds_len__(\w+?)__(\w+)__\d+")
_NOT_NULL = re.compile(r"NOT NULL constraint failed: (\w+)\.(\w+)")


def _unique_index(db: sqlite3.Connection, table: str, columns: str) -> str | None:
    """The CREATE UNIQUE INDEX (not a UNIQUE constraint) over exactly these columns."""
    def plain(value):   # this connection's converters tag declared columns' values
        return getattr(value, "value", value)

    wanted = [c.strip().split(".")[-1] for c in columns.split(",")]
    for (name,) in db.execute("SELECT name FROM main.sqlite_master WHERE type = 'index' "
                              "AND tbl_name = ? AND sql LIKE 'CREATE UNIQUE INDEX%'", (table,)):
        name = plain(name)
        if [plain(row[2]) for row in db.execute(f'PRAGMA main.index_info("{name}")')] == wanted:
            return name
    return None


def sqlite_error(exc: sqlite3.Error, spid: int, db: sqlite3.Connection | None = None) -> ServerError:
    """SQL Server's error for what SQLite said (2601 or 2627 for a duplicate key,
    as the unique index or constraint it broke)."""
    text = str(exc)
    found = _NO_TABLE.search(text)
    if found:
        return ServerError(208, 1, 16, f"Invalid object name '{found.group(1)}'.")
    found = _NO_COLUMN.search(text)
    if found:
        return ServerError(207, 1, 16, f"Invalid column name '{found.group(1).split('.')[-1]}'.")
    found = _TABLE_EXISTS.search(text)
    if found:
        return ServerError(2714, 6, 16,
                           f"There is already an object named '{found.group(1)}' in the database.")
    found = _UNIQUE.search(text)
    if found and db is not None:
        index = _unique_index(db, found.group(1), text.split(":", 1)[1])
        if index is not None:
            return ServerError(2601, 1, 14, (
                f"Cannot insert duplicate key row in object 'dbo.{found.group(1)}' with "
                f"unique index '{index}'."))
    if found:
        table = found.group(1)
        if "PRIMARY" in text.upper() or ".rowid" in text:
            return ServerError(2627, 1, 14, (
                f"Violation of PRIMARY KEY constraint 'PK_{table}'. Cannot insert duplicate key "
                f"in object 'dbo.{table}'."))
        return ServerError(2627, 1, 14, (
            f"Violation of UNIQUE KEY constraint 'UQ_{table}'. Cannot insert duplicate key in "
            f"object 'dbo.{table}'."))
    found = _LENGTH.search(text)
    if found:
        return ServerError(2628, 1, 16, (
            f"String or binary data would be truncated in table 'test.dbo.{found.group(1)}', "
            f"column '{found.group(2)}'."))
    found = _NOT_NULL.search(text)
    if found:
        return ServerError(515, 2, 16, (
            f"Cannot insert the value NULL into column '{found.group(2)}', table "
            f"'test.dbo.{found.group(1)}'; column does not allow nulls. INSERT fails."))
    if "database is locked" in text or "database table is locked" in text:
        return ServerError(1205, 51, 13, (
            f"Transaction (Process ID {spid}) was deadlocked on lock resources with another "
            "process and has been chosen as the deadlock victim. Rerun the transaction."))
    if "syntax error" in text:
        near = re.search(r'near "([^"]*)"', text)
        return ServerError(102, 1, 15, f"Incorrect syntax near '{near.group(1) if near else ''}'.")
    if "no such function" in text:
        name = text.split(":")[-1].strip()
        return ServerError(195, 10, 15, f"'{name}' is not a recognized built-in function name.")
    return ServerError(50000, 1, 16, f"SQLite: {text}")


def translation_error(exc: TranslationError) -> ServerError:
    return ServerError(exc.number, exc.state, exc.severity, exc.message)
