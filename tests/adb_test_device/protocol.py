"""ADB wire format: 24-byte message headers, checksums, sync and shell-v2 framing constants.

Written from AOSP's adb/protocol.txt, SYNC.TXT, file_sync_protocol.h and shell_protocol.h.
All integers on the wire are little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# -- transport messages ---------------------------------------------------------------------------

HEADER = struct.Struct("<6I")  # command, arg0, arg1, data_length, data_check, magic
HEADER_SIZE = HEADER.size  # 24


def cmd_id(name: bytes) -> int:
    """b'CNXN' -> the little-endian u32 that goes on the wire."""
    return struct.unpack("<I", name)[0]


A_SYNC = cmd_id(b"SYNC")
A_CNXN = cmd_id(b"CNXN")
A_AUTH = cmd_id(b"AUTH")
A_OPEN = cmd_id(b"OPEN")
A_OKAY = cmd_id(b"OKAY")
A_CLSE = cmd_id(b"CLSE")
A_WRTE = cmd_id(b"WRTE")
A_STLS = cmd_id(b"STLS")
KNOWN_COMMANDS = {A_SYNC, A_CNXN, A_AUTH, A_OPEN, A_OKAY, A_CLSE, A_WRTE, A_STLS}

A_VERSION_MIN = 0x01000000  # checksummed payloads (adb-shell speaks this)
A_VERSION_SKIP_CHECKSUM = 0x01000001  # payload checksum is 0 and is not checked
A_VERSION = 0x01000001  # what this device speaks at most
MAX_PAYLOAD_V1 = 4 * 1024
MAX_PAYLOAD = 1024 * 1024  # what modern adbd and hosts advertise

# AUTH arg0
AUTH_TOKEN = 1
AUTH_SIGNATURE = 2
AUTH_RSAPUBLICKEY = 3
TOKEN_SIZE = 20


def name_of(command: int) -> str:
    raw = struct.pack("<I", command & 0xFFFFFFFF)
    return raw.decode("latin-1") if raw.isalpha() else f"0x{command:08x}"


def checksum(data: bytes) -> int:
    """The pre-0x01000001 'crc32' field: really the byte sum, modulo 2**32."""
    return sum(data) & 0xFFFFFFFF


@dataclass
class Message:
    command: int
    arg0: int
    arg1: int
    data: bytes = b""

    def __repr__(self) -> str:  # short enough for logs
        return f"<{name_of(self.command)} {self.arg0:#x} {self.arg1:#x} {len(self.data)}B>"


def pack(command: int, arg0: int, arg1: int, data: bytes = b"", *, with_checksum: bool = True) -> bytes:
    check = checksum(data) if with_checksum else 0
    return HEADER.pack(command, arg0 & 0xFFFFFFFF, arg1 & 0xFFFFFFFF, len(data), check,
                       command ^ 0xFFFFFFFF) + data


# -- sync: (file_sync_protocol.h) -----------------------------------------------------------------

ID_STAT = cmd_id(b"STAT")  # lstat, v1
ID_STA2 = cmd_id(b"STA2")  # stat, v2
ID_LST2 = cmd_id(b"LST2")  # lstat, v2
ID_LIST = cmd_id(b"LIST")
ID_LIS2 = cmd_id(b"LIS2")
ID_SEND = cmd_id(b"SEND")
ID_RECV = cmd_id(b"RECV")
ID_DENT = cmd_id(b"DENT")
ID_DNT2 = cmd_id(b"DNT2")
ID_DONE = cmd_id(b"DONE")
ID_DATA = cmd_id(b"DATA")
ID_OKAY = cmd_id(b"OKAY")
ID_FAIL = cmd_id(b"FAIL")
ID_QUIT = cmd_id(b"QUIT")

SYNC_REQUEST = struct.Struct("<II")  # id, length (path length / data size / mtime)
SYNC_STAT_V1 = struct.Struct("<IIII")  # id, mode, size, mtime
SYNC_STAT_V2 = struct.Struct("<IIQQIIIIQqqq")  # id, error, dev, ino, mode, nlink, uid, gid, size, a/m/ctime
SYNC_DENT_V1 = struct.Struct("<IIIII")  # id, mode, size, mtime, namelen
SYNC_DENT_V2 = struct.Struct("<IIQQIIIIQqqqI")  # stat_v2 fields + namelen
SYNC_DATA_MAX = 64 * 1024
SYNC_PATH_MAX = 1024

# -- shell protocol v2 (shell_protocol.h) ---------------------------------------------------------

SHELL_HEADER = struct.Struct("<BI")  # id, length
SHELL_STDIN = 0
SHELL_STDOUT = 1
SHELL_STDERR = 2
SHELL_EXIT = 3
SHELL_CLOSE_STDIN = 4
SHELL_WINDOW_SIZE = 5
