"""The SQL functions each SQLite connection gets: SQL Server's arithmetic, conversions,
clock and session functions, where SQLite's own would answer differently.

A function that must fail as SQL Server does (8134, 245, 530) puts the error on the
session (`pending_error`) and raises; the statement's runner reports that error instead
of SQLite's "user-defined function raised exception".
"""
from __future__ import annotations

import datetime
import decimal
import re
import uuid

from .catalog import column_type
from .faults import ServerError

_INTEGER_RANGES = {"INT": (-2**31, 2**31 - 1), "INTEGER": (-2**31, 2**31 - 1),
                   "BIGINT": (-2**63, 2**63 - 1), "SMALLINT": (-2**15, 2**15 - 1),
                   "TINYINT": (0, 255), "BIT": (None, None)}
_TYPE_NAMES = {"INTEGER": "int", "DOUBLE": "float", "REAL": "real"}


class FunctionFailed(Exception):
    """Raised inside SQLite; the session's pending error says what SQL Server sends."""


def register(db, current) -> None:
    """Install the functions on a connection; `current()` is the session whose statement
    runs: it answers the session-level ones (rowcount, XACT_STATE, the CATCH block's
    ERROR_*) and takes the errors."""
    def fail(number: int, message: str, state: int = 1, severity: int = 16):
        current().pending_error = ServerError(number, state, severity, message)
        raise FunctionFailed(message)

    def add(left, right):
        if left is None or right is None:
            return None
        if isinstance(left, str) and isinstance(right, str):
            return left + right
        if isinstance(left, (bytes, str)) or isinstance(right, (bytes, str)):
            left, right = _number(left, fail), _number(right, fail)
        return left + right

    def divide(left, right, modulo: bool = False):
        if left is None or right is None:
            return None
        left, right = _number(left, fail), _number(right, fail)
        if right == 0:
            fail(8134, "Divide by zero error encountered.")
        if isinstance(left, int) and isinstance(right, int):
            quotient = abs(left) // abs(right) * (1 if (left >= 0) == (right >= 0) else -1)
            return left - quotient * right if modulo else quotient
        return float(left) % float(right) if modulo else float(left) / float(right)

    def cast(value, target, scale, attempt):
        try:
            return _convert(value, target, scale)
        except (ValueError, decimal.InvalidOperation, OverflowError) as exc:
            if attempt:
                return None
            number, message = exc.args if len(exc.args) == 2 else (245, str(exc))
            fail(number, message)

    def recursion(level, limit):
        if level + 1 > limit:
            fail(530, f"The statement terminated. The maximum recursion {limit} has been "
                 "exhausted before statement completion.")
        return level + 1

    functions = {
        ("tds_add", 2): add,
        ("tds_div", 2): divide,
        ("tds_mod", 2): lambda left, right: divide(left, right, modulo=True),
        ("tds_cast", 4): cast,
        ("tds_recursion", 2): recursion,
        ("tds_getdate", 0): lambda: _datetime_text(_round_to_datetime(datetime.datetime.now())),
        ("tds_sysdatetime", 0): lambda: datetime.datetime.now().isoformat(" "),
        ("tds_sysdatetimeoffset", 0): lambda: datetime.datetime.now().astimezone().isoformat(" "),
        ("tds_newid", 0): lambda: str(uuid.uuid4()).upper(),
        ("tds_column_type", 2): column_type,
        ("tds_object_name", 1): lambda name: None if name is None else
        str(name).split(".")[-1].strip("[]\""),
        ("tds_rowcount", 0): lambda: current().rowcount,
        ("tds_error", 0): lambda: current().last_error,
        ("xact_state", 0): lambda: current().xact_state(),
        ("error_number", 0): lambda: _caught(current(), "number"),
        ("error_message", 0): lambda: _caught(current(), "message"),
        ("error_severity", 0): lambda: _caught(current(), "severity"),
        ("error_state", 0): lambda: _caught(current(), "state"),
        ("error_line", 0): lambda: None if current().caught_error is None else 1,
        ("error_procedure", 0): lambda: None,
    }
    for (name, arguments), function in functions.items():
        db.create_function(name, arguments, function)


def _caught(session, field: str):
    error = session.caught_error
    return None if error is None else getattr(error, field)


def _number(value, fail):
    """A string used as a number, as SQL Server converts it (245 when it cannot)."""
    if isinstance(value, (int, float)):
        return value
    text = value.decode() if isinstance(value, bytes) else str(value)
    try:
        return int(text.strip())
    except ValueError:
        pass
    try:
        return float(decimal.Decimal(text.strip()))
    except decimal.InvalidOperation:
        fail(245, f"Conversion failed when converting the varchar value '{text}' to data type int.")


def _convert(value, target: str, scale):
    """CAST(value AS target) for the number types."""
    if value is None:
        return None
    target = target.upper()
    low, high = _INTEGER_RANGES.get(target, (None, None))
    if target in _INTEGER_RANGES:
        if isinstance(value, float):
            number = int(value)
        elif isinstance(value, int):
            number = value
        else:
            text = str(value).strip()
            if not re.fullmatch(r"[+-]?\d+", text):
                kind = _TYPE_NAMES.get(target, target.lower())
                raise ValueError(245, f"Conversion failed when converting the varchar value "
                                 f"'{value}' to data type {kind}.")
            number = int(text)
        if target == "BIT":
            return 1 if number else 0
        if not low <= number <= high:
            raise ValueError(8115, f"Arithmetic overflow error converting expression to data "
                             f"type {_TYPE_NAMES.get(target, target.lower())}.")
        return number
    if target in ("FLOAT", "REAL", "DOUBLE"):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(8114, "Error converting data type varchar to float.") from None
    try:                                                   # DECIMAL, NUMERIC, MONEY
        number = decimal.Decimal(str(value).strip())
    except decimal.InvalidOperation:
        raise ValueError(8114, "Error converting data type varchar to numeric.") from None
    places = int(scale or 0) if target in ("DECIMAL", "NUMERIC") else 4
    rounded = number.quantize(decimal.Decimal(1).scaleb(-places), rounding=decimal.ROUND_HALF_UP)
    return int(rounded) if places == 0 else float(rounded)


def _round_to_datetime(moment: datetime.datetime) -> datetime.datetime:
    """DATETIME keeps 1/300 s: .000, .003, .007, ..."""
    ticks = round((moment.microsecond / 1_000_000) * 300)
    base = moment.replace(microsecond=0)
    return base + datetime.timedelta(microseconds=round(ticks * 1_000_000 / 300 / 1000) * 1000)


def _datetime_text(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
