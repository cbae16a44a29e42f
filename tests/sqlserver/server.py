"""The listening socket, one thread per TDS connection, and the server's counters.

Each connection has two threads: the reader takes packets off the socket (so that an
ATTENTION is seen while a statement runs) and queues the requests; the connection
thread answers them in order, one at a time.
"""
from __future__ import annotations

import itertools
import logging
import queue
import socket
import sqlite3
import threading
from pathlib import Path

from . import tds
from .faults import FaultBook, ServerError
from .login import SERVER_NAME, login_reply, parse_login7, prelogin_reply
from .session import (CATALOG_SQL, Disconnect, Interrupted, ServerFailure, Session,
                      register_functions, translation_error)
from .storage import Storage
from .translate import TranslationError

log = logging.getLogger("tds.server")

PASSWORD = "test"           # every user logs in with this password; others get 18456
# requests: every message answered (batches, RPCs, transaction manager requests), except
# those reading tds_stats; statements: batches and RPCs among them; unprepares: the
# sp_unprepare RPCs a driver sends when it frees a prepared statement.
COUNTERS = ("logins", "login_failures", "requests", "statements", "unprepares", "commits",
            "rollbacks", "attentions", "errors", "duplicate_keys", "disconnects", "faults",
            "connections", "kills", "lock_waits", "lock_timeouts", "deadlocks",
            "deadlock_victims")
_CLOSED = object()          # queued by the reader when the client went away


