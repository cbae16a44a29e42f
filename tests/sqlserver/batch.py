"""Running one batch as SQL Server does: statement by statement, each with its own DONE;
control flow (IF/ELSE, TRY/CATCH, THROW, variables); @@TRANCOUNT nesting; and what an
error ends: the statement (most errors: the batch goes on), the batch (THROW, a name
that does not resolve), or the batch and the transaction (deadlock, conversion errors,
anything under XACT_ABORT ON). Inside TRY an error jumps to CATCH instead.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from . import session as sessions
from . import tds
from .faults import ServerError
from .login import SERVER_NAME
from .translate import Assign, If, Loop, Message, Return, Step, Throw, Try, While
from .types import result_columns

# Errors that end the batch (SQL Server's batch-abort); those marked True also roll the
# transaction back. 208/207/137 come from name resolution when the statement runs,
# which a TRY in the same batch cannot catch.
_ENDS_BATCH = {208: False, 207: False, 137: False, 4104: False, 2812: False,
               1205: True, 245: True, 241: True, 8114: True}
_UNCATCHABLE = {208, 207, 137}
_WRITES = ("INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "REPLACE")


@dataclass
class SessionOptions:
    """SET options that outlive a batch."""
    nocount: bool = False
    xact_abort: bool = False
    identity_insert: str | None = None      # the table with IDENTITY_INSERT ON


class _Caught(Exception):
    def __init__(self, error: ServerError) -> None:
        super().__init__(error.message)
        self.error = error


class _BatchEnded(Exception):
    """The batch stops here (an error that aborts it, or RETURN)."""


class _LoopJump(Exception):
    def __init__(self, leave: bool) -> None:
        super().__init__("BREAK" if leave else "CONTINUE")
        self.leave = leave


class BatchRun:
    def __init__(self, session, params: dict, token_done: int) -> None:
        self.session = session
        self.variables = dict(params)
        self.token_done = token_done
        self.out = bytearray()
        self.try_depth = 0
        self.loops = 0

    def run(self, nodes: list) -> bytes:
        try:
            self.block(nodes)
        except _BatchEnded:
            pass
        session = self.session
        if session.doomed and session.in_transaction:
            self.out += self._error_tokens(ServerError(
                3998, 1, 16, "Uncommittable transaction is detected at the end of the batch. "
                "The transaction is rolled back.")) + session.abort_transaction()
            self.out += tds.done(tds.DONE_ERROR | tds.DONE_MORE, token=self.token_done)
        session.doomed = session.doomed and session.in_transaction
        if not self.out:
            self.out += tds.done(tds.DONE_MORE, token=self.token_done)
        return bytes(self.out)

    # --- control flow ---------------------------------------------------------------------

    def block(self, nodes: list) -> None:
        for node in nodes:
            if self.session.attention.is_set():
                raise sessions.Interrupted()
            self.node(node)

    def node(self, node) -> None:
        if isinstance(node, If):
            value = self._scalar(node.condition)
            if value is not _FAILED:
                self.block(node.then if value else node.otherwise)
        elif isinstance(node, Try):
            self._try(node)
        elif isinstance(node, Assign):
            self._assign(node)
        elif isinstance(node, Throw):
            self._throw(node)
        elif isinstance(node, Return):
            raise _BatchEnded()
        elif isinstance(node, While):
            self._while(node)
        elif isinstance(node, Loop):
            if not self.loops:
                self.fail(ServerError(135, 1, 15, "Cannot use a BREAK statement outside the "
                                      "scope of a WHILE statement."))
                return
            raise _LoopJump(node.leave)
        elif isinstance(node, Message):
            self._message(node)
        elif isinstance(node, list):
            for step in node:
                self.statement(step)
        else:
            self.statement(node)

    def _while(self, node: While) -> None:
        self.loops += 1
        try:
            while True:
                value = self._scalar(node.condition)
                if value is _FAILED or not value:
                    return
                try:
                    self.block(node.body)
                except _LoopJump as jump:
                    if jump.leave:
                        return
        finally:
            self.loops -= 1

    def _message(self, node: Message) -> None:
        text = self._scalar(node.text)
        if text is _FAILED:
            return
        text = "" if text is None else str(text)
        if node.severity > 10:
            self.fail(ServerError(50000, node.state, node.severity, text))
            return
        self.out += tds.message_token(tds.INFO, 50000 if node.raised else 0, node.state,
                                      node.severity, text, SERVER_NAME)

    def _try(self, node: Try) -> None:
        self.try_depth += 1
        try:
            self.block(node.body)
        except _Caught as caught:
            self.try_depth -= 1
            previous = self.session.caught_error
            self.session.caught_error = caught.error
            try:
                self.block(node.catch)
            finally:
                self.session.caught_error = previous
            return
        self.try_depth -= 1

    def _assign(self, node: Assign) -> None:
        if node.value is None:
            self.variables[node.name] = None
            return
        rows = self._rows(node.value)
        if rows is _FAILED:
            return
        if rows or not node.select:
            self.variables[node.name] = rows[-1][0] if rows else None
        self.session.rowcount = len(rows) if node.select else 1

    def _throw(self, node: Throw) -> None:
        if node.arguments is None:
            error = self.session.caught_error
            if error is None:
                error = ServerError(10704, 1, 15, "To rethrow an error, a THROW statement must "
                                    "be used inside a CATCH block.")
            self.fail(error, thrown=True)
            return
        rows = self._rows(node.arguments)
        if rows is _FAILED:
            return
        number, message, state = rows[0][:3]
        if int(number) < 50000:
            self.fail(ServerError(35100, 10, 16, "Error number in THROW statement is outside "
                                  "the valid range. Specify an error number in the valid "
                                  "range of 50000 to 2147483647."))
            return
        self.fail(ServerError(int(number), int(state), 16, str(message)), thrown=True)

    # --- statements -----------------------------------------------------------------------

    def statement(self, step: Step) -> None:
        session = self.session
        try:
            tokens, count = self._execute(step)
        except sessions.ServerFailure as failure:
            self.fail(session.take_pending_error() or failure.error)
            return
        if session.options.nocount:
            tokens = _without_count(tokens)
        session.rowcount = count
        session.last_error = 0
        self.out += tokens

    def _execute(self, step: Step) -> tuple[bytes, int]:
        session = self.session
        more = tds.DONE_MORE
        done = tds.done(more, token=self.token_done)
        if step.kind == "option":
            setattr(session.options, step.text.lower(), step.flag)
            return done, 0
        if step.kind == "identity_insert":
            return self._identity_insert(step), 0
        if step.kind == "begin" and session.in_transaction:
            session.trancount += 1
            return done, 0
        if step.kind == "commit" and session.in_transaction:
            if session.doomed:
                raise sessions.ServerFailure(_UNCOMMITTABLE)
            if session.trancount > 1:
                session.trancount -= 1
                return done, 0
        if step.kind == "truncate":
            tokens, _ = session._run_step(Step("sql", sql=f'DELETE FROM "{step.table}"',
                                               text=step.text), {}, self.token_done)
            session.reset_identity(step.table)
            return _without_count(tokens), 0
        if step.kind == "sql":
            if session.doomed and step.sql.lstrip().split(" ", 1)[0].upper() in _WRITES:
                raise sessions.ServerFailure(_UNCOMMITTABLE)
            if step.table and step.sql.lstrip().upper().startswith("INSERT"):
                step = self._check_identity(step)
            if step.before:
                return self._update_with_old_values(step)
        return session._run_step(step, self.variables, self.token_done)

    def _identity_insert(self, step: Step) -> bytes:
        session = self.session
        if self._identity_column(step.table) is None:
            raise sessions.ServerFailure(ServerError(8106, 1, 16, (
                f"Table '{step.table}' does not have the identity property. Cannot perform SET "
                "operation.")))
        current = session.options.identity_insert
        if step.flag and current and current.lower() != step.table.lower():
            raise sessions.ServerFailure(ServerError(8107, 1, 16, (
                f"IDENTITY_INSERT is already ON for table 'test.dbo.{current}'. Cannot perform "
                f"SET operation for table '{step.table}'.")))
        if step.flag:
            session.options.identity_insert = step.table
        elif current and current.lower() == step.table.lower():
            session.options.identity_insert = None
        return tds.done(tds.DONE_MORE, token=self.token_done)

    def _identity_column(self, table: str) -> str | None:
        return self.session.identity_column(table)[0]

    def _check_identity(self, step: Step) -> Step:
        """544/545; an INSERT without a column list names the columns but the IDENTITY,
        as SQL Server fills them."""
        identity, columns = self.session.identity_column(step.table)
        if identity is None:
            return step
        allowed = (self.session.options.identity_insert or "").lower() == step.table.lower()
        if identity in step.columns and not allowed:
            raise sessions.ServerFailure(ServerError(544, 1, 16, (
                f"Cannot insert explicit value for identity column in table '{step.table}' when "
                "IDENTITY_INSERT is set to OFF.")))
        if allowed and identity not in step.columns:
            raise sessions.ServerFailure(ServerError(545, 1, 16, (
                f"Explicit value must be specified for identity column in table '{step.table}' "
                "either when IDENTITY_INSERT is set to ON or when a replication user is "
                "inserting into a NOT FOR REPLICATION identity column.")))
        if not step.columns and not allowed:
            named = ", ".join('"' + c.replace('"', '""') + '"' for c in columns
                              if c.lower() != identity)
            sql = _INSERT_TARGET.sub(lambda found: f"{found.group(0)} ({named}) ", step.sql, count=1)
            return dataclasses.replace(step, sql=sql)
        return step

    def _update_with_old_values(self, step: Step) -> tuple[bytes, int]:
        """UPDATE ... OUTPUT deleted.x: the old rows read first, joined by rowid."""
        old = {getattr(row[0], "value", row[0]): row[1:]
               for row in self._query(step.before)}
        new = self._query(step)
        rows = []
        for row in new:
            rowid = getattr(row[0], "value", row[0])
            before = old.get(rowid, (None,) * len(step.output))
            rows.append(tuple((before if source == "deleted" else row[1:])[index - 1]
                              for source, index, _ in step.output))
        columns, values = result_columns([name for _, _, name in step.output], rows)
        body = bytearray(tds.colmetadata(columns))
        for value in values:
            body += tds.row(columns, value)
        return bytes(body) + tds.done(tds.DONE_MORE | tds.DONE_COUNT, len(values),
                                      token=self.token_done), len(values)

    # --- expressions ----------------------------------------------------------------------

    def _query(self, step: Step) -> list:
        missing = [name for name in step.params if name not in self.variables]
        if missing:
            raise sessions.ServerFailure(ServerError(
                137, 2, 15, f'Must declare the scalar variable "@{missing[0]}".'))
        return self.session.query(step, {name: self.variables[name] for name in step.params})

    def _rows(self, step: Step):
        try:
            rows = self._query(step)
        except sessions.ServerFailure as failure:
            self.fail(failure.error)
            return _FAILED
        return [tuple(getattr(value, "value", value) for value in row) for row in rows]

    def _scalar(self, step: Step):
        rows = self._rows(step)
        if rows is _FAILED:
            return _FAILED
        return rows[0][0] if rows else None

    # --- errors ---------------------------------------------------------------------------

    def fail(self, error: ServerError, thrown: bool = False) -> None:
        """An error where SQL Server would raise it: to CATCH, or to the client, and then
        on with the next statement or not."""
        session = self.session
        session.last_error = error.number
        session.rowcount = 0
        if error.severity >= 20:     # the server answers it (and counts it) and closes
            failure = sessions.ServerFailure(error)
            failure.before = bytes(self.out)
            raise failure
        session.server.count("errors")
        if error.number in (2601, 2627):
            session.server.count("duplicate_keys")
        rolls_back = _ENDS_BATCH.get(error.number, False)
        if error.number == 1205:
            self.out += session.abort_transaction()
        if self.try_depth and error.number not in _UNCATCHABLE:
            if (rolls_back or session.options.xact_abort) and session.in_transaction:
                session.doomed = True
            raise _Caught(error)
        tokens = self._error_tokens(error)
        ends = thrown or error.number in _ENDS_BATCH or session.options.xact_abort
        if rolls_back or session.options.xact_abort:
            tokens += session.abort_transaction()
        self.out += tokens + tds.done(tds.DONE_ERROR | tds.DONE_MORE, token=self.token_done)
        if ends:
            raise _BatchEnded()

    @staticmethod
    def _error_tokens(error: ServerError) -> bytes:
        return tds.message_token(tds.ERROR, error.number, error.state, error.severity,
                                 error.message, SERVER_NAME)


_FAILED = object()
_INSERT_TARGET = re.compile(r'^\s*INSERT\s+INTO\s+(?:"[^"]+"|\S+)(?=\s+(?:VALUES|SELECT|WITH|\())', re.I)
_UNCOMMITTABLE = ServerError(3930, 1, 16, "The current transaction cannot be committed and "
                             "cannot support operations that write to the log file. Roll back "
                             "the transaction.")


def _without_count(tokens: bytes) -> bytes:
    """SET NOCOUNT ON: the statement's DONE says no count."""
    if len(tokens) >= 13 and tokens[-13] in (tds.DONE, tds.DONEPROC, tds.DONEINPROC):
        status = int.from_bytes(tokens[-12:-10], "little") & ~tds.DONE_COUNT
        return tokens[:-12] + status.to_bytes(2, "little") + tokens[-10:-8] + bytes(8)
    return tokens
