"""A fake Android phone that speaks the real ADB protocol on loopback TCP.

One listening socket; one reader thread per connection; one thread per open service stream (plus a
stdin feeder for shells). See ``__init__.py`` for the public API and the package README section in
the docstring there for what is and is not modelled.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import select
import selectors
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field, fields

from . import protocol as P
from .auth import AndroidPublicKey, load_public_keys, new_token, parse_public_key
from .sandbox import PhoneLayout, Sandbox, mode_for_send, strtoul_mode

log = logging.getLogger("adb_test_device")

DEFAULT_FEATURES = ("shell_v2", "cmd", "stat_v2", "ls_v2", "fixed_push_mkdir")
# Inbound data buffered per stream before we stop acknowledging WRTEs (flow control).
_INBUF_HIGH_WATER = 2 * P.MAX_PAYLOAD


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class ProtocolError(Exception):
    """The peer broke the wire protocol; the connection is dropped."""


class StreamClosed(Exception):
    """The stream (or its whole connection) is gone."""


@dataclass
class Faults:
    """Failures the device injects. Each one-shot fault clears itself once it has fired.

    - ``drop_push_after_bytes``: during the next sync SEND, once this many file bytes have arrived the
      device resets the TCP connection (RST) and deletes the partial file, as adbd does on a failed push.
    - ``drop_after_shell_commands``: K; the K-th shell command (counted from when the fault is set)
      runs and its output and CLSE are delivered; once the host has answered the CLSE the device
      resets the connection (RST), so the next request fails at once (ConnectionResetError).
    - ``hang_program``: a basename (e.g. ``"et_bench"``). While set, every shell command that runs a
      program with that basename runs a stand-in with the same name instead, which takes the same
      arguments and sleeps until killed (SIGTERM/SIGKILL via ``kill PID`` from another shell works;
      its PID is what ``$!``, ``echo $$; exec ...``, ``pgrep`` would give). Not one-shot.
    """

    drop_push_after_bytes: int | None = None
    drop_after_shell_commands: int | None = None
    hang_program: str | None = None


@dataclass
class CommandRecord:
    service: str  # "shell", "shell,v2,raw", "exec", ...
    command: str  # as the client sent it (phone paths)
    host_command: str = ""  # as run on the host
    exit_code: int | None = None
    connection: int = 0
    started: float = field(default_factory=time.time)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdbTestDevice:
    """A protocol-level fake phone. ``start()`` returns the port; ``stop()``; or use ``with``.

    ``authorized_keys``: Android public keys (adbkey.pub contents, paths to .pub files, or lists of
    those). ``accept_new_keys``: when a host offers an unknown key (AUTH RSAPUBLICKEY), accept and
    remember it, like a user tapping "Always allow"; otherwise the device does what a phone with an
    unanswered dialog does: nothing (``on_unknown_key="wait"``), or drops the connection
    (``on_unknown_key="close"``). ``props`` override/extend the default system properties.
    """

    def __init__(
        self,
        sandbox_dir,
        authorized_keys=(),
        accept_new_keys: bool = False,
        props: dict | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        auth_required: bool = True,
        on_unknown_key: str = "wait",
        maxdata: int = P.MAX_PAYLOAD,
        version: int = P.A_VERSION,
        features=DEFAULT_FEATURES,
        cpu_clusters=None,
        thermal_zones=None,
        battery: dict | None = None,
        governor: str = "schedutil",
        translate_output: bool = True,
        faults: Faults | None = None,
        **fault_kwargs,
    ):
        if not _is_loopback(host):
            raise ValueError(f"AdbTestDevice only listens on loopback, not {host!r}")
        if on_unknown_key not in ("wait", "close"):
            raise ValueError("on_unknown_key must be 'wait' or 'close'")
        layout = PhoneLayout(props=dict(props or {}), governor=governor)
        if cpu_clusters is not None:
            layout.cpu_clusters = [tuple(c) for c in cpu_clusters]
        if thermal_zones is not None:
            layout.thermal_zones = [tuple(z) for z in thermal_zones]
        if battery is not None:
            layout.battery = {**layout.battery, **{str(k): str(v) for k, v in battery.items()}}
        os.makedirs(sandbox_dir, exist_ok=True)
        self.sandbox = Sandbox(sandbox_dir, layout)
        self.sandbox.populate()
        self.host = host
        self.port = port
        self.auth_required = auth_required
        self.accept_new_keys = accept_new_keys
        self.on_unknown_key = on_unknown_key
        self.maxdata = int(maxdata)
        self.version = int(version)
        self.features = tuple(features)
        self.translate_output = translate_output
        self._lock = threading.RLock()
        self._authorized: list[AndroidPublicKey] = load_public_keys(authorized_keys)
        self.rejected_keys: list[AndroidPublicKey] = []  # offered via RSAPUBLICKEY and not accepted
        self.faults = faults or Faults()
        self.set_faults(**fault_kwargs)
        self._shell_counter = 0  # shell commands since drop_after_shell_commands was last set
        self.commands: list[CommandRecord] = []
        self.connections_total = 0
        # What happened during AUTH, in order: "signature-ok", "signature-bad", "pubkey-accepted",
        # "pubkey-rejected".
        self.auth_log: list[str] = []
        # Wire statistics (all connections): largest payloads seen, WRTE counts.
        self.stats = {"max_payload_in": 0, "max_payload_out": 0, "wrte_in": 0, "wrte_out": 0}
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[_Connection] = set()
        self._procs: set[subprocess.Popen] = set()
        self._sessions: set[int] = set()  # every shell command starts a session (sid == its pid)
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._next_conn = 0

    # -- public API -------------------------------------------------------------------------------

    @property
    def sandbox_dir(self) -> str:
        return self.sandbox.root

    @property
    def props(self) -> dict[str, str]:
        return self.sandbox.props

    @property
    def serial(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def authorized_keys(self) -> list[AndroidPublicKey]:
        with self._lock:
            return list(self._authorized)

    def authorize_key(self, key) -> None:
        with self._lock:
            self._authorized.extend(load_public_keys(key))
            self._persist_keys()

    def revoke_all_keys(self) -> None:
        with self._lock:
            self._authorized.clear()
            self._persist_keys()

    def set_prop(self, key: str, value: str) -> None:
        with self._lock:
            self.sandbox.props[str(key)] = str(value)
            self.sandbox.write_props()

    def set_temperature(self, zone, millideg: int) -> None:
        self.sandbox.set_temperature(zone, millideg)

    def set_battery(self, **values) -> None:
        """``set_battery(level=15, temperature=450, AC_powered="true")`` (underscores may stand for spaces)."""
        battery = self.sandbox.layout.battery
        for key, value in values.items():
            if key not in battery and key.replace("_", " ") in battery:
                key = key.replace("_", " ")
            battery[key] = str(value)
        self.sandbox.write_battery(battery)

    def set_faults(self, **kwargs) -> None:
        """Set (or with None, clear) faults by name; see :class:`Faults`."""
        names = {f.name for f in fields(Faults)}
        with self._lock:
            for key, value in kwargs.items():
                if key not in names:
                    raise TypeError(f"unknown fault {key!r}; known: {sorted(names)}")
                setattr(self.faults, key, value)
                if key == "drop_after_shell_commands":
                    self._shell_counter = 0

    def clear_faults(self) -> None:
        with self._lock:
            self.faults = Faults()

    def phone_path(self, phone_path: str) -> str:
        """Host path of a phone path (``/data/local/tmp/x`` -> ``<sandbox>/data/local/tmp/x``)."""
        return self.sandbox.to_host(phone_path)

    def banner(self) -> bytes:
        p = self.sandbox.props
        parts = [f"ro.product.name={p.get('ro.product.name', '')}",
                 f"ro.product.model={p.get('ro.product.model', '')}",
                 f"ro.product.device={p.get('ro.product.device', '')}",
                 "features=" + ",".join(self.features)]
        return ("device::" + ";".join(parts)).encode()

    def start(self) -> int:
        if self._listener is not None:
            return self.port
        self._stopping.clear()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(16)
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"adb-test-device:{self.port}",
                                               daemon=True)
        self._accept_thread.start()
        log.debug("listening on %s:%d, sandbox %s", self.host, self.port, self.sandbox.root)
        return self.port

    def stop(self, timeout: float = 5.0) -> None:
        """Close everything: listener, connections (FIN), every process a shell started (SIGKILL)."""
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close(graceful=True)
        self._kill_all_processes()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = [t for t in self._threads if t.is_alive()]
            if not threads or time.monotonic() > deadline:
                break
            threads[0].join(max(0.0, min(0.2, deadline - time.monotonic())))
        for t in threads:
            log.warning("thread %s still running after stop()", t.name)
        self._listener = None
        self._accept_thread = None

    def __enter__(self) -> "AdbTestDevice":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def kill_connections(self) -> None:
        """Drop every open connection now (as if the cable were pulled)."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close(graceful=False)

    # -- internals --------------------------------------------------------------------------------

    def _persist_keys(self) -> None:
        # Like /data/misc/adb/adb_keys on a phone (informational; the list in memory is what counts).
        import base64
        lines = []
        for k in self._authorized:
            size = (k.modulus.bit_length() + 31) // 32 * 4
            n0inv = (-pow(k.modulus, -1, 1 << 32)) % (1 << 32)
            rr = pow(2, 2 * size * 8, k.modulus)
            blob = struct.pack("<II", size // 4, n0inv) + k.modulus.to_bytes(size, "little") + \
                rr.to_bytes(size, "little") + struct.pack("<I", k.exponent)
            lines.append(base64.b64encode(blob).decode() + (" " + k.comment if k.comment else ""))
        path = self.sandbox.to_host("/data/misc/adb/adb_keys")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + ("\n" if lines else ""))

    def _spawn(self, target, name: str, *args) -> threading.Thread:
        def run():
            try:
                target(*args)
            except Exception:  # a service thread must never take the device down
                log.exception("thread %s failed", name)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        t = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()
        return t

    def _accept_loop(self) -> None:
        listener = self._listener
        while not self._stopping.is_set():
            try:
                sock, addr = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    break
                self._next_conn += 1
                self.connections_total += 1
                conn = _Connection(self, sock, addr, self._next_conn)
                self._conns.add(conn)
            self._spawn(conn.run, f"adb-conn-{conn.number}")

    def _forget(self, conn: "_Connection") -> None:
        with self._lock:
            self._conns.discard(conn)

    def _register_proc(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.add(proc)
            self._sessions.add(proc.pid)
            stopping = self._stopping.is_set()
        if stopping:
            _kill_tree(proc, signal.SIGKILL)

    def _reap(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def _kill_all_processes(self) -> None:
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            _kill_tree(proc, signal.SIGKILL)
        # Leftovers of commands that already ended (`prog &`): processes in one of our sessions that
        # carry this device's environment marker. Both are checked so a recycled pid is never hit.
        with self._lock:
            sessions = set(self._sessions)
        marker = b"AMCSIM_ROOT=" + self.sandbox.root.encode() + b"\0"
        for pid in _pids_in_sessions(sessions):
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    if marker not in fh.read() + b"\0":
                        continue
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for proc in procs:
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                log.warning("process %d did not die", proc.pid)
        with self._lock:
            self._procs.difference_update(procs)

    def _next_shell_fault(self) -> bool:
        """Count a shell command; True if the connection must drop once it has finished."""
        with self._lock:
            k = self.faults.drop_after_shell_commands
            if k is None:
                return False
            self._shell_counter += 1
            if self._shell_counter >= k:
                self.faults.drop_after_shell_commands = None
                self._shell_counter = 0
                return True
            return False

    def _take_push_fault(self) -> int | None:
        with self._lock:
            n = self.faults.drop_push_after_bytes
            self.faults.drop_push_after_bytes = None
            return n


def _pids_in_sessions(sessions: set[int]) -> list[int]:
    found = []
    if not sessions:
        return found
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields_ = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # after "pid (comm)": state ppid pgrp session ...
        if len(fields_) > 3 and fields_[0] != b"Z" and int(fields_[3]) in sessions:
            found.append(int(entry))
    return found


def _kill_tree(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group the shell started (it is a session leader), then the process."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.send_signal(sig)
    except (ProcessLookupError, OSError):
        pass


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
        handler = _service_for(destination)
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


# -- services -------------------------------------------------------------------------------------


def _service_for(destination: str):
    name = destination.split(":", 1)[0]
    if destination.startswith("sync:"):
        return _sync_service
    if name == "shell" or name.startswith("shell,") or name == "exec":
        return _shell_service
    return None


def _hang_rewrite(command: str, program: str, stub: str) -> str:
    """Replace `program` where it is run (command position) by the hang stub."""
    name = re.escape(os.path.basename(program))
    # A word ending in /NAME or equal to NAME, at the start of a simple command: after start,
    # ; & | ( ` $( && || or one of a few prefix commands (exec, nohup, taskset MASK, ...).
    lead = (r"(?:^|[;&|(`]|\$\(|\bthen|\bdo|\belse|\bexec|\bnohup|\btime|\bnice(?:\s+-n\s*-?\d+)?"
            r"|\btaskset(?:\s+-[a-z]+)*\s+\S+|\btimeout(?:\s+-\S+)*\s+\S+|\benv(?:\s+\w+=\S*)*"
            r"|-c\s+['\"]|\b\w+=\S*\s)")
    pattern = re.compile(r"(?P<lead>" + lead + r")(?P<ws>\s*)(?P<word>[^\s;&|()`'\"<>]*/)?" + name +
                         r"(?=$|[\s;&|()`'\"<>])")
    return pattern.sub(lambda m: m.group("lead") + m.group("ws") + stub, command)


def _shell_service(conn: _Connection, stream: _Stream, destination: str) -> None:
    device = conn.device
    sandbox = device.sandbox
    service, _, command = destination.partition(":")
    args = service.split(",")[1:]
    v2 = "v2" in args
    raw = command
    host_cmd = sandbox.translate_command(command)
    hang = device.faults.hang_program
    if hang:
        host_cmd = _hang_rewrite(host_cmd, hang, sandbox.hang_stub(hang))
    record = CommandRecord(service=service, command=raw, host_command=host_cmd, connection=conn.number)
    with device._lock:
        device.commands.append(record)
    drop_after = _is_shell(service) and device._next_shell_fault()
    root = sandbox.root
    env = {
        "PATH": f"{root}/system/bin:{root}/system/xbin:{root}/vendor/bin:/usr/local/bin:/usr/bin:/bin:"
                "/usr/local/sbin:/usr/sbin:/sbin",
        "HOME": root,
        "TMPDIR": f"{root}/data/local/tmp",
        "ANDROID_ROOT": f"{root}/system",
        "ANDROID_DATA": f"{root}/data",
        "EXTERNAL_STORAGE": f"{root}/sdcard",
        "AMCSIM_ROOT": root,
        "HOSTNAME": "localhost",
        "USER": "shell",
        "LOGNAME": "shell",
        "SHELL": "/system/bin/sh",
        "LANG": "C.UTF-8",
    }
    for arg in args:  # shell,v2,TERM=xterm,raw:
        if arg.startswith("TERM="):
            env["TERM"] = arg[5:]
    argv = ["/bin/sh", "-c", host_cmd] if command else ["/bin/sh"]
    try:
        proc = subprocess.Popen(argv, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if v2 else subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        msg = f"error: exec failed: {exc}\n".encode()
        try:
            if v2:
                stream.write(P.SHELL_HEADER.pack(P.SHELL_STDERR, len(msg)) + msg +
                             P.SHELL_HEADER.pack(P.SHELL_EXIT, 1) + b"\x01")
            else:
                stream.write(msg)
        except StreamClosed:
            pass
        stream.close()
        return
    device._register_proc(proc)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    # The close hook can run on another thread after this service has finished and closed the pipe
    # (the host's CLSE answering ours arrives later). Writing to the closed descriptor number then
    # wrote b"x" into whatever socket had reused it: a stray byte in front of another connection's
    # CNXN. So the write end is only touched under this lock, and only while it is still ours.
    wake_lock = threading.Lock()
    wake_open = [True]

    def on_close():
        if v2 and proc.poll() is None:  # adbd: protocol socket died -> SIGHUP to the shell
            try:
                proc.send_signal(signal.SIGHUP)
            except OSError:
                pass
        with wake_lock:
            if wake_open[0]:
                try:
                    os.write(wake_w, b"x")
                except OSError:  # pipe full: a wake-up is already pending
                    pass

    stream.close_hooks.append(on_close)
    if stream.remote_closed:
        on_close()
    device._spawn(_stdin_feeder, f"adb-conn-{conn.number}-stdin-{stream.local_id}", stream, proc, v2)

    rewriters = {}
    outputs = {proc.stdout.fileno(): P.SHELL_STDOUT}
    if v2:
        outputs[proc.stderr.fileno()] = P.SHELL_STDERR
    for fd in outputs:
        rewriters[fd] = sandbox.output_rewriter() if device.translate_output else None
    chunk_max = max(1, min(P.SYNC_DATA_MAX, conn.out_maxdata - (P.SHELL_HEADER.size if v2 else 0)))
    sel = selectors.DefaultSelector()
    for fd in outputs:
        sel.register(fd, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    alive = set(outputs)

    def emit(kind: int, data: bytes) -> None:
        if not data:
            return
        if v2:
            stream.write(P.SHELL_HEADER.pack(kind, len(data)) + data)
        else:
            stream.write(data)

    exit_code = None
    try:
        while alive and stream.is_open and not conn.closed.is_set():
            for key, _ in sel.select(0.5):
                fd = key.fd
                if fd == wake_r:
                    try:
                        os.read(wake_r, 64)  # drain, or the selector keeps reporting it
                    except OSError:
                        pass
                    continue
                data = os.read(fd, chunk_max)
                rw = rewriters[fd]
                if not data:
                    alive.discard(fd)
                    sel.unregister(fd)
                    if rw is not None:
                        emit(outputs[fd], rw.flush())
                    continue
                emit(outputs[fd], rw.feed(data) if rw is not None else data)
        if not alive and stream.is_open:
            # v2 reports the exit status, so (like adbd) wait for the process; v1 ends at EOF.
            if v2:
                while exit_code is None and stream.is_open and not conn.closed.is_set():
                    try:
                        exit_code = _status(proc.wait(0.2))
                    except subprocess.TimeoutExpired:
                        pass
                if exit_code is not None:
                    stream.write(P.SHELL_HEADER.pack(P.SHELL_EXIT, 1) + bytes([exit_code & 0xFF]))
            if drop_after:
                conn.dropping = True
            stream.close()
    except StreamClosed:
        pass
    finally:
        sel.close()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        with wake_lock:
            wake_open[0] = False
            os.close(wake_w)
        os.close(wake_r)
    if drop_after and not conn.closed.is_set():
        # Let the host read everything (it answers our CLSE with its own), then reset the connection.
        stream.wait_remote_closed(2.0)
        log.info("[%d] fault: dropping the connection after shell command %r", conn.number, raw)
        conn.close(graceful=False)
    # Reap without holding anything up (a v1 command can outlive its stream, as on a phone). If the
    # device is stopping, stop() kills and reaps whatever is still registered.
    while not device._stopping.is_set():
        try:
            record.exit_code = _status(proc.wait(0.5))
            device._reap(proc)
            break
        except subprocess.TimeoutExpired:
            continue


def _is_shell(service: str) -> bool:
    return service == "shell" or service.startswith("shell,")


def _status(returncode: int) -> int:
    return 128 + (-returncode) if returncode < 0 else returncode


def _stdin_feeder(stream: _Stream, proc: subprocess.Popen, v2: bool) -> None:
    stdin = proc.stdin
    try:
        if not v2:
            while True:
                data = stream.read(65536)
                if not data:
                    break
                stdin.write(data)
                stdin.flush()
            return
        while True:
            header = stream.read_exact(P.SHELL_HEADER.size)
            kind, length = P.SHELL_HEADER.unpack(header)
            payload = stream.read_exact(length) if length else b""
            if kind == P.SHELL_STDIN:
                stdin.write(payload)
                stdin.flush()
            elif kind == P.SHELL_CLOSE_STDIN:
                break
            # window-size changes and unknown packets are ignored (no pty here)
    except (StreamClosed, OSError, ValueError):
        pass
    finally:
        try:
            stdin.close()
        except OSError:
            pass


def _sync_service(conn: _Connection, stream: _Stream, destination: str) -> None:
    sandbox = conn.device.sandbox
    out = bytearray()

    def put(data: bytes) -> None:
        out.extend(data)
        if len(out) >= conn.out_maxdata:
            flush()

    def flush() -> None:
        if out:
            data = bytes(out)
            out.clear()
            stream.write(data)

    def fail(reason: str) -> None:
        msg = reason.encode()
        put(P.SYNC_REQUEST.pack(P.ID_FAIL, len(msg)) + msg)
        flush()

    try:
        while True:
            flush()
            request = stream.read(P.SYNC_REQUEST.size)
            if not request:
                break  # host closed the stream
            if len(request) < P.SYNC_REQUEST.size:
                request += stream.read_exact(P.SYNC_REQUEST.size - len(request))
            ident, length = P.SYNC_REQUEST.unpack(request)
            if length > P.SYNC_PATH_MAX:
                fail("path too long")
                break
            path = stream.read_exact(length).decode("utf-8", "surrogateescape") if length else ""
            if ident == P.ID_STAT:
                put(_stat_v1(sandbox.to_host(path)))
            elif ident in (P.ID_STA2, P.ID_LST2):
                put(_stat_v2(ident, sandbox.to_host(path)))
            elif ident in (P.ID_LIST, P.ID_LIS2):
                _list(sandbox.to_host(path), ident == P.ID_LIS2, put)
            elif ident == P.ID_RECV:
                if not _recv(sandbox.to_host(path), put, fail):
                    break
            elif ident == P.ID_SEND:
                if not _send(conn, stream, sandbox, path, put, fail):
                    break
            elif ident == P.ID_QUIT:
                break
            else:
                fail(f"unknown command {ident:08x}")
                break
        flush()
        stream.close()
    except StreamClosed:
        pass


def _stat_v1(host_path: str) -> bytes:
    try:
        st = os.lstat(host_path)
        return P.SYNC_STAT_V1.pack(P.ID_STAT, st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime) & 0xFFFFFFFF)
    except OSError:
        return P.SYNC_STAT_V1.pack(P.ID_STAT, 0, 0, 0)


def _v2_fields(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_mode, st.st_nlink, 2000, 2000, st.st_size,
            int(st.st_atime), int(st.st_mtime), int(st.st_ctime))


def _stat_v2(ident: int, host_path: str) -> bytes:
    try:
        st = os.stat(host_path) if ident == P.ID_STA2 else os.lstat(host_path)
    except OSError as exc:
        return P.SYNC_STAT_V2.pack(ident, exc.errno or errno.EIO, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    return P.SYNC_STAT_V2.pack(ident, 0, *_v2_fields(st))


def _list(host_path: str, v2: bool, put) -> None:
    try:
        names = [".", ".."] + sorted(os.listdir(host_path))
    except OSError:
        names = []
    for name in names:
        encoded = name.encode("utf-8", "surrogateescape")
        try:
            st = os.lstat(os.path.join(host_path, name))
        except OSError as exc:
            if v2:
                put(P.SYNC_DENT_V2.pack(P.ID_DNT2, exc.errno or errno.EIO, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                        len(encoded)) + encoded)
            continue
        if v2:
            put(P.SYNC_DENT_V2.pack(P.ID_DNT2, 0, *_v2_fields(st), len(encoded)) + encoded)
        else:
            put(P.SYNC_DENT_V1.pack(P.ID_DENT, st.st_mode, st.st_size & 0xFFFFFFFF,
                                    int(st.st_mtime) & 0xFFFFFFFF, len(encoded)) + encoded)
    if v2:
        put(P.SYNC_DENT_V2.pack(P.ID_DONE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    else:
        put(P.SYNC_DENT_V1.pack(P.ID_DONE, 0, 0, 0, 0))


def _recv(host_path: str, put, fail) -> bool:
    try:
        fh = open(host_path, "rb")
    except OSError as exc:
        fail(f"open failed: {os.strerror(exc.errno or errno.EIO)}")
        return False
    with fh:
        if stat.S_ISDIR(os.fstat(fh.fileno()).st_mode):
            fail("read failed: Is a directory")
            return False
        while True:
            data = fh.read(P.SYNC_DATA_MAX - P.SYNC_REQUEST.size)
            if not data:
                break
            put(P.SYNC_REQUEST.pack(P.ID_DATA, len(data)) + data)
    put(P.SYNC_REQUEST.pack(P.ID_DONE, 0))
    return True


def _send(conn: _Connection, stream: _Stream, sandbox: Sandbox, spec: str, put, fail) -> bool:
    path, comma, mode_text = spec.rpartition(",")
    if not comma:
        fail("missing , in ID_SEND")
        return False
    try:
        mode = strtoul_mode(mode_text)
    except ValueError:
        fail("bad mode")
        return False
    host_path = sandbox.to_host(path)
    drop_at = conn.device._take_push_fault()

    def drain() -> None:  # after a failure, swallow DATA until DONE, as adbd does
        while True:
            ident, size = P.SYNC_REQUEST.unpack(stream.read_exact(P.SYNC_REQUEST.size))
            if ident == P.ID_DONE:
                return
            if ident != P.ID_DATA or size > P.SYNC_DATA_MAX:
                return
            stream.read_exact(size)

    try:
        st = os.lstat(host_path)
        if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            os.unlink(host_path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        fail(f"couldn't create file: {os.strerror(exc.errno or errno.EIO)}")
        drain()
        return False

    if stat.S_ISLNK(mode):
        ident, size = P.SYNC_REQUEST.unpack(stream.read_exact(P.SYNC_REQUEST.size))
        if ident != P.ID_DATA or size > P.SYNC_DATA_MAX:
            fail("invalid data message: expected ID_DATA")
            return False
        target = stream.read_exact(size).split(b"\0", 1)[0]
        try:
            os.makedirs(os.path.dirname(host_path), exist_ok=True)
            os.symlink(target, host_path)
        except OSError as exc:
            fail(f"symlink failed: {os.strerror(exc.errno or errno.EIO)}")
            return False
        ident, mtime = P.SYNC_REQUEST.unpack(stream.read_exact(P.SYNC_REQUEST.size))
        if ident != P.ID_DONE:
            fail("invalid data message: expected ID_DONE")
            return False
        put(P.SYNC_REQUEST.pack(P.ID_OKAY, 0))
        return True

    perms = mode_for_send(mode)
    try:
        try:
            fd = os.open(host_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perms)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(host_path), mode=0o775, exist_ok=True)
            fd = os.open(host_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perms)
    except OSError as exc:
        fail(f"couldn't create file: {os.strerror(exc.errno or errno.EIO)}")
        drain()
        return False
    os.fchmod(fd, perms)  # not subject to the umask, like adbd's fchmod
    received = 0
    ok = False
    try:
        while True:
            ident, size = P.SYNC_REQUEST.unpack(stream.read_exact(P.SYNC_REQUEST.size))
            if ident == P.ID_DONE:
                mtime = size
                break
            if ident != P.ID_DATA:
                fail("invalid data message")
                return False
            if size > P.SYNC_DATA_MAX:
                fail("oversize data message")
                return False
            data = stream.read_exact(size)
            if drop_at is not None and received + len(data) >= drop_at:
                os.write(fd, data[: max(0, drop_at - received)])
                log.info("[%d] fault: dropping the connection after %d bytes of %s", conn.number, drop_at, path)
                os.close(fd)  # clean up first, so the host never sees the partial file after its error
                fd = -1
                os.unlink(host_path)
                conn.close(graceful=False)
                raise StreamClosed("fault: connection dropped mid-push")
            os.write(fd, data)
            received += len(data)
        ok = True
    finally:
        if fd >= 0:
            os.close(fd)
        if not ok:
            try:
                os.unlink(host_path)
            except OSError:
                pass
    os.utime(host_path, (mtime, mtime), follow_symlinks=False)
    put(P.SYNC_REQUEST.pack(P.ID_OKAY, 0))
    return True