class TdsServer:
    def __init__(self, database: Path, faults: Path | None, port: int,
                 host: str = "127.0.0.1") -> None:
        self.database = str(database)
        self.faults = FaultBook(faults)
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.port = self.listener.getsockname()[1]
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()
        self._spids = itertools.count(51)
        self._descriptors = itertools.count(1)
        self._handles = itertools.count(1)
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        # logged-in connections by @@SPID: what KILL and sys.dm_exec_sessions see
        self._sessions: dict[int, tuple[Session, socket.socket]] = {}
        # One SQLite connection for every session, under the server's own locks and
        # transactions (storage.py). It must open, so that a bad path fails at start.
        self.storage = Storage(self.database, self.count)
        register_functions(self.storage)
        self.storage.setup(CATALOG_SQL)

    # --- counters -----------------------------------------------------------------------

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counters[name] += amount

    def next_spid(self) -> int:
        with self._lock:
            return next(self._spids)

    def next_descriptor(self) -> int:
        with self._lock:
            return next(self._descriptors)

    def next_handle(self) -> int:
        with self._lock:
            return next(self._handles)

    def fill_stats(self, db: sqlite3.Connection) -> None:
        """`SELECT * FROM tds_stats`: one row, one column per counter."""
        with self._lock:
            values = dict(self._counters)
        db.execute("CREATE TEMP TABLE IF NOT EXISTS tds_stats (" +
                   ", ".join(f"{name} BIGINT" for name in COUNTERS) + ")")
        db.execute("DELETE FROM temp.tds_stats")
        db.execute(f"INSERT INTO temp.tds_stats VALUES ({', '.join('?' * len(COUNTERS))})",
                   [values[name] for name in COUNTERS])

    def fill_sessions(self, db: sqlite3.Connection) -> None:
        """`sys.dm_exec_sessions` (one row per logged-in connection, with the columns
        a DBA reads to find a connection and whether it has a transaction open), and
        `sys.dm_tran_session_transactions` / `sys.dm_tran_database_transactions` (has
        that transaction touched the database, or is it the empty one a driver begins
        after each COMMIT)."""
        with self._lock:
            sessions = [session for _, (session, _) in sorted(self._sessions.items())]
        open_ = [s for s in sessions if s.in_transaction]
        db.execute("DELETE FROM temp.tds_sys_dm_exec_sessions")
        db.executemany("INSERT INTO temp.tds_sys_dm_exec_sessions VALUES (?, 1, 'sa', ?, 2, ?)",
                       [(s.spid, s.program_name, 1 if s.in_transaction else 0)
                        for s in sessions])
        db.execute("DELETE FROM temp.tds_sys_dm_tran_session_transactions")
        db.executemany("INSERT INTO temp.tds_sys_dm_tran_session_transactions VALUES (?, ?, 1)",
                       [(s.spid, s.descriptor) for s in open_])
        db.execute("DELETE FROM temp.tds_sys_dm_tran_database_transactions")
        db.executemany("INSERT INTO temp.tds_sys_dm_tran_database_transactions "
                       "VALUES (?, 5, ?)", [(s.descriptor, s.touched_at) for s in open_])

    def kill(self, spid: int, by: Session) -> None:
        """`KILL spid`: a session running a request is told 596 and closed, an idle one's
        socket is closed; its transaction rolls back when its session closes. Only sa
        may KILL (SQL Server: ALTER ANY CONNECTION)."""
        if by.login_name.lower() != "sa":
            raise ServerFailure(ServerError(6102, 1, 14,
                                            "User does not have permission to use the KILL statement."))
        if spid == by.spid:
            raise ServerFailure(ServerError(6104, 1, 16,
                                            "Cannot use KILL to kill your own process."))
        with self._lock:
            found = self._sessions.get(spid)
        if found is None:
            raise ServerFailure(ServerError(6106, 1, 16,
                                            f"Process ID {spid} is not an active process ID."))
        self.count("kills")
        victim, client = found
        if victim.busy:
            victim.killed = True
            victim.interrupt()
        else:
            _close(client)

    # --- life cycle -----------------------------------------------------------------------

    def serve_forever(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.count("connections")
            threading.Thread(target=self._serve_client, args=(client,), daemon=True,
                             name="tds-connection").start()
        self.listener.close()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            clients = list(self._sockets)
        for client in clients:
            _close(client)

    # --- one connection -----------------------------------------------------------------

    def _serve_client(self, client: socket.socket) -> None:
        with self._lock:
            self._sockets.add(client)
        session = None
        try:
            session = self._login(client)
            if session is not None:
                with self._lock:
                    self._sessions[session.spid] = (session, client)
                self._serve_requests(client, session)
        except (tds.ConnectionClosed, ConnectionError, OSError):
            pass
        except tds.ProtocolError as exc:
            log.error("closing a connection: %s", exc)
        finally:
            with self._lock:
                self._sockets.discard(client)
                if session is not None:
                    self._sessions.pop(session.spid, None)
            _close(client)
            if session is not None:
                session.close()

    def _login(self, client: socket.socket) -> Session | None:
        message = tds.read_message(client)
        if message.type == tds.PRELOGIN:
            client.sendall(tds.packets(prelogin_reply(), 4096, 0))
            message = tds.read_message(client)
        if message.type != tds.LOGIN7:
            raise tds.ProtocolError(f"expected LOGIN7, got packet type 0x{message.type:02X}")
        login = parse_login7(message.payload)
        packet_size = login.packet_size if 512 <= login.packet_size <= 32767 else 4096
        database = login.database or "test"
        fault = self.faults.take(login=True)
        if fault is not None and (fault.disconnect or fault.error or fault.delay):
            self.count("faults")
            if fault.delay and self._stopping.wait(fault.delay):
                return None
            if fault.disconnect:
                return None
        if fault is not None and fault.error is not None:
            error = fault.error
            self._refuse(client, error.number, error.state, error.severity, error.message,
                         packet_size)
            return None
        if login.password != PASSWORD:
            self._refuse(client, 18456, 1, 14, f"Login failed for user '{login.user}'.",
                         packet_size)
            return None
        spid = self.next_spid()
        session = Session(self, spid, packet_size, program_name=login.app,
                          login_name=login.user)
        self.count("logins")
        client.sendall(tds.packets(login_reply(database, packet_size), packet_size, spid))
        return session

    def _refuse(self, client, number, state, severity, message, packet_size) -> None:
        self.count("login_failures")
        reply = (tds.message_token(tds.ERROR, number, state, severity, message, SERVER_NAME)
                 + tds.done(tds.DONE_ERROR))
        client.sendall(tds.packets(reply, packet_size, 0))

    def _serve_requests(self, client: socket.socket, session: Session) -> None:
        requests: queue.Queue = queue.Queue()
        reader = threading.Thread(target=self._read_requests, args=(client, session, requests),
                                  daemon=True, name="tds-reader")
        reader.start()
        acknowledged = 0       # ATTENTIONs already answered while a request ran
        while True:
            message = requests.get()
            if message is _CLOSED:
                return
            if message.type == tds.ATTENTION:
                if acknowledged:
                    acknowledged -= 1
                else:
                    session.attention.clear()
                    self._send(client, session, tds.done(tds.DONE_ATTN))
                continue
            session.envchanges = []
            session.busy = True
            reply, close = self._answer(session, message)
            session.busy = False
            if session.killed:
                self._send(client, session, tds.message_token(
                    tds.ERROR, 596, 1, 21, "Cannot continue the execution because the session "
                    "is in the kill state.", SERVER_NAME) + tds.done(tds.DONE_ERROR))
                return
            if session.attention.is_set():
                # The client asked to stop: whatever was computed is dropped, but not
                # the transaction changes the driver must follow (a begin, a rollback);
                # the DONE with the attention flag ends the answer.
                session.attention.clear()
                acknowledged += 1
                reply = b"".join(session.envchanges) + tds.done(tds.DONE_ATTN)
            if close == "midway" and reply:
                # Part of the answer, then the connection drops: a client mid-result.
                data = tds.packets(reply, session.packet_size, session.spid)
                client.sendall(data[:max(9, len(data) // 2)])
            elif reply and close != "after":      # "after": applied, never answered
                self._send(client, session, reply)
            if close:
                self.count("disconnects")
                return

    def _read_requests(self, client, session: Session, requests: queue.Queue) -> None:
        try:
            while True:
                message = tds.read_message(client)
                if message.type == tds.ATTENTION:
                    self.count("attentions")
                    session.interrupt()
                requests.put(message)
        except (tds.ConnectionClosed, ConnectionError, OSError, tds.ProtocolError):
            session.interrupt()
            requests.put(_CLOSED)

    def _send(self, client, session: Session, reply: bytes) -> None:
        client.sendall(tds.packets(reply, session.packet_size, session.spid))

    def _answer(self, session: Session, message: tds.Message) -> tuple[bytes, str | None]:
        """(the reply, how the connection ends after it: see _after)."""
        statement = ""
        try:
            if message.type == tds.SQL_BATCH:
                reader = tds.Reader(message.payload)
                tds.skip_all_headers(reader)
                statement = message.payload[reader.offset:].decode("utf-16-le")
                log.debug("spid %d batch: %s", session.spid, statement[:300])
                counted = "tds_stats" not in statement.lower()
                if counted:
                    self.count("requests")
                    self.count("statements")
                fault = self.faults.take(statement) if counted else None
                tokens, _ = session.run_batch(statement, self._counted(fault))
                return _final(tokens), self._after(fault)
            if message.type == tds.RPC:
                self.count("requests")
                self.count("statements")
                faults = _CountingFaults(self)
                tokens, statement = session.rpc(message.payload, faults)
                log.debug("spid %d rpc: %s", session.spid, statement[:300])
                if statement == "sp_unprepare":
                    self.count("unprepares")
                return tokens, self._after(faults.taken)
            if message.type == tds.TRANSACTION_MANAGER:
                self.count("requests")
                fault = None
                kind = tds.Reader(message.payload)
                tds.skip_all_headers(kind)
                request = kind.unpack("H")
                statement = {5: "BEGIN TRANSACTION", 7: "COMMIT TRANSACTION",
                             8: "ROLLBACK TRANSACTION"}.get(request, "")
                if statement:
                    fault = self._counted(self.faults.take(statement))
                if fault is not None:
                    session.apply_fault(fault)
                tokens, statement = session.transaction_manager(message.payload)
                log.debug("spid %d transaction manager: %s", session.spid, statement)
                return tokens, self._after(fault)
            self.count("requests")
            raise tds.ProtocolError(f"packet type 0x{message.type:02X} is not supported")
        except Interrupted:
            return b"", None
        except Disconnect:
            return b"", "after"
        except (ServerFailure, TranslationError) as exc:
            error = exc.error if isinstance(exc, ServerFailure) else translation_error(exc)
            self.count("errors")
            if error.number in (2601, 2627):
                self.count("duplicate_keys")
            log.debug("spid %d error %d: %s", session.spid, error.number, error.message)
            tokens = getattr(exc, "before", b"") + tds.message_token(
                tds.ERROR, error.number, error.state, error.severity, error.message, SERVER_NAME)
            if error.number == 1205 or error.severity >= 20:
                tokens += session.abort_transaction()
            final = tds.DONEPROC if message.type == tds.RPC else tds.DONE
            return tokens + tds.done(tds.DONE_ERROR, token=final), (
                "close" if error.severity >= 20 else None)
        except tds.ProtocolError:
            raise
        except Exception as exc:  # never a traceback on the wire: an error the driver reads
            log.exception("statement failed inside the test server: %r", statement[:200])
            self.count("errors")
            return (tds.message_token(tds.ERROR, 50000, 1, 16, f"Test server: {exc}", SERVER_NAME)
                    + tds.done(tds.DONE_ERROR)), None

    def _counted(self, fault):
        if fault is not None:
            self.count("faults")
        return fault

    @staticmethod
    def _after(fault) -> str | None:
        """How the connection ends after this request: None (it does not), "after"
        (applied, then closed before answering), "midway" (half the answer, then closed)."""
        if fault is not None and fault.disconnect in ("after", "midway"):
            return fault.disconnect
        return None


class _CountingFaults:
    """The fault book as an RPC sees it: a fault taken is counted and remembered on the
    session, so that `disconnect: after` closes the connection after the answer."""

    def __init__(self, server: TdsServer) -> None:
        self.server = server
        self.taken = None

    def take(self, statement: str):
        self.taken = self.server._counted(self.server.faults.take(statement))
        return self.taken


def _final(tokens: bytes) -> bytes:
    """Clear the MORE bit of the last DONE token of a batch's answer."""
    if len(tokens) >= 13 and tokens[-13] in (tds.DONE, tds.DONEPROC, tds.DONEINPROC):
        status = int.from_bytes(tokens[-12:-10], "little") & ~tds.DONE_MORE
        return tokens[:-12] + status.to_bytes(2, "little") + tokens[-10:]
    return tokens


def _close(client: socket.socket) -> None:
    try:
        client.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    client.close()
