"""A small TCP proxy for fault tests: the database "disappears" (every connection
cut, new ones refused) and comes back, on loopback only."""
from __future__ import annotations

import socket
import threading


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._down = threading.Event()
        self._closed = False
        self.accepted = 0
        self.refused = 0
        self.answers_lost = 0
        self._lose_answer_to: bytes | None = None
        threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True).start()

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until restore()."""
        self._down.set()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            _close(sock)

    def restore(self) -> None:
        self._down.clear()

    def lose_answer_to(self, marker: bytes) -> None:
        """Arm a one-shot fault: the next client packet containing `marker` reaches
        the server, the server answers, and that answer is dropped and the
        connection cut (e.g. a COMMIT applied whose outcome the client never learns)."""
        self._lose_answer_to = marker

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self._listener)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down.is_set():
                self.refused += 1
                _close(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            self.accepted += 1
            with self._lock:
                self._sockets.update((client, server))
            link = {"mute": False}    # True: the server's next answer is dropped
            for source, target, upstream in ((client, server, True),
                                             (server, client, False)):
                threading.Thread(target=self._pump, args=(source, target, upstream, link),
                                 daemon=True, name="proxy-pump").start()

    def _pump(self, source: socket.socket, target: socket.socket, upstream: bool,
              link: dict) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                marker = self._lose_answer_to
                if upstream and marker is not None and marker in data:
                    self._lose_answer_to = None
                    link["mute"] = True
                elif not upstream and link["mute"]:
                    self.answers_lost += 1
                    break                   # the answer is dropped; both sides closed
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with self._lock:
                    self._sockets.discard(sock)
                _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
