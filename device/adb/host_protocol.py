"""The adb server's host protocol: what `adb`, Android Studio, adbutils and ppadb speak on TCP 5037.

Our own small client (about 250 lines) rather than adbutils: we use four services (`host:version`,
`host:devices-l`, `host:transport:SERIAL` + `shell,v2,raw:` / `shell:` / `sync:` SEND), we need one
deadline per call and an end of stream told apart from a normal end (a drop must become
`AdbConnectionLost`, never a short answer), and adbutils would bring requests, Pillow, retry2,
deprecation and a bundled 3.5 MB adb binary for that.

Wire facts (AOSP packages/modules/adb: SERVICES.TXT, SYNC.TXT, shell_protocol.h):

- a request is 4 hex digits of length + the service name; the answer is `OKAY`, or `FAIL` + 4 hex
  digits of length + a message. `host:*` queries then send one hex-length block. One TCP
  connection per service: after `host:transport:SERIAL` + OKAY, the next request on the same socket
  goes to the phone's adbd, and the socket becomes that service's stream.
- `shell,v2,raw:CMD` frames the stream as packets (1 byte id, 4 bytes little-endian length):
  1 stdout, 2 stderr, 3 exit (1 byte code), 4 close-stdin from our side. A stream that ends without
  an exit packet was cut (phone or server gone). `shell:CMD` (phones without `shell_v2`) is raw
  output up to EOF, so the caller has to mark the end itself.
- `sync:` then `SEND` + len + "path,mode", `DATA` + len + at most 64 KiB, `DONE` + mtime; the phone
  answers `OKAY` or `FAIL` + len + message; `QUIT` ends it.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from dataclasses import dataclass, field

from device.errors import AmcError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5037
ENV_PORT = "ANDROID_ADB_SERVER_PORT"
ENV_SOCKET = "ADB_SERVER_SOCKET"
SYNC_CHUNK = 64 * 1024

_ID_STDOUT, _ID_STDERR, _ID_EXIT, _ID_CLOSE_STDIN = 1, 2, 3, 4


class ServerUnreachable(Exception):
    """No TCP connection to the adb server at all (refused, timed out, unknown host)."""


class ServerFailed(Exception):
    """The server (or the phone's adbd behind it) answered FAIL: the message says why."""


class StreamCut(Exception):
    """The stream ended early, was reset, or went silent past its deadline."""


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int
    source: str = "default"  # default | ANDROID_ADB_SERVER_PORT | ADB_SERVER_SOCKET | URI | AMC_ADB_SERVERS

    def __str__(self) -> str:
        return f"{'[' + self.host + ']' if ':' in self.host else self.host}:{self.port}"

    @property
    def is_default(self) -> bool:
        return self.source == "default"


def parse_host_port(text: str, what: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, `HOST` or `:PORT` -> (host, port); AmcError naming `what` otherwise."""
    m = re.fullmatch(r"\[(?P<h6>[0-9A-Fa-f:.]+)\](?::(?P<p6>\d+))?|(?P<h>[^:\[\]/]*)(?::(?P<p>\d+))?", text.strip())
    if not m:
        raise AmcError(f"bad adb server address {text!r} in {what}: expected HOST:PORT (e.g. 127.0.0.1:5037)")
    host = m.group("h6") or m.group("h") or DEFAULT_HOST
    port = int(m.group("p6") or m.group("p") or default_port)
    if not 0 < port < 65536:
        raise AmcError(f"bad port {port} in {what}: expected 1-65535")
    return host, port


def configured_server() -> ServerAddress:
    """The local adb server as Google's adb finds it: $ADB_SERVER_SOCKET (tcp:HOST:PORT), else
    $ANDROID_ADB_SERVER_PORT on loopback, else 127.0.0.1:5037."""
    sock = os.environ.get(ENV_SOCKET, "").strip()
    if sock:
        if not sock.startswith("tcp:"):
            raise AmcError(f"{ENV_SOCKET}={sock} is not supported: only tcp:HOST:PORT is (unset it, or use "
                           f"{ENV_SOCKET}=tcp:127.0.0.1:5037)")
        host, port = parse_host_port(sock[4:], f"{ENV_SOCKET}={sock}")
        return ServerAddress(host, port, ENV_SOCKET)
    port = os.environ.get(ENV_PORT, "").strip()
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise AmcError(f"{ENV_PORT}={port} is not a port number (1-65535): fix or unset it")
        return ServerAddress(DEFAULT_HOST, int(port), ENV_PORT)
    return ServerAddress(DEFAULT_HOST, DEFAULT_PORT)


# -- one socket --------------------------------------------------------------------------------------


class _Stream:
    """A socket with one deadline for everything done on it."""

    def __init__(self, address: ServerAddress, timeout_s: float | None, connect_timeout_s: float):
        self.deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        try:
            self.sock = socket.create_connection((address.host, address.port),
                                                 timeout=min(connect_timeout_s, self._left() or connect_timeout_s))
        except OSError as exc:
            raise ServerUnreachable(_why(exc)) from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _left(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StreamCut("timed out")
        return left

    def send(self, data: bytes) -> None:
        try:
            self.sock.settimeout(self._left())
            self.sock.sendall(data)
        except (OSError, socket.timeout) as exc:
            raise StreamCut(_why(exc)) from None

    def recv_some(self, n: int = 65536) -> bytes:
        """Up to `n` bytes; b"" at a normal end of stream."""
        try:
            self.sock.settimeout(self._left())
            return self.sock.recv(n)
        except socket.timeout:
            raise StreamCut("timed out") from None
        except OSError as exc:
            raise StreamCut(_why(exc)) from None

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.recv_some(n - len(buf))
            if not chunk:
                raise StreamCut("the connection was closed")
            buf += chunk
        return bytes(buf)

    def request(self, service: str) -> None:
        """Send one smart-socket request; return on OKAY, raise ServerFailed on FAIL."""
        data = service.encode()
        self.send(b"%04x" % len(data) + data)
        status = self.recv_exact(4)
        if status == b"OKAY":
            return
        if status == b"FAIL":
            raise ServerFailed(self.read_block().decode("utf-8", "replace").strip())
        raise StreamCut(f"not an adb server (answered {status!r})")

    def read_block(self) -> bytes:
        head = self.recv_exact(4)
        try:
            n = int(head, 16)
        except ValueError:
            raise StreamCut(f"bad length {head!r} from the adb server") from None
        return self.recv_exact(n)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _why(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    return (getattr(exc, "strerror", None) or " ".join(str(exc).split()) or type(exc).__name__)[:200]


# -- host queries --------------------------------------------------------------------------------------


def host_query(address: ServerAddress, service: str, timeout_s: float = 5.0) -> str:
    """A `host:` query's answer block (e.g. `host:version`)."""
    s = _Stream(address, timeout_s, timeout_s)
    try:
        s.request(service)
        return s.read_block().decode("utf-8", "replace")
    finally:
        s.close()


def server_version(address: ServerAddress, timeout_s: float = 2.0) -> int:
    return int(host_query(address, "host:version", timeout_s) or "0", 16)


@dataclass
class DeviceEntry:
    """One line of `host:devices-l`."""

    serial: str
    state: str  # device | unauthorized | offline | authorizing | connecting | no permissions ... | recovery ...
    attrs: dict[str, str] = field(default_factory=dict)  # product, model, device, transport_id, usb

    @property
    def model(self) -> str:
        return self.attrs.get("model", "").replace("_", " ")


_ATTR_RE = re.compile(r"(usb|product|model|device|transport_id):(\S*)")


def parse_devices_l(text: str) -> list[DeviceEntry]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        serial, rest = parts[0], parts[1:]
        state_words, attrs = [], {}
        for word in rest:
            m = _ATTR_RE.fullmatch(word)
            if m and state_words:
                attrs[m.group(1)] = m.group(2)
            elif not attrs:
                state_words.append(word)
        out.append(DeviceEntry(serial, " ".join(state_words) or "unknown", attrs))
    return out


def list_devices(address: ServerAddress, timeout_s: float = 5.0) -> list[DeviceEntry]:
    return parse_devices_l(host_query(address, "host:devices-l", timeout_s))


def device_features(address: ServerAddress, serial: str, timeout_s: float = 5.0) -> set[str]:
    return set(filter(None, host_query(address, f"host-serial:{serial}:features", timeout_s).strip().split(",")))


# -- services on one phone -------------------------------------------------------------------------------


def open_service(address: ServerAddress, serial: str, service: str, timeout_s: float | None,
                 connect_timeout_s: float = 10.0) -> _Stream:
    """A stream to `service` on phone `serial` (ServerUnreachable / ServerFailed / StreamCut)."""
    s = _Stream(address, timeout_s, connect_timeout_s)
    try:
        s.request(f"host:transport:{serial}")
        s.request(service)
    except BaseException:
        s.close()
        raise
    return s


def shell_v2(address: ServerAddress, serial: str, command: str, timeout_s: float | None,
             connect_timeout_s: float = 10.0) -> tuple[bytes, int]:
    """(stdout and stderr in arrival order, exit status); StreamCut when no exit packet came."""
    s = open_service(address, serial, f"shell,v2,raw:{command}", timeout_s, connect_timeout_s)
    try:
        s.send(struct.pack("<BI", _ID_CLOSE_STDIN, 0))
        out = bytearray()
        while True:
            head = s.recv_exact(5)
            kind, n = struct.unpack("<BI", head)
            data = s.recv_exact(n) if n else b""
            if kind in (_ID_STDOUT, _ID_STDERR):
                out += data
            elif kind == _ID_EXIT:
                return bytes(out), data[0] if data else 255
    finally:
        s.close()


def shell_v1(address: ServerAddress, serial: str, command: str, timeout_s: float | None,
             connect_timeout_s: float = 10.0) -> bytes:
    """Raw output up to the end of the stream (which looks the same whether the command ended or the
    phone went away: the caller marks the end)."""
    s = open_service(address, serial, f"shell:{command}", timeout_s, connect_timeout_s)
    try:
        out = bytearray()
        while True:
            chunk = s.recv_some()
            if not chunk:
                return bytes(out)
            out += chunk
    finally:
        s.close()


def sync_push(address: ServerAddress, serial: str, local: str | os.PathLike, remote: str, mode: int,
              timeout_s: float | None, connect_timeout_s: float = 10.0) -> None:
    """Send `local` to `remote` with permission bits `mode` (ServerFailed when the phone refuses)."""
    s = open_service(address, serial, "sync:", timeout_s, connect_timeout_s)
    try:
        spec = f"{remote},{0o100000 | (mode & 0o7777)}".encode()
        s.send(b"SEND" + struct.pack("<I", len(spec)) + spec)
        with open(local, "rb") as f:
            while True:
                chunk = f.read(SYNC_CHUNK)
                if not chunk:
                    break
                s.send(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
        s.send(b"DONE" + struct.pack("<I", int(os.path.getmtime(local)) & 0xFFFFFFFF))
        status = s.recv_exact(8)
        if status[:4] == b"FAIL":
            raise ServerFailed(s.recv_exact(struct.unpack("<I", status[4:])[0]).decode("utf-8", "replace"))
        if status[:4] != b"OKAY":
            raise StreamCut(f"unexpected sync answer {status[:4]!r}")
        s.send(b"QUIT" + struct.pack("<I", 0))
    finally:
        s.close()
