"""TDS 7.4 on the wire: packets, the tokens a server sends, and the values it reads.

Layouts follow Microsoft's [MS-TDS] and were checked against pytds (a client): a
packet is an 8-byte header (type, status, big-endian length, spid, packet id,
window) and a payload; integers inside tokens are little-endian, strings UCS-2.
"""
from __future__ import annotations

import datetime
import decimal
import socket
import struct
from dataclasses import dataclass

# Packet types
SQL_BATCH = 0x01
RPC = 0x03
REPLY = 0x04
ATTENTION = 0x06
TRANSACTION_MANAGER = 0x0E
LOGIN7 = 0x10
PRELOGIN = 0x12

STATUS_EOM = 0x01

# Token types
COLMETADATA = 0x81
ROW = 0xD1
NBCROW = 0xD2
DONE = 0xFD
DONEPROC = 0xFE
DONEINPROC = 0xFF
ERROR = 0xAA
INFO = 0xAB
LOGINACK = 0xAD
FEATUREEXTACK = 0xAE
ENVCHANGE = 0xE3
RETURNSTATUS = 0x79
RETURNVALUE = 0xAC

# DONE status bits
DONE_FINAL = 0x0000
DONE_MORE = 0x0001
DONE_ERROR = 0x0002
DONE_COUNT = 0x0010
DONE_ATTN = 0x0020
DONE_SRVERROR = 0x0100

# ENVCHANGE types
ENV_DATABASE = 1
ENV_LANGUAGE = 2
ENV_PACKETSIZE = 4
ENV_COLLATION = 7
ENV_BEGIN_TRAN = 8
ENV_COMMIT_TRAN = 9
ENV_ROLLBACK_TRAN = 10

# Data types (TYPE_INFO)
INTN = 0x26
BITN = 0x68
FLTN = 0x6D
DECIMALN = 0x6A
NUMERICN = 0x6C
NVARCHAR = 0xE7
BIGVARCHAR = 0xA7
BIGVARBINARY = 0xA5
DATEN = 0x28
TIMEN = 0x29
DATETIME2N = 0x2A
DATETIMEOFFSETN = 0x2B
DATETIMN = 0x6F
MONEYN = 0x6E
GUIDTYPE = 0x24
BIGCHAR = 0xAF
NCHAR = 0xEF
BIGBINARY = 0xAD
NTEXT = 0x63
TEXT = 0x23
IMAGE = 0x22
XML = 0xF1
FIXED_SIZES = {0x30: 1, 0x34: 2, 0x38: 4, 0x7F: 8, 0x32: 1, 0x3E: 8, 0x3B: 4,
               0x3D: 8, 0x3A: 4, 0x3C: 8, 0x7A: 4, 0x1F: 0}

# Latin1_General_CI_AS, as SQL Server sends it (LCID 0x0409, flags 0xD0, sort id 0x34)
COLLATION = bytes([0x09, 0x04, 0xD0, 0x00, 0x34])
PLP_NULL = 0xFFFFFFFFFFFFFFFF
PLP_UNKNOWN = 0xFFFFFFFFFFFFFFFE
EPOCH_DATE = datetime.date(1, 1, 1)


class ProtocolError(Exception):
    """The client sent something this server cannot read."""


class ConnectionClosed(Exception):
    """The client went away."""


@dataclass(frozen=True)
class Message:
    """One client message: its packet type and the payload of all its packets."""
    type: int
    payload: bytes


def read_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionClosed()
        chunks += chunk
    return bytes(chunks)


def read_message(sock: socket.socket) -> Message:
    """Packets up to the one whose status has the end-of-message bit."""
    payload = bytearray()
    while True:
        header = read_exact(sock, 8)
        packet_type, status, length = header[0], header[1], struct.unpack(">H", header[2:4])[0]
        if length < 8:
            raise ProtocolError(f"packet length {length}")
        payload += read_exact(sock, length - 8)
        if status & STATUS_EOM:
            return Message(packet_type, bytes(payload))


