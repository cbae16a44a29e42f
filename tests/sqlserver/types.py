"""SQL Server types of result columns, from SQLite.

Tables keep their T-SQL column types in SQLite (translate.py writes them through), and
the sqlite3 module hands each value of a declared column to a converter chosen by the
type's first word: the converters below tag the value with its SQL Server type.
Expression columns (no declared type) get a type from their values.
"""
from __future__ import annotations

import datetime
import decimal
import re
import sqlite3
from dataclasses import dataclass

from .tds import Column

INT32 = range(-2**31, 2**31)


@dataclass(frozen=True)
class Typed:
    """A value read from a column declared with a SQL Server type."""
    type: str
    value: object


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _number(raw: bytes):
    text = _text(raw)
    try:
        return int(text)
    except ValueError:
        return decimal.Decimal(text)


def _moment(raw: bytes) -> datetime.datetime | str:
    text = _text(raw).replace("T", " ")
    try:
        return datetime.datetime.fromisoformat(text[:26])
    except ValueError:
        return text


def _datetime(raw: bytes) -> datetime.datetime | str:
    """DATETIME keeps 1/300 s: a value is read back rounded as SQL Server stores it."""
    moment = _moment(raw)
    if isinstance(moment, datetime.datetime):
        ticks = round(moment.microsecond * 300 / 1_000_000)
        moment = moment.replace(microsecond=0) + datetime.timedelta(
            microseconds=round(ticks * 1000 / 300) * 1000)
    return moment


def _offset_moment(raw: bytes) -> datetime.datetime | str:
    text = _text(raw).replace("T", " ")
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return text
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def _day(raw: bytes) -> datetime.date | str:
    try:
        return datetime.date.fromisoformat(_text(raw)[:10])
    except ValueError:
        return _text(raw)


_CONVERTERS = {
    "INT": ("int", lambda raw: int(_number(raw))),
    "INTEGER": ("int", lambda raw: int(_number(raw))),
    "BIGINT": ("bigint", lambda raw: int(_number(raw))),
    "SMALLINT": ("smallint", lambda raw: int(_number(raw))),
    "TINYINT": ("tinyint", lambda raw: int(_number(raw))),
    "BIT": ("bit", lambda raw: bool(int(_number(raw)))),
    "FLOAT": ("float", lambda raw: float(_text(raw))),
    "REAL": ("float", lambda raw: float(_text(raw))),
    "DECIMAL": ("decimal", lambda raw: decimal.Decimal(_text(raw))),
    "NUMERIC": ("decimal", lambda raw: decimal.Decimal(_text(raw))),
    "NVARCHAR": ("nvarchar", _text),
    "NCHAR": ("nvarchar", _text),
    "NTEXT": ("nvarchar", _text),
    "VARCHAR": ("varchar", _text),
    "CHAR": ("varchar", _text),
    "TEXT": ("nvarchar", _text),
    "VARBINARY": ("varbinary", bytes),
    "BINARY": ("varbinary", bytes),
    "DATE": ("date", _day),
    "DATETIME2": ("datetime2", _moment),
    "DATETIME": ("datetime", _datetime),
    "DATETIMEOFFSET": ("datetimeoffset", _offset_moment),
    "UNIQUEIDENTIFIER": ("uniqueidentifier", lambda raw: _text(raw).upper()),
}
_COLUMN_NAME = re.compile(r"^[A-Za-z_@#][\w@#$ .-]{0,127}$")
# Expression columns (no declared type) whose every value is such a text are moments
# (GETDATE(), SYSDATETIME(), DATEADD(...)): SQLite has no other way to return one.
_MOMENT_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d{1,7})?$")


def register_sqlite_types() -> None:
    """Install the converters and adapters in the sqlite3 module (process-wide, so
    the server calls it once at start, never at import)."""
    for name, (kind, convert) in _CONVERTERS.items():
        sqlite3.register_converter(name, lambda raw, kind=kind, convert=convert: Typed(kind, convert(raw)))
    sqlite3.register_adapter(decimal.Decimal, _decimal_parameter)
    sqlite3.register_adapter(datetime.datetime, lambda moment: moment.isoformat(" "))
    sqlite3.register_adapter(datetime.date, lambda day: day.isoformat())
    sqlite3.register_adapter(datetime.time, lambda clock: clock.isoformat())


