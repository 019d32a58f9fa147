"""The ADB transport of the test device: one TCP connection (handshake, auth, the stream multiplexer)
and its streams (WRTE/OKAY flow control), with the packet I/O both sides of them need.

Which service a stream is handed to is the device's business (``AdbTestDevice.service_for``).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
from typing import TYPE_CHECKING

from . import protocol as P
from .auth import new_token, parse_public_key

if TYPE_CHECKING:
    from .server import AdbTestDevice

log = logging.getLogger("adb_test_device")

# Inbound data buffered per stream before we stop acknowledging WRTEs (flow control).
_INBUF_HIGH_WATER = 2 * P.MAX_PAYLOAD
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class ProtocolError(Exception):
    """The peer broke the wire protocol; the connection is dropped."""


class StreamClosed(Exception):
    """The stream (or its whole connection) is gone."""


class _Connection:
    """One TCP connection: handshake, auth, and the stream multiplexer."""

    def __init__(self, device: AdbTestDevice, sock: socket.socket, addr, number: int):
        self.device = device
        self.sock = sock
        self.addr = addr
        self.number = number
        # One lock per connection: a message (header + payload) goes out in one sendall under it, so
        # messages from different stream threads never interleave on the wire.
        self.send_lock = threading.Lock()
        self.closed = threading.Event()
        self._close_lock = threading.Lock()
        self._reader_done = False  # the reader thread (the socket's only reader) has finished
        self._sock_released = False
        self._reader_thread: threading.Thread | None = None
        self.online = False
        self.dropping = False  # a fault is about to drop this connection: no new streams
        self.version = P.A_VERSION_MIN  # until the host's CNXN says otherwise
        self.out_maxdata = P.MAX_PAYLOAD_V1
        self.token: bytes | None = None
        self.host_banner = b""
        self.streams: dict[int, _Stream] = {}
        self.streams_lock = threading.Lock()
        self._next_local = 0
        self._rbuf = bytearray()

    # -- sending ----------------------------------------------------------------------------------

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        if len(data) > self.out_maxdata:
            raise AssertionError(f"payload {len(data)} > maxdata {self.out_maxdata}")
        with_check = not (self.online and self.version >= P.A_VERSION_SKIP_CHECKSUM)
        packet = P.pack(command, arg0, arg1, data, with_checksum=with_check)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("[%d] -> %r %r", self.number, P.Message(command, arg0, arg1, data), bytes(data[:48]))
        self._send_packet(packet, command, len(data))

    def _send_packet(self, packet: bytes, command: int, length: int) -> None:
        with self.send_lock:
            if self.closed.is_set():
                raise StreamClosed("connection closed")
            try:
                self.sock.sendall(packet)
            except OSError as exc:
                self._mark_closed()
                raise StreamClosed(f"connection lost: {exc}") from None
            stats = self.device.stats
            stats["max_payload_out"] = max(stats["max_payload_out"], length)
            if command == P.A_WRTE:
                stats["wrte_out"] += 1

    def close(self, graceful: bool = True) -> None:
        """Drop the connection: FIN if graceful, else RST.

        Any thread may call this, but only the reader thread closes the socket itself (or whoever
        comes after it has finished): closing the descriptor under a thread that is about to recv or
        send on it would let that thread read from or write into another socket that reused the
        number. Here the socket is only shut down, which wakes the reader (and, when graceful, any
        blocked sender); the reader's exit then releases it, RST included (SO_LINGER 0).
        """
        with self._close_lock:
            if self.closed.is_set() and self._sock_released:
                return
            first = not self.closed.is_set()
            self._mark_closed()
            if first:
                try:
                    if graceful:
                        self.sock.shutdown(socket.SHUT_RDWR)
                    else:
                        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
            release = self._reader_done or threading.current_thread() is self._reader_thread
        if release:
            self._release_socket()

    def _release_socket(self) -> None:
        """Close the descriptor once no thread can be inside a send on it (send_lock held)."""
        if not self.send_lock.acquire(timeout=1.0):
            # A sender is blocked on a full send buffer (the host stopped reading): wake it.
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.send_lock.acquire()
        try:
            if not self._sock_released:
                self._sock_released = True
                try:
                    self.sock.close()
                except OSError:
                    pass
        finally:
            self.send_lock.release()

    def _mark_closed(self) -> None:
        self.closed.set()
        with self.streams_lock:
            streams = list(self.streams.values())
            self.streams.clear()
        for s in streams:
            s.connection_lost()

    # -- receiving --------------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes | None:
        while len(self._rbuf) < n:
            if self.closed.is_set():
                return None
            try:
                readable, _, _ = select.select([self.sock], [], [], 0.25)
                if not readable:
                    continue
                chunk = self.sock.recv(max(65536, n - len(self._rbuf)))
                if chunk and _QUICKACK is not None:
                    # adb-shell writes header and payload separately without TCP_NODELAY; acking at
                    # once avoids Nagle + delayed-ACK stalls of ~40 ms per message.
                    self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except (OSError, ValueError):
                return None
            if not chunk:
                return None
            self._rbuf += chunk
        data = bytes(self._rbuf[:n])
        del self._rbuf[:n]
        return data

    def _read_message(self) -> P.Message | None:
        header = self._recv_exact(P.HEADER_SIZE)
        if header is None:
            return None
        command, arg0, arg1, length, check, magic = P.HEADER.unpack(header)
        if magic != command ^ 0xFFFFFFFF:
            raise ProtocolError(f"bad magic {magic:#x} for command {command:#x}")
        if command not in P.KNOWN_COMMANDS:
            raise ProtocolError(f"unknown command {command:#x}")
        if length > self.device.maxdata:
            raise ProtocolError(f"payload of {length} bytes exceeds maxdata {self.device.maxdata}")
        data = b""
        if length:
            data = self._recv_exact(length)
            if data is None:
                return None
            # A CNXN declares its sender's version; everything else follows the negotiated one.
            version = arg0 if command == P.A_CNXN else self.version
            if (version < P.A_VERSION_SKIP_CHECKSUM or check != 0) and P.checksum(data) != check:
                raise ProtocolError(f"bad checksum on {P.name_of(command)}: {check:#x} != {P.checksum(data):#x}")
        msg = P.Message(command, arg0, arg1, data)
        stats = self.device.stats
        stats["max_payload_in"] = max(stats["max_payload_in"], length)
        if command == P.A_WRTE:
            stats["wrte_in"] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("[%d] <- %r %r", self.number, msg, bytes(data[:48]))
        return msg

    def run(self) -> None:
        self._reader_thread = threading.current_thread()
        try:
            while not self.closed.is_set():
                msg = self._read_message()
                if msg is None:
                    break
                self._dispatch(msg)
        except ProtocolError as exc:
            log.warning("[%d] protocol error, dropping connection: %s", self.number, exc)
        except (StreamClosed, OSError) as exc:
            log.debug("[%d] connection ended: %s", self.number, exc)
        finally:
            with self._close_lock:
                self._reader_done = True
            self.close(graceful=True)
            self._release_socket()
            self.device._forget(self)

    def _dispatch(self, msg: P.Message) -> None:
        c = msg.command
        if c == P.A_CNXN:
            self._on_cnxn(msg)
        elif c == P.A_AUTH:
            self._on_auth(msg)
        elif not self.online:
            log.debug("[%d] ignoring %r before the connection is online", self.number, msg)
        elif c == P.A_OPEN:
            self._on_open(msg)
        elif c == P.A_OKAY:
            s = self._stream(msg.arg1, msg.arg0)
            if s is not None:
                s.on_okay()
        elif c == P.A_WRTE:
            s = self._stream(msg.arg1, msg.arg0)
            if s is not None:
                s.on_write(msg.data)
        elif c == P.A_CLSE:
            s = self._stream(msg.arg1, msg.arg0 or None)
            if s is not None:
                s.on_remote_close()
        # A_SYNC is obsolete; A_STLS is only sent by devices that asked for TLS; both are ignored.

    def _stream(self, local_id: int, remote_id: int | None) -> "_Stream | None":
        with self.streams_lock:
            s = self.streams.get(local_id)
        if s is None or (remote_id is not None and s.remote_id != remote_id):
            return None
        return s

    def _send_connect(self) -> None:
        self.online = True
        self.token = None
        # The CNXN itself still carries a checksum: the host only learns our version from it.
        data = self.device.banner()
        packet = P.pack(P.A_CNXN, self.version, self.out_maxdata, data, with_checksum=True)
        self._send_packet(packet, P.A_CNXN, len(data))
        log.debug("[%d] online: version %#x maxdata %d", self.number, self.version, self.out_maxdata)

    def _on_cnxn(self, msg: P.Message) -> None:
        if self.online:  # a host reconnecting on the same transport: reset every stream
            with self.streams_lock:
                streams = list(self.streams.values())
                self.streams.clear()
            for s in streams:
                s.connection_lost()
            self.online = False
        self.host_banner = msg.data.rstrip(b"\0")
        self.version = min(msg.arg0, self.device.version)
        self.out_maxdata = max(P.MAX_PAYLOAD_V1, min(msg.arg1, self.device.maxdata))
        if self.version < P.A_VERSION_MIN:
            raise ProtocolError(f"host protocol version {msg.arg0:#x} is too old")
        if not self.device.auth_required:
            self._send_connect()
            return
        self._send_token()

    def _send_token(self) -> None:
        self.token = new_token()
        self.send(P.A_AUTH, P.AUTH_TOKEN, 0, self.token)

    def _on_auth(self, msg: P.Message) -> None:
        if self.online or self.token is None:
            return
        if msg.arg0 == P.AUTH_SIGNATURE:
            for key in self.device.authorized_keys:
                if key.verify(self.token, msg.data):
                    log.debug("[%d] signature verified (%s)", self.number, key.comment)
                    self.device.auth_log.append("signature-ok")
                    self._send_connect()
                    return
            self.device.auth_log.append("signature-bad")
            self._send_token()  # adbd asks again with a fresh token; the host tries its next key
        elif msg.arg0 == P.AUTH_RSAPUBLICKEY:
            try:
                key = parse_public_key(msg.data)
            except ValueError as exc:
                log.warning("[%d] host offered a malformed public key: %s", self.number, exc)
                return
            if self.device.accept_new_keys:
                self.device.authorize_key(key)
                self.device.auth_log.append("pubkey-accepted")
                self._send_connect()
                return
            with self.device._lock:
                self.device.rejected_keys.append(key)
                self.device.auth_log.append("pubkey-rejected")
            if self.device.on_unknown_key == "close":
                self.close(graceful=True)
            # "wait": the dialog on the phone is never answered; the host times out.
        else:
            raise ProtocolError(f"unknown AUTH type {msg.arg0}")

    def _on_open(self, msg: P.Message) -> None:
        if self.dropping:
            return
        remote_id = msg.arg0
        if remote_id == 0:
            raise ProtocolError("OPEN with remote id 0")
        destination = msg.data.split(b"\0", 1)[0].decode("utf-8", "replace")
        handler = self.device.service_for(destination)
        if handler is None:
            log.info("[%d] refusing unknown service %r", self.number, destination)
            self.send(P.A_CLSE, 0, remote_id)
            return
        with self.streams_lock:
            self._next_local += 1
            local_id = self._next_local
            stream = _Stream(self, local_id, remote_id, destination)
            self.streams[local_id] = stream
        self.send(P.A_OKAY, local_id, remote_id)
        self.device._spawn(handler, f"adb-conn-{self.number}-{destination.split(':')[0]}-{local_id}",
                           self, stream, destination)


class _Stream:
    """One ADB stream (socket pair local_id <-> remote_id) with WRTE/OKAY flow control."""

    def __init__(self, conn: _Connection, local_id: int, remote_id: int, destination: str):
        self.conn = conn
        self.local_id = local_id
        self.remote_id = remote_id
        self.destination = destination
        self.cond = threading.Condition()
        self.can_send = True
        self.inbuf = bytearray()
        self.pending_okay = False
        self.remote_closed = False  # the host sent CLSE (or the connection died)
        self.local_closed = False  # we sent CLSE
        self.close_hooks: list = []

    # reader-thread side
    def on_okay(self) -> None:
        with self.cond:
            self.can_send = True
            self.cond.notify_all()

    def on_write(self, data: bytes) -> None:
        with self.cond:
            if self.local_closed:  # data racing our CLSE: dropped, not acknowledged
                return
            self.inbuf += data
            ack = len(self.inbuf) <= _INBUF_HIGH_WATER
            self.pending_okay = not ack
            self.cond.notify_all()
        if ack:
            self.conn.send(P.A_OKAY, self.local_id, self.remote_id)

    def wait_remote_closed(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.remote_closed, timeout)

    def on_remote_close(self) -> None:
        with self.cond:
            was_open = not self.local_closed
            self.remote_closed = True
            self.local_closed = True
            self.cond.notify_all()
        with self.conn.streams_lock:
            self.conn.streams.pop(self.local_id, None)
        if was_open:
            try:
                self.conn.send(P.A_CLSE, self.local_id, self.remote_id)
            except StreamClosed:
                pass
        self._run_hooks()

    def connection_lost(self) -> None:
        with self.cond:
            self.remote_closed = True
            self.local_closed = True
            self.cond.notify_all()
        self._run_hooks()

    def _run_hooks(self) -> None:
        with self.cond:  # the reader's CLSE and a dying connection may both get here: run them once
            hooks, self.close_hooks = self.close_hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("close hook failed")

    # service-thread side
    @property
    def is_open(self) -> bool:
        return not self.local_closed

    def write(self, data: bytes) -> None:
        view = memoryview(bytes(data))
        while view:
            chunk = bytes(view[: self.conn.out_maxdata])
            view = view[len(chunk):]
            with self.cond:
                while not self.can_send and not self.local_closed:
                    self.cond.wait()
                if self.local_closed:
                    raise StreamClosed(self.destination)
                self.can_send = False
            self.conn.send(P.A_WRTE, self.local_id, self.remote_id, chunk)

    def read(self, n: int) -> bytes:
        """Up to n bytes; blocks until some arrive; b'' once the host closed the stream."""
        with self.cond:
            while not self.inbuf and not self.remote_closed and not self.local_closed:
                self.cond.wait()
            data = bytes(self.inbuf[:n])
            del self.inbuf[:n]
            send_ack = self.pending_okay and len(self.inbuf) <= _INBUF_HIGH_WATER and not self.remote_closed
            if send_ack:
                self.pending_okay = False
        if send_ack:
            self.conn.send(P.A_OKAY, self.local_id, self.remote_id)
        return data

    def read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.read(n - len(out))
            if not chunk:
                raise StreamClosed(f"{self.destination}: EOF after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def close(self) -> None:
        """Send CLSE. The stream stays known until the host's CLSE arrives (or the connection ends)."""
        with self.cond:
            if self.local_closed:
                return
            self.local_closed = True
            self.cond.notify_all()
        try:
            self.conn.send(P.A_CLSE, self.local_id, self.remote_id)
        except StreamClosed:
            pass


