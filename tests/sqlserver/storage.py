"""The server's storage: one SQLite connection shared by every TDS session, with the
server's own transactions on top (SQLite is storage only).

Each statement runs alone (one condition: the storage's) inside a SQLite savepoint
and is written to the file when it ends; what makes a transaction is the server's:
  - locks (locks.py), taken by temporary triggers as rows are written (X on the row
    and on each unique key it has or gets), and before a SELECT on the rows it reads
    (S for the statement under READ COMMITTED, held to the end with HOLDLOCK or
    REPEATABLE READ / SERIALIZABLE, U with UPDLOCK; READPAST skips locked rows,
    NOLOCK takes none);
  - an undo log, filled by the same triggers, that ROLLBACK (and ROLLBACK to a
    savepoint, and a deadlock victim) plays backwards.
A write that meets another transaction's lock undoes its statement, waits for the
lock (the condition is released while it waits) and runs again; so a second INSERT
of a key waits for the first transaction, then fails with 2627 or succeeds.

Known limits: a statement's WHERE is evaluated on the rows as they are (other
transactions' uncommitted writes included) to find what to lock, as an index seek
would, so a scan never waits for rows its predicate does not match; subqueries'
and derived tables' rows are not locked; DROP and ALTER are not undone by ROLLBACK.
"""
from __future__ import annotations

import logging
import re
import sqlite3
import threading
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from .locks import STATEMENT, TRANSACTION, SESSION, LockManager, LockWaitEnded

log = logging.getLogger("tds.storage")

_CREATE = re.compile(r'^\s*CREATE\s+(?:UNIQUE\s+)?(TABLE|INDEX)\s+(?:IF\s+NOT\s+EXISTS\s+)?'
                     r'(?:"?main"?\.)?"?(\w+)"?(?:\s+ON\s+(?:"?main"?\.)?"?(\w+)"?)?', re.I)
_SCHEMA_CHANGE = re.compile(r"^\s*(DROP|ALTER)\s+(TABLE|INDEX)\s+(?:IF\s+EXISTS\s+)?"
                            r'(?:"?main"?\.)?"?(\w+)"?', re.I)
NO_READ_LOCK = {"NOLOCK", "READUNCOMMITTED"}
HOLD_READ_LOCK = {"HOLDLOCK", "SERIALIZABLE", "REPEATABLEREAD"}


class LockConflict(Exception):
    """Raised inside a trigger: the row or key is another transaction's."""


@dataclass(frozen=True)
class TableInfo:
    columns: tuple[str, ...]
    rowid_column: int | None           # the INTEGER PRIMARY KEY, SQLite's rowid alias
    unique: tuple[tuple[str, tuple[int, ...]], ...]   # (index name, column positions)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _key(values) -> tuple:
    # CI_AS: keys that differ in case are the same key
    return tuple(v.lower() if isinstance(v, str) else v for v in values)