def _decimal_parameter(value: decimal.Decimal):
    """A decimal parameter as a number SQLite computes with exactly ('1.5' + '2.5' would be
    text): an integer, or a float when 15 significant digits hold it."""
    if value == value.to_integral_value():
        return int(value)
    if len(value.normalize().as_tuple().digits) <= 15:
        return float(value)
    return str(value)


def result_columns(names: list[str], rows: list[tuple]) -> tuple[list[Column], list[tuple]]:
    """The columns' SQL Server types and the rows' plain values."""
    columns = []
    plain = [list(row) for row in rows]
    # SQL Server names an expression without an alias "" (SQLite: its text)
    names = [name if _COLUMN_NAME.match(name) else "" for name in names]
    for index, name in enumerate(names):
        values = [row[index] for row in rows]
        declared = next((v.type for v in values if isinstance(v, Typed)), None)
        for row in plain:
            if isinstance(row[index], Typed):
                row[index] = row[index].value
        column_values = [row[index] for row in plain if row[index] is not None]
        if declared is None and column_values and all(
                isinstance(v, str) and _MOMENT_TEXT.match(v) for v in column_values):
            for row in plain:
                if row[index] is not None:
                    row[index] = datetime.datetime.fromisoformat(row[index][:26].replace("T", " "))
            declared = "datetime2"
        columns.append(_column(name, declared, column_values))
    # A declared type whose value SQLite stored as something else (text in an INT
    # column): fall back to what the values are.
    for index, column in enumerate(columns):
        if not all(_fits(column.type, row[index]) for row in plain if row[index] is not None):
            columns[index] = _column(column.name, None, [row[index] for row in plain
                                                        if row[index] is not None])
    return columns, [tuple(row) for row in plain]


def _fits(kind: str, value) -> bool:
    if kind in ("int", "smallint", "tinyint", "bigint"):
        return isinstance(value, int) and (kind != "int" or value in INT32)
    if kind == "bit":
        return isinstance(value, (bool, int))
    if kind == "float":
        return isinstance(value, (int, float))
    if kind == "decimal":
        return isinstance(value, (int, float, decimal.Decimal))
    if kind in ("nvarchar", "varchar"):
        return isinstance(value, str)
    if kind == "varbinary":
        return isinstance(value, (bytes, bytearray, memoryview))
    if kind == "date":
        return isinstance(value, datetime.date)
    if kind in ("datetime2", "datetime"):
        return isinstance(value, datetime.datetime)
    if kind == "datetimeoffset":
        return isinstance(value, datetime.datetime) and value.tzinfo is not None
    if kind == "uniqueidentifier":
        return isinstance(value, str) and len(value) == 36
    return False


def _column(name: str, declared: str | None, values: list) -> Column:
    kind = declared or _infer(values)
    if kind in ("nvarchar", "varchar"):
        longest = max((len(str(v)) for v in values), default=1)
        limit = 4000 if kind == "nvarchar" else 8000
        size = 0xFFFF if longest > limit else (limit * 2 if kind == "nvarchar" else limit)
        return Column(name, kind, size)
    if kind == "varbinary":
        longest = max((len(bytes(v)) for v in values), default=1)
        return Column(name, kind, 0xFFFF if longest > 8000 else 8000)
    if kind == "decimal":
        scale = max((max(0, -decimal.Decimal(str(v)).as_tuple().exponent) for v in values),
                    default=0)
        return Column(name, kind, scale=min(scale, 18))
    if kind == "int" and any(v not in INT32 for v in values):
        kind = "bigint"
    return Column(name, kind)


def _infer(values: list) -> str:
    if not values:
        return "int"
    if all(isinstance(v, bool) for v in values):
        return "bit"
    if all(isinstance(v, int) for v in values):
        return "int" if all(v in INT32 for v in values) else "bigint"
    if all(isinstance(v, (int, float)) for v in values):
        return "float"
    if all(isinstance(v, (int, decimal.Decimal)) for v in values):
        return "decimal"
    if all(isinstance(v, (bytes, bytearray, memoryview)) for v in values):
        return "varbinary"
    if all(isinstance(v, datetime.datetime) for v in values):
        return "datetime2"
    if all(isinstance(v, datetime.date) for v in values):
        return "date"
    return "nvarchar"
