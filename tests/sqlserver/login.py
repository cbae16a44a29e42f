"""PRELOGIN and LOGIN7: what the client asks for, and what SQL Server answers."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from . import tds

SERVER_NAME = "tds"
PRODUCT_VERSION = "16.0.1000.6"          # SQL Server 2022 RTM
VERSION_BYTES = (16, 0, 0x03, 0xE8)      # 16.0.1000 as major, minor, build (big-endian)
ENCRYPT_NOT_SUPPORTED = 0x02


def prelogin_reply() -> bytes:
    """VERSION, ENCRYPTION = not supported (so the driver logs in in the clear when
    the connection string says Encrypt=no), INSTOPT, THREADID, MARS off."""
    options = [
        (0x00, bytes(VERSION_BYTES) + b"\x00\x00"),
        (0x01, bytes([ENCRYPT_NOT_SUPPORTED])),
        (0x02, b"\x00"),
        (0x03, b""),
        (0x04, b"\x00"),
    ]
    offset = len(options) * 5 + 1
    header, body = bytearray(), bytearray()
    for kind, data in options:
        header += struct.pack(">BHH", kind, offset + len(body), len(data))
        body += data
    return bytes(header) + b"\xff" + bytes(body)


@dataclass(frozen=True)
class Login:
    user: str
    password: str
    database: str
    app: str
    packet_size: int
    tds_version: int


def parse_login7(payload: bytes) -> Login:
    """The fields of a LOGIN7 packet the server uses (offsets are from its start,
    lengths in characters)."""
    if len(payload) < 94:
        raise tds.ProtocolError("LOGIN7 too short")
    tds_version, packet_size = struct.unpack("<II", payload[4:12])

    def field(position: int) -> bytes:
        offset, length = struct.unpack("<HH", payload[position:position + 4])
        return payload[offset:offset + length * 2]

    password = bytes(_unscramble(b) for b in field(44))
    return Login(user=field(40).decode("utf-16-le"),
                 password=password.decode("utf-16-le"),
                 app=field(48).decode("utf-16-le"),
                 database=field(68).decode("utf-16-le"),
                 packet_size=packet_size, tds_version=tds_version)


def _unscramble(byte: int) -> int:
    """The client XORs each password byte with 0xA5, then swaps its nibbles."""
    byte ^= 0xA5
    return ((byte << 4) & 0xF0) | (byte >> 4)


def login_reply(database: str, packet_size: int) -> bytes:
    """The tokens SQL Server sends on a successful login, in its order."""
    return b"".join([
        tds.envchange_text(tds.ENV_DATABASE, database, "master"),
        tds.message_token(tds.INFO, 5701, 2, 0,
                          f"Changed database context to '{database}'.", SERVER_NAME),
        tds.envchange(tds.ENV_COLLATION, tds.b_varbyte(tds.COLLATION), b"\x00"),
        tds.envchange_text(tds.ENV_LANGUAGE, "us_english", ""),
        tds.message_token(tds.INFO, 5703, 1, 0, "Changed language setting to us_english.",
                          SERVER_NAME),
        tds.loginack("Microsoft SQL Server", VERSION_BYTES),
        tds.envchange_text(tds.ENV_PACKETSIZE, str(packet_size), str(packet_size)),
        bytes([tds.FEATUREEXTACK, 0xFF]),
        tds.done(),
    ])
