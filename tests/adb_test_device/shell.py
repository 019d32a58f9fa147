"""The ``shell:``, ``shell,v2,...:`` and ``exec:`` services of the test device.

A command runs on the host under ``/bin/sh`` in the sandbox, with its paths translated; v1 streams
carry raw output (stdout and stderr merged), v2 streams the shell protocol (separate stdout and
stderr, stdin packets, the exit status).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import protocol as P
from .transport import StreamClosed

if TYPE_CHECKING:
    from .transport import _Connection, _Stream

log = logging.getLogger("adb_test_device")


@dataclass
class CommandRecord:
    service: str  # "shell", "shell,v2,raw", "exec", ...
    command: str  # as the client sent it (phone paths)
    host_command: str = ""  # as run on the host
    exit_code: int | None = None
    connection: int = 0
    started: float = field(default_factory=time.time)


def _shell_service(conn: _Connection, stream: _Stream, destination: str) -> None:
    _ShellCommand(conn, stream, destination).run()


class _Wakeup:
    """A pipe that wakes the output loop when the stream closes under it.

    The close hook can run on another thread after this service has finished and closed the pipe
    (the host's CLSE answering ours arrives later). Writing to the closed descriptor number then
    wrote b"x" into whatever socket had reused it: a stray byte in front of another connection's
    CNXN. So the write end is only touched under this lock, and only while it is still ours.
    """

    def __init__(self):
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()
        self._open = True

    def poke(self) -> None:
        with self._lock:
            if self._open:
                try:
                    os.write(self._write_fd, b"x")
                except OSError:  # pipe full: a wake-up is already pending
                    pass

    def drain(self) -> None:
        try:
            os.read(self.fd, 64)  # drain, or the selector keeps reporting it
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self._open = False
            os.close(self._write_fd)
        os.close(self.fd)


class _ShellCommand:
    """One shell/exec stream, in the steps of ``run``: record the command, start it, pump its output,
    report its end, then (fault) drop the connection and reap the process."""

    def __init__(self, conn: _Connection, stream: _Stream, destination: str):
        self.conn = conn
        self.stream = stream
        self.device = device = conn.device
        sandbox = device.sandbox
        service, _, command = destination.partition(":")
        self.args = service.split(",")[1:]
        self.v2 = "v2" in self.args
        self.command = command
        host_cmd = device.fault_state.hang_rewrite(sandbox.translate_command(command), sandbox)
        self.record = CommandRecord(service=service, command=command, host_command=host_cmd,
                                    connection=conn.number)
        with device._lock:
            device.commands.append(self.record)
        self.drop_after = _is_shell(service) and device.fault_state.next_shell_command()

    def run(self) -> None:
        proc = self._start()
        if proc is None:
            return
        self.device._register_proc(proc)
        wake = _Wakeup()
        self._hook_close(proc, wake)
        self.device._spawn(_stdin_feeder, f"adb-conn-{self.conn.number}-stdin-{self.stream.local_id}",
                           self.stream, proc, self.v2)
        self._pump(proc, wake)
        if self.drop_after and not self.conn.closed.is_set():
            # Let the host read everything (it answers our CLSE with its own), then reset the connection.
            self.stream.wait_remote_closed(2.0)
            log.info("[%d] fault: dropping the connection after shell command %r", self.conn.number, self.command)
            self.conn.close(graceful=False)
        self._reap(proc)

    def _environment(self) -> dict[str, str]:
        root = self.device.sandbox.root
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
        for arg in self.args:  # shell,v2,TERM=xterm,raw:
            if arg.startswith("TERM="):
                env["TERM"] = arg[5:]
        return env

    def _start(self) -> subprocess.Popen | None:
        """The running command, or None once a failed exec has been reported and the stream closed."""
        v2, stream = self.v2, self.stream
        argv = ["/bin/sh", "-c", self.record.host_command] if self.command else ["/bin/sh"]
        try:
            return subprocess.Popen(argv, cwd=self.device.sandbox.root, env=self._environment(),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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
            return None

    def _hook_close(self, proc: subprocess.Popen, wake: _Wakeup) -> None:
        v2 = self.v2

        def on_close():
            if v2 and proc.poll() is None:  # adbd: protocol socket died -> SIGHUP to the shell
                try:
                    proc.send_signal(signal.SIGHUP)
                except OSError:
                    pass
            wake.poke()

        self.stream.close_hooks.append(on_close)
        if self.stream.remote_closed:
            on_close()

    def _pump(self, proc: subprocess.Popen, wake: _Wakeup) -> None:
        """Copy the command's output to the stream until it ends (or the stream does), then its exit."""
        v2, stream, conn = self.v2, self.stream, self.conn
        outputs = {proc.stdout.fileno(): P.SHELL_STDOUT}
        if v2:
            outputs[proc.stderr.fileno()] = P.SHELL_STDERR
        rewriters = {fd: self.device.sandbox.output_rewriter() if self.device.translate_output else None
                     for fd in outputs}
        chunk_max = max(1, min(P.SYNC_DATA_MAX, conn.out_maxdata - (P.SHELL_HEADER.size if v2 else 0)))
        sel = selectors.DefaultSelector()
        for fd in outputs:
            sel.register(fd, selectors.EVENT_READ)
        sel.register(wake.fd, selectors.EVENT_READ)
        alive = set(outputs)

        def emit(kind: int, data: bytes) -> None:
            if not data:
                return
            if v2:
                stream.write(P.SHELL_HEADER.pack(kind, len(data)) + data)
            else:
                stream.write(data)

        try:
            while alive and stream.is_open and not conn.closed.is_set():
                for key, _ in sel.select(0.5):
                    fd = key.fd
                    if fd == wake.fd:
                        wake.drain()
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
                if v2:
                    self._send_exit(proc)
                if self.drop_after:
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
            wake.close()

    def _send_exit(self, proc: subprocess.Popen) -> None:
        # v2 reports the exit status, so (like adbd) wait for the process; v1 ends at EOF.
        stream, conn = self.stream, self.conn
        exit_code = None
        while exit_code is None and stream.is_open and not conn.closed.is_set():
            try:
                exit_code = _status(proc.wait(0.2))
            except subprocess.TimeoutExpired:
                pass
        if exit_code is not None:
            stream.write(P.SHELL_HEADER.pack(P.SHELL_EXIT, 1) + bytes([exit_code & 0xFF]))

    def _reap(self, proc: subprocess.Popen) -> None:
        # Without holding anything up (a v1 command can outlive its stream, as on a phone). If the
        # device is stopping, stop() kills and reaps whatever is still registered.
        device = self.device
        while not device._stopping.is_set():
            try:
                self.record.exit_code = _status(proc.wait(0.5))
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