class Storage:
    def __init__(self, path: str, count) -> None:
        self.condition = threading.Condition(threading.RLock())
        self.locks = LockManager(self.condition, count)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                  detect_types=sqlite3.PARSE_DECLTYPES)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.current = None            # the session whose statement runs now
        self.replaying = False         # an undo is being played: the triggers stand aside
        self.tables: dict[str, TableInfo] = {}
        self.new_objects: dict[str, object] = {}   # created by a transaction still open
        self._lock_queries: dict[str, tuple] = {}
        self.db.create_function("tds_write", -1, self._write)
        self.db.create_function("tds_visible", 1, self._visible)
        self.db.set_progress_handler(self._progress, 1000)

    def setup(self, statements) -> None:
        with self.condition:
            for statement in statements:
                self.db.execute(statement)
            self.refresh_tables()

    def wake(self) -> None:
        """An ATTENTION arrived: let a lock wait see it."""
        with self.condition:
            self.condition.notify_all()

    def _progress(self) -> int:
        session = self.current
        return 1 if session is not None and session.attention.is_set() else 0

    def _visible(self, name) -> int:
        creator = self.new_objects.get(str(name).lower())
        return 1 if creator is None or creator is self.current else 0

    # --- tables and their triggers ----------------------------------------------------

    def refresh_tables(self) -> None:
        found = {}
        for (name,) in self.db.execute("SELECT name FROM main.sqlite_master WHERE type = 'table'"
                                       " AND name NOT LIKE 'sqlite_%'").fetchall():
            name = str(getattr(name, "value", name))
            columns = self.db.execute(f"PRAGMA main.table_info({_quote(name)})").fetchall()
            names = tuple(str(getattr(c[1], "value", c[1])) for c in columns)
            keys = [c for c in columns if c[5]]
            rowid = None
            if len(keys) == 1 and str(getattr(keys[0][2], "value", keys[0][2])).upper() == "INTEGER":
                rowid = keys[0][0]
            unique = []
            for index in self.db.execute(f"PRAGMA main.index_list({_quote(name)})").fetchall():
                index_name, is_unique = str(getattr(index[1], "value", index[1])), index[2]
                if not is_unique:
                    continue
                cols = [str(getattr(c[2], "value", c[2])) for c in self.db.execute(
                    f"PRAGMA main.index_info({_quote(index_name)})").fetchall()]
                if all(c in names for c in cols):
                    unique.append((index_name, tuple(names.index(c) for c in cols)))
            found[name] = TableInfo(names, rowid, tuple(unique))
        for name, info in found.items():
            if self.tables.get(name) != info:
                self._install_triggers(name, info)
        self.tables = found

    def _install_triggers(self, table: str, info: TableInfo) -> None:
        q, lit = _quote(table), "'" + table.replace("'", "''") + "'"
        old = ", ".join(f"OLD.{_quote(c)}" for c in info.columns)
        new = ", ".join(f"NEW.{_quote(c)}" for c in info.columns)
        triggers = {
            "bi": f"BEFORE INSERT ON main.{q} BEGIN SELECT tds_write({lit}, 'i', NULL, {new}); END",
            "ai": f"AFTER INSERT ON main.{q} BEGIN SELECT tds_write({lit}, 'I', NEW.rowid); END",
            "bu": f"BEFORE UPDATE ON main.{q} BEGIN SELECT tds_write({lit}, 'U', OLD.rowid, "
                  f"{old}, {new}); END",
            "bd": f"BEFORE DELETE ON main.{q} BEGIN SELECT tds_write({lit}, 'D', OLD.rowid, {old}); END",
        }
        for kind, body in triggers.items():
            name = _quote(f"tds_{kind}_{table}")
            self.db.execute(f"DROP TRIGGER IF EXISTS temp.{name}")
            self.db.execute(f"CREATE TEMP TRIGGER {name} {body}")

    # --- what the triggers do ------------------------------------------------------------

    def _lock(self, session, resource: tuple) -> None:
        if self.locks.try_acquire(session.owner, resource, "X", TRANSACTION):
            session.conflict = (resource, "X")
            raise LockConflict(str(resource))

    def _keys(self, table: str, info: TableInfo, values, inserting: bool = False) -> list[tuple]:
        keys = [("key", table, index, _key(values[i] for i in positions))
                for index, positions in info.unique]
        rowid = None if info.rowid_column is None else values[info.rowid_column]
        # before an INSERT, an IDENTITY the table will choose reads -1: the row is
        # locked once it has its number (the 'I' step)
        if rowid is not None and not (inserting and rowid == -1):
            keys.append(("row", table, rowid))
        return keys

    def _write(self, table, op, rowid, *values) -> None:
        session = self.current
        if self.replaying or session is None:
            return None
        info = self.tables[table]
        width = len(info.columns)
        if op == "i":      # before: the keys it will have, and no range another holds
            if self.locks.blockers(session.owner, ("range", table), "X"):
                session.conflict = (("range", table), "X")
                raise LockConflict(table)
            for resource in self._keys(table, info, values, inserting=True):
                self._lock(session, resource)
        elif op == "I":    # after: its row, and how to take it back
            self._lock(session, ("row", table, rowid))
            session.undo.append(("I", table, rowid))
        elif op == "U":
            before, after = values[:width], values[width:]
            self._lock(session, ("row", table, rowid))
            for resource in self._keys(table, info, before) + self._keys(table, info, after):
                self._lock(session, resource)
            new_rowid = rowid if info.rowid_column is None else after[info.rowid_column]
            session.undo.append(("U", table, new_rowid, rowid, before, info.columns))
        elif op == "D":
            self._lock(session, ("row", table, rowid))
            for resource in self._keys(table, info, values):
                self._lock(session, resource)
            session.undo.append(("D", table, rowid, values, info.columns))
        return None

    # --- statements ------------------------------------------------------------------------

    def execute(self, session, step, params: dict, before=None):
        """Run one SQLite statement for the session: (description, rows, rowcount).
        Waits for the locks it needs; raises LockWaitEnded, sqlite3.Error."""
        with self.condition:
            ddl = self._ddl_target(step.sql)
            self.current = session
            try:
                while True:
                    if ddl is not None:
                        self._wait(session, ("object", ddl), "X", TRANSACTION)
                    self._wait_for_new_tables(session, step)
                    sql = self._read_locks(session, step, params)
                    if before is not None:
                        before(self.db)
                    mark = len(session.undo)
                    session.conflict = None
                    self.db.execute("SAVEPOINT tds_statement")
                    try:
                        cursor = self.db.execute(sql, params)
                        rows = cursor.fetchall() if cursor.description else None
                    except sqlite3.Error:
                        if self.db.in_transaction:   # an interrupt may have ended it already
                            self.db.execute("ROLLBACK TO tds_statement")
                            self.db.execute("RELEASE tds_statement")
                        del session.undo[mark:]
                        conflict, session.conflict = session.conflict, None
                        if conflict is None:
                            self._statement_done(session)
                            raise
                        self._wait(session, *conflict, TRANSACTION)
                        continue
                    self.db.execute("RELEASE tds_statement")
                    if ddl is not None:
                        self._after_ddl(session, step.sql, ddl)
                    self._statement_done(session)
                    return cursor.description, rows, cursor.rowcount
            except LockWaitEnded:
                self._statement_done(session)
                raise
            finally:
                self.current = None

    def _statement_done(self, session) -> None:
        self.locks.release(session.owner, (STATEMENT,))
        if not session.in_transaction:      # autocommit: the statement was the transaction
            self.commit(session)

    def _wait(self, session, resource: tuple, mode: str, duration: str) -> None:
        session.owner.rollback_cost = len(session.undo)
        try:
            self.locks.acquire(session.owner, resource, mode, duration,
                               cancelled=session.attention.is_set)
        finally:
            self.current = session      # others ran statements while it waited

    def _ddl_target(self, sql: str) -> str | None:
        found = _CREATE.match(sql) or _SCHEMA_CHANGE.match(sql)
        if found is None:
            return None
        if found.re is _CREATE:
            return (found.group(3) or found.group(2)).lower()
        return found.group(3).lower()

    def _after_ddl(self, session, sql: str, target: str) -> None:
        found = _CREATE.match(sql)
        if found is not None and session.in_transaction:
            kind, name = found.group(1).upper(), found.group(2)
            session.undo.append(("DDL", f"DROP {kind} IF EXISTS main.{_quote(name)}"))
            if kind == "TABLE":
                self.new_objects[name.lower()] = session
        self.refresh_tables()

    def _wait_for_new_tables(self, session, step) -> None:
        """A table another transaction created and has not committed is its own."""
        for table, _, _ in getattr(step, "tables", ()) or ():
            creator = self.new_objects.get(table)
            if creator is not None and creator is not session:
                self._wait(session, ("object", table), "S", STATEMENT)

    # --- read locks --------------------------------------------------------------------

    def _read_modes(self, session, step) -> dict[str, tuple[str, str, bool]]:
        """alias -> (table, mode, duration, readpast) for the tables a SELECT reads."""
        level = session.isolation
        modes = {}
        for table, alias, hints in getattr(step, "tables", ()) or ():
            if table not in self.tables:
                continue
            if hints & NO_READ_LOCK or (level == "read uncommitted" and not hints):
                continue
            mode = "X" if "XLOCK" in hints else "U" if "UPDLOCK" in hints else "S"
            held = (mode != "S" or bool(hints & HOLD_READ_LOCK)
                    or level in ("repeatable read", "serializable"))
            modes[alias] = (table, mode, TRANSACTION if held else STATEMENT,
                            "READPAST" in hints,
                            bool(hints & {"HOLDLOCK", "SERIALIZABLE"}) or level == "serializable")
        return modes

    def _read_locks(self, session, step, params: dict) -> str:
        """Lock what a SELECT reads; the statement to run (without the rows READPAST
        skipped)."""
        if not step.returns_rows or not step.sql.lstrip().upper().startswith(("SELECT", "WITH")):
            return step.sql
        modes = self._read_modes(session, step)
        if not modes or all(mode == "S" and duration == STATEMENT and not
                            self.locks.others_write(session.owner, table)
                            for table, mode, duration, _, _ in modes.values()):
            return step.sql
        for table, mode, duration, _, ranged in modes.values():
            if ranged:
                self._wait(session, ("range", table), mode, TRANSACTION)
        plan = self._lock_query(step.sql, modes)
        if plan is None:
            return step.sql
        query, aliases, limit, tree = plan
        while True:
            skipped: dict[str, set] = {}
            try:
                found = self.db.execute(query, params).fetchall()
            except sqlite3.Error:
                return step.sql
            restart = False
            taken = 0
            for row in found:
                passed = True
                for alias, rowid in zip(aliases, row):
                    rowid = getattr(rowid, "value", rowid)   # types.py tags declared columns
                    table, mode, duration, readpast, _ = modes[alias]
                    if rowid is None:
                        continue
                    resource = ("row", table, rowid)
                    if self.locks.try_acquire(session.owner, resource, mode, duration):
                        if readpast:
                            skipped.setdefault(alias, set()).add(rowid)
                            passed = False
                            break
                        self._wait(session, resource, mode, duration)
                        restart = True
                        break
                if restart:
                    break
                taken += passed
                if limit is not None and taken >= limit:
                    break
            if not restart:
                break
        if not skipped:
            return step.sql
        tree = tree.copy()
        for alias, rowids in skipped.items():
            tree = tree.where(exp.not_(exp.column("rowid", table=alias).isin(
                *[exp.Literal.number(r) for r in sorted(rowids)])))
        return tree.sql("sqlite")

    def _lock_query(self, sql: str, modes: dict):
        """`SELECT alias.rowid, ... FROM <the same> WHERE <the same>`: the rows a SELECT
        reads, in its order; (query, aliases, limit, the SELECT's tree) or None."""
        key = sql + "\x00" + ",".join(sorted(modes))
        if key in self._lock_queries:
            return self._lock_queries[key]
        plan = None
        try:
            tree = sqlglot.parse_one(sql, read="sqlite")
        except SqlglotError:
            tree = None
        if isinstance(tree, exp.Select) and _from(tree) is not None:
            aliases = [alias for alias in self._aliases(tree) if alias in modes]
            if aliases:
                query = tree.copy()
                grouped = any(query.args.get(k) for k in ("group", "having", "distinct")) or \
                    any(e.find(exp.AggFunc) for e in query.expressions)
                query.set("expressions", [exp.column("rowid", table=a) for a in aliases])
                for part in ("group", "having", "distinct", "limit", "offset"):
                    query.set(part, None)
                if grouped:
                    query.set("order", None)
                limit = None
                found = tree.args.get("limit")
                if not grouped and found is not None and isinstance(found.expression, exp.Literal):
                    limit = int(found.expression.this)
                plan = (query.sql("sqlite"), aliases, limit, tree)
        self._lock_queries[key] = plan
        return plan

    @staticmethod
    def _aliases(tree: exp.Select) -> list[str]:
        sources = [_from(tree).this] + [join.this for join in tree.args.get("joins") or []]
        return [source.alias_or_name.lower() for source in sources if isinstance(source, exp.Table)]

    # --- transactions ------------------------------------------------------------------

    def commit(self, session) -> None:
        with self.condition:
            session.undo.clear()
            self._forget_objects(session)
            self.locks.release(session.owner, (STATEMENT, TRANSACTION))

    def rollback(self, session, mark: int = 0, release: bool = True) -> None:
        """Play the undo log back to `mark`; a whole rollback releases the locks."""
        with self.condition:
            entries = session.undo[mark:]
            del session.undo[mark:]
            self._replay(reversed(entries))
            if release:
                self._forget_objects(session)
                self.locks.release(session.owner, (STATEMENT, TRANSACTION))

    def close(self, session) -> None:
        with self.condition:
            self.rollback(session)
            self.locks.release(session.owner, (SESSION,))

    def _forget_objects(self, session) -> None:
        for name in [n for n, creator in self.new_objects.items() if creator is session]:
            del self.new_objects[name]

    def _replay(self, entries) -> None:
        """Put back what the entries changed, newest first. An entry that cannot be
        put back (a table dropped or altered since) is logged and skipped, so that one
        bad entry never leaves the rest undone."""
        self.replaying = True
        schema_changed = False
        try:
            for entry in entries:
                try:
                    schema_changed |= self._undo(entry)
                except sqlite3.Error as exc:
                    log.error("undo of %s on %s failed: %s", entry[0], entry[1], exc)
        finally:
            self.replaying = False
        if schema_changed:
            self.refresh_tables()

    def _undo(self, entry: tuple) -> bool:
        """One undo entry played; True if it changed the schema."""
        if entry[0] == "DDL":
            self.db.execute(entry[1])
            return True
        kind, table = entry[0], _quote(entry[1])
        if kind == "I":
            self.db.execute(f"DELETE FROM main.{table} WHERE rowid = ?", (entry[2],))
            return False
        columns = entry[-1]               # as the table was when the row was written
        if kind == "U":
            assignments = ", ".join(f"{_quote(c)} = ?" for c in columns)
            self.db.execute(f"UPDATE main.{table} SET {assignments} WHERE rowid = ?",
                            (*entry[4], entry[2]))
        elif kind == "D":
            names = ", ".join(["rowid"] + [_quote(c) for c in columns])
            marks = ", ".join("?" * (len(columns) + 1))
            self.db.execute(f"INSERT INTO main.{table} ({names}) VALUES ({marks})",
                            (entry[2], *entry[3]))
        return False


def _from(tree: exp.Select):
    return tree.args.get("from_") or tree.args.get("from")   # the key differs by sqlglot version


def table_locking(tree: exp.Expression) -> tuple:
    """(table, alias, hints) for each table a T-SQL statement names: what the lock
    manager needs from the statement (translate.py keeps it on the Step)."""
    ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    found = []
    for table in tree.find_all(exp.Table):
        name = table.name.lower()
        if not name or name in ctes or (table.args.get("db") is not None
                                        and table.args["db"].name.lower() in ("sys", "information_schema")):
            continue
        hints = set()
        for hint in table.args.get("hints") or []:
            for item in hint.expressions if isinstance(hint, exp.WithTableHint) else [hint]:
                hints.add(item.name.upper() if hasattr(item, "name") else str(item).upper())
        found.append((name, table.alias_or_name.lower(), frozenset(hints)))
    return tuple(found)