def packets(payload: bytes, packet_size: int, spid: int, packet_type: int = REPLY) -> bytes:
    """A reply cut into packets; only the last one carries end-of-message (a driver
    that sees it early stops reading, field-notes §8)."""
    body = packet_size - 8
    out = bytearray()
    chunks = [payload[i:i + body] for i in range(0, len(payload), body)] or [b""]
    for number, chunk in enumerate(chunks, start=1):
        status = STATUS_EOM if number == len(chunks) else 0
        out += struct.pack(">BBHHBB", packet_type, status, len(chunk) + 8, spid & 0xFFFF,
                           number % 256, 0)
        out += chunk
    return bytes(out)


# --- strings -----------------------------------------------------------------------

def ucs2(text: str) -> bytes:
    return text.encode("utf-16-le")


def b_varchar(text: str) -> bytes:
    data = ucs2(text)
    return bytes([len(data) // 2]) + data


def us_varchar(text: str) -> bytes:
    data = ucs2(text)
    return struct.pack("<H", len(data) // 2) + data


def b_varbyte(data: bytes) -> bytes:
    return bytes([len(data)]) + data


# --- tokens ------------------------------------------------------------------------

def envchange(kind: int, new: bytes, old: bytes) -> bytes:
    body = bytes([kind]) + new + old
    return struct.pack("<BH", ENVCHANGE, len(body)) + body


def envchange_text(kind: int, new: str, old: str) -> bytes:
    return envchange(kind, b_varchar(new), b_varchar(old))


def message_token(token: int, number: int, state: int, severity: int, text: str,
                  server: str, procedure: str = "", line: int = 1) -> bytes:
    """An ERROR or INFO token: number, state, class, message, server, procedure, line."""
    body = (struct.pack("<iBB", number, state, severity) + us_varchar(text)
            + b_varchar(server) + b_varchar(procedure) + struct.pack("<i", line))
    return struct.pack("<BH", token, len(body)) + body


def done(status: int = DONE_FINAL, rows: int = 0, token: int = DONE, command: int = 0xC1) -> bytes:
    return struct.pack("<BHHQ", token, status, command, rows)


def loginack(program: str, version: tuple[int, int, int, int]) -> bytes:
    body = (bytes([1]) + bytes([0x74, 0x00, 0x00, 0x04]) + b_varchar(program)
            + bytes(version))
    return struct.pack("<BH", LOGINACK, len(body)) + body


def returnstatus(value: int) -> bytes:
    return struct.pack("<Bi", RETURNSTATUS, value)


def returnvalue_int(ordinal: int, name: str, value: int | None) -> bytes:
    """An output INT parameter (sp_prepexec's handle)."""
    data = b"\x00" if value is None else b"\x04" + struct.pack("<i", value)
    return (struct.pack("<BH", RETURNVALUE, ordinal) + b_varchar(name) + b"\x01"
            + struct.pack("<IH", 0, 0x0009) + bytes([INTN, 4]) + data)


# --- result columns ----------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """A result column's SQL Server type."""
    name: str
    type: str        # int, bigint, smallint, tinyint, bit, float, decimal, nvarchar,
                     # varchar, varbinary, date, datetime2, datetime, datetimeoffset,
                     # uniqueidentifier
    size: int = 0    # nvarchar/varchar/varbinary: max length in bytes; 0xFFFF: max
    scale: int = 0   # decimal

    def metadata(self) -> bytes:
        flags = 0x0009   # nullable, updateable unknown
        head = struct.pack("<IH", 0, flags)
        kind = self.type
        if kind in ("int", "bigint", "smallint", "tinyint"):
            info = bytes([INTN, {"int": 4, "bigint": 8, "smallint": 2, "tinyint": 1}[kind]])
        elif kind == "bit":
            info = bytes([BITN, 1])
        elif kind == "float":
            info = bytes([FLTN, 8])
        elif kind == "decimal":
            info = bytes([DECIMALN, 17, 38, self.scale])
        elif kind in ("nvarchar", "varchar"):
            info = (bytes([NVARCHAR if kind == "nvarchar" else BIGVARCHAR])
                    + struct.pack("<H", self.size) + COLLATION)
        elif kind == "varbinary":
            info = bytes([BIGVARBINARY]) + struct.pack("<H", self.size)
        elif kind == "date":
            info = bytes([DATEN])
        elif kind == "datetime2":
            info = bytes([DATETIME2N, 7])
        elif kind == "datetime":
            info = bytes([DATETIMN, 8])
        elif kind == "datetimeoffset":
            info = bytes([DATETIMEOFFSETN, 7])
        elif kind == "uniqueidentifier":
            info = bytes([GUIDTYPE, 16])
        else:
            raise ValueError(kind)
        return head + info + b_varchar(self.name)

    def encode(self, value) -> bytes:
        kind = self.type
        if kind in ("int", "bigint", "smallint", "tinyint"):
            size = {"int": 4, "bigint": 8, "smallint": 2, "tinyint": 1}[kind]
            return bytes([size]) + int(value).to_bytes(size, "little", signed=kind != "tinyint")
        if kind == "bit":
            return b"\x01" + (b"\x01" if value else b"\x00")
        if kind == "float":
            return b"\x08" + struct.pack("<d", float(value))
        if kind == "decimal":
            number = decimal.Decimal(value).scaleb(self.scale).to_integral_value()
            sign = 1 if number >= 0 else 0
            return b"\x11" + bytes([sign]) + int(abs(number)).to_bytes(16, "little")
        if kind in ("nvarchar", "varchar", "varbinary"):
            if kind == "varbinary":
                data = bytes(value)
            else:
                data = str(value).encode("utf-16-le" if kind == "nvarchar" else "latin-1",
                                         errors="replace")
            if self.size == 0xFFFF:
                chunk = struct.pack("<I", len(data)) + data if data else b""
                return struct.pack("<Q", len(data)) + chunk + b"\x00\x00\x00\x00"
            return struct.pack("<H", len(data)) + data
        if kind == "date":
            return b"\x03" + _days(value).to_bytes(3, "little")
        if kind == "datetime2":
            return b"\x08" + _clock_and_day(value)
        if kind == "datetime":                     # days since 1900, 1/300 s since midnight
            days = (value.date() - datetime.date(1900, 1, 1)).days
            seconds = value.hour * 3600 + value.minute * 60 + value.second
            ticks = seconds * 300 + round(value.microsecond * 300 / 1_000_000)
            return b"\x08" + struct.pack("<iI", days, ticks)
        if kind == "datetimeoffset":               # the UTC moment, then the offset
            offset = value.utcoffset() or datetime.timedelta(0)
            utc = value.replace(tzinfo=None) - offset
            return b"\x0a" + _clock_and_day(utc) + struct.pack("<h", int(offset.total_seconds() // 60))
        if kind == "uniqueidentifier":
            import uuid
            return b"\x10" + uuid.UUID(str(value)).bytes_le
        raise ValueError(kind)

    def null(self) -> bytes:
        if self.type in ("nvarchar", "varchar", "varbinary"):
            return struct.pack("<Q", PLP_NULL) if self.size == 0xFFFF else b"\xff\xff"
        return b"\x00"


def _clock_and_day(moment: datetime.datetime) -> bytes:
    ticks = ((moment.hour * 3600 + moment.minute * 60 + moment.second) * 10_000_000
             + moment.microsecond * 10)
    return ticks.to_bytes(5, "little") + _days(moment.date()).to_bytes(3, "little")


def _days(day: datetime.date) -> int:
    return (day - EPOCH_DATE).days


def colmetadata(columns: list[Column]) -> bytes:
    return (struct.pack("<BH", COLMETADATA, len(columns))
            + b"".join(column.metadata() for column in columns))


def row(columns: list[Column], values) -> bytes:
    """ROW, or NBCROW (a null bitmap instead of a null per column) when any is NULL."""
    if any(value is None for value in values):
        bitmap = bytearray((len(columns) + 7) // 8)
        body = bytearray()
        for index, (column, value) in enumerate(zip(columns, values)):
            if value is None:
                bitmap[index // 8] |= 1 << (index % 8)
            else:
                body += column.encode(value)
        return bytes([NBCROW]) + bytes(bitmap) + bytes(body)
    return bytes([ROW]) + b"".join(column.encode(value) for column, value in zip(columns, values))


# --- reading client payloads ---------------------------------------------------------

class Reader:
    """A cursor over a payload, reading little-endian values."""

    def __init__(self, data: bytes, offset: int = 0) -> None:
        self.data, self.offset = data, offset

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise ProtocolError("payload ends early")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, fmt: str):
        values = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))
        return values[0] if len(values) == 1 else values

    def byte(self) -> int:
        return self.take(1)[0]

    def b_varchar(self) -> str:
        return self.take(self.byte() * 2).decode("utf-16-le")

    def us_varchar(self) -> str:
        return self.take(self.unpack("H") * 2).decode("utf-16-le")

    @property
    def done(self) -> bool:
        return self.offset >= len(self.data)


def skip_all_headers(reader: Reader) -> int | None:
    """Skip ALL_HEADERS; returns the transaction descriptor it carried, if any."""
    total = reader.unpack("I")
    end = reader.offset - 4 + total
    descriptor = None
    while reader.offset < end:
        length, kind = reader.unpack("IH")
        body = reader.take(length - 6)
        if kind == 2 and len(body) >= 8:
            descriptor = struct.unpack("<Q", body[:8])[0]
    reader.offset = end
    return descriptor


@dataclass
class Parameter:
    name: str
    value: object
    output: bool
    type: int


def read_parameter(reader: Reader) -> Parameter:
    """One RPC parameter: name, status flags, TYPE_INFO and value."""
    name = reader.b_varchar()
    flags = reader.byte()
    kind = reader.byte()
    value = _read_typed_value(reader, kind)
    return Parameter(name, value, bool(flags & 0x01), kind)


def _read_typed_value(reader: Reader, kind: int):
    if kind in FIXED_SIZES:
        return _decode_fixed(kind, reader.take(FIXED_SIZES[kind]))
    if kind in (INTN, BITN, FLTN, MONEYN, DATETIMN, GUIDTYPE):
        reader.byte()                          # max length
        size = reader.byte()
        if size == 0:
            return None
        data = reader.take(size)
        if kind == INTN:
            return int.from_bytes(data, "little", signed=size != 1)
        if kind == BITN:
            return bool(data[0])
        if kind == FLTN:
            return struct.unpack("<d" if size == 8 else "<f", data)[0]
        if kind == MONEYN:
            if size == 4:
                return decimal.Decimal(struct.unpack("<i", data)[0]) / 10000
            high, low = struct.unpack("<iI", data)
            return decimal.Decimal((high << 32) | low) / 10000
        if kind == DATETIMN:
            return _decode_datetime(data)
        return _decode_guid(data)
    if kind in (DECIMALN, NUMERICN):
        reader.byte()
        reader.byte()                          # precision
        scale = reader.byte()
        size = reader.byte()
        if size == 0:
            return None
        data = reader.take(size)
        number = int.from_bytes(data[1:], "little")
        return decimal.Decimal(number if data[0] else -number).scaleb(-scale)
    if kind in (NVARCHAR, BIGVARCHAR, BIGVARBINARY, NCHAR, BIGCHAR, BIGBINARY):
        max_size = reader.unpack("H")
        if kind in (NVARCHAR, BIGVARCHAR, NCHAR, BIGCHAR):
            reader.take(5)                     # collation
        if max_size == 0xFFFF:
            data = _read_plp(reader)
        else:
            size = reader.unpack("H")
            data = None if size == 0xFFFF else reader.take(size)
        return _decode_chars(kind, data)
    if kind in (NTEXT, TEXT, IMAGE):
        reader.unpack("I")
        if kind != IMAGE:
            reader.take(5)
        size = reader.unpack("i")
        data = None if size == -1 else reader.take(size)
        return _decode_chars({NTEXT: NVARCHAR, TEXT: BIGVARCHAR, IMAGE: BIGVARBINARY}[kind], data)
    if kind == XML:
        if reader.byte():
            reader.b_varchar(); reader.b_varchar(); reader.us_varchar()
        return _decode_chars(NVARCHAR, _read_plp(reader))
    if kind == DATEN:
        size = reader.byte()
        return None if size == 0 else EPOCH_DATE + datetime.timedelta(
            days=int.from_bytes(reader.take(3), "little"))
    if kind in (TIMEN, DATETIME2N, DATETIMEOFFSETN):
        scale = reader.byte()
        size = reader.byte()
        if size == 0:
            return None
        data = reader.take(size)
        time_size = {TIMEN: size, DATETIME2N: size - 3, DATETIMEOFFSETN: size - 5}[kind]
        ticks = int.from_bytes(data[:time_size], "little") * 10 ** (7 - scale)
        clock = datetime.timedelta(microseconds=ticks // 10)
        if kind == TIMEN:
            return (datetime.datetime.min + clock).time()
        day = EPOCH_DATE + datetime.timedelta(days=int.from_bytes(
            data[time_size:time_size + 3], "little"))
        moment = datetime.datetime.combine(day, datetime.time()) + clock
        if kind == DATETIMEOFFSETN:
            offset = struct.unpack("<h", data[-2:])[0]
            moment = (moment + datetime.timedelta(minutes=offset)).replace(
                tzinfo=datetime.timezone(datetime.timedelta(minutes=offset)))
        return moment
    raise ProtocolError(f"parameter type 0x{kind:02X} is not supported by this test server")


def _read_plp(reader: Reader) -> bytes | None:
    total = reader.unpack("Q")
    if total == PLP_NULL:
        return None
    data = bytearray()
    while True:
        size = reader.unpack("I")
        if size == 0:
            return bytes(data)
        data += reader.take(size)


def _decode_chars(kind: int, data: bytes | None):
    if data is None:
        return None
    if kind in (NVARCHAR, NCHAR):
        return data.decode("utf-16-le")
    if kind in (BIGVARCHAR, BIGCHAR):
        return data.decode("latin-1")
    return bytes(data)


def _decode_fixed(kind: int, data: bytes):
    if kind == 0x30:
        return data[0]
    if kind == 0x34:
        return struct.unpack("<h", data)[0]
    if kind == 0x38:
        return struct.unpack("<i", data)[0]
    if kind == 0x7F:
        return struct.unpack("<q", data)[0]
    if kind == 0x32:
        return bool(data[0])
    if kind == 0x3E:
        return struct.unpack("<d", data)[0]
    if kind == 0x3B:
        return struct.unpack("<f", data)[0]
    if kind == 0x3D:
        return _decode_datetime(data)
    return None


def _decode_datetime(data: bytes) -> datetime.datetime:
    if len(data) == 4:
        days, minutes = struct.unpack("<HH", data)
        return datetime.datetime(1900, 1, 1) + datetime.timedelta(days=days, minutes=minutes)
    days, ticks = struct.unpack("<iI", data)
    return datetime.datetime(1900, 1, 1) + datetime.timedelta(days=days,
                                                               milliseconds=ticks * 10 / 3)


def _decode_guid(data: bytes) -> str:
    import uuid
    return str(uuid.UUID(bytes_le=data)).upper()     # as NEWID() and SQL Server print it
