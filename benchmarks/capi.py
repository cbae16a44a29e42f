"""A minimal MariaDB C client (libmariadb through ctypes), for the one thing the
ODBC driver cannot be asked to do on demand: send COM_PING."""
from __future__ import annotations

import ctypes
import ctypes.util

from sqlalchemy.engine import make_url

from .backends import MARIADB_URL


class CClient:
    """One connection: ping(), and query() for text-protocol statements."""

    def __init__(self, lib: ctypes.CDLL, handle: int) -> None:
        self._lib, self._handle = lib, handle

    @classmethod
    def connect(cls) -> "CClient | None":
        """None when libmariadb is not installed or the connection fails."""
        lib = _load()
        if lib is None:
            return None
        handle = lib.mysql_init(None)
        url = make_url(MARIADB_URL)
        if not lib.mysql_real_connect(handle, (url.host or "127.0.0.1").encode(),
                                      (url.username or "").encode(),
                                      (url.password or "").encode(),
                                      (url.database or "").encode(),
                                      int(url.query.get("Port", 3306)), None, 0):
            lib.mysql_close(handle)
            return None
        return cls(lib, handle)

    def ping(self) -> None:
        if self._lib.mysql_ping(self._handle):
            raise RuntimeError("mysql_ping failed")

    def query(self, sql: str) -> list[tuple[str | None, ...]]:
        if self._lib.mysql_query(self._handle, sql.encode()):
            raise RuntimeError(f"mysql_query failed: {sql}")
        result = self._lib.mysql_store_result(self._handle)
        if not result:
            return []
        try:
            width = self._lib.mysql_num_fields(result)
            rows = []
            while row := self._lib.mysql_fetch_row(result):
                rows.append(tuple(None if row[i] is None else row[i].decode()
                                  for i in range(width)))
            return rows
        finally:
            self._lib.mysql_free_result(result)

    def close(self) -> None:
        self._lib.mysql_close(self._handle)


def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("mariadb") or "libmariadb.so.3")
    except OSError:
        return None
    pointer, text = ctypes.c_void_p, ctypes.c_char_p
    lib.mysql_init.restype = pointer
    lib.mysql_init.argtypes = [pointer]
    lib.mysql_real_connect.restype = pointer
    lib.mysql_real_connect.argtypes = [pointer, text, text, text, text, ctypes.c_uint,
                                       text, ctypes.c_ulong]
    lib.mysql_ping.argtypes = [pointer]
    lib.mysql_query.argtypes = [pointer, text]
    lib.mysql_store_result.restype = pointer
    lib.mysql_store_result.argtypes = [pointer]
    lib.mysql_num_fields.restype = ctypes.c_uint
    lib.mysql_num_fields.argtypes = [pointer]
    lib.mysql_fetch_row.restype = ctypes.POINTER(ctypes.c_char_p)
    lib.mysql_fetch_row.argtypes = [pointer]
    lib.mysql_free_result.argtypes = [pointer]
    lib.mysql_close.argtypes = [pointer]
    return lib
