"""A fake Android phone that speaks the real ADB protocol on loopback TCP: the device itself.

One listening socket; one reader thread per connection; one thread per open service stream (plus a
stdin feeder for shells). See ``__init__.py`` for the public API and the package README section in
the docstring there for what is and is not modelled. The parts, one job each:

- ``transport.py``: a connection (handshake, auth, multiplexer) and its streams (flow control);
- ``shell.py``: the ``shell:``/``shell,v2:``/``exec:`` services; ``sync.py``: the ``sync:`` service;
- ``faults.py``: the failures a test can arm, and when each fires;
- here: the device (lifecycle, keys, props, processes) and which service serves which stream.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import struct
import subprocess
import threading
import time

from . import protocol as P
from .auth import AndroidPublicKey, load_public_keys
from .faults import Faults, FaultState, _hang_rewrite
from .sandbox import PhoneLayout, Sandbox
from .shell import CommandRecord, _shell_service
from .sync import _sync_service
from .transport import ProtocolError, StreamClosed, _Connection, _Stream

# Re-exported: the package's __init__ and the tests import these from here.
__all__ = ["DEFAULT_FEATURES", "AdbTestDevice", "CommandRecord", "Faults", "ProtocolError", "StreamClosed",
           "_Connection", "_Stream", "_hang_rewrite"]

log = logging.getLogger("adb_test_device")

DEFAULT_FEATURES = ("shell_v2", "cmd", "stat_v2", "ls_v2", "fixed_push_mkdir")


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
        self.fault_state = FaultState(self._lock, faults)
        self.set_faults(**fault_kwargs)
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

    @property
    def faults(self) -> Faults:
        """The armed faults (the services take them through ``fault_state``)."""
        return self.fault_state.faults

    def set_faults(self, **kwargs) -> None:
        """Set (or with None, clear) faults by name; see :class:`Faults`."""
        self.fault_state.set(**kwargs)

    def clear_faults(self) -> None:
        self.fault_state.clear()

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

    def service_for(self, destination: str):
        """The service function for an OPEN's destination, or None (the stream is refused)."""
        name = destination.split(":", 1)[0]
        if destination.startswith("sync:"):
            return _sync_service
        if name == "shell" or name.startswith("shell,") or name == "exec":
            return _shell_service
        return None

    def _forget(self, conn: _Connection) -> None:
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

