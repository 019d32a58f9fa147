"""The ADB transport: adb-shell over USB or TCP, the host key, the authorisation prompt, timeouts.

Every command goes through `AdbConnection.run(command, timeout_s)`, which returns the output and
the exit status (v1 `shell:` has no exit status, so a marker line carries it) and turns every
transport failure into `AdbConnectionLost`, an `AmcError` saying what was being done and what to do.

Facts of adb-shell 0.4.4 this module works around:

- a read that finds the socket closed normally (EOF) gets `b""` and spins until `read_timeout_s`:
  our TCP transport raises `ConnectionResetError` on EOF instead, so a lost phone is noticed at once.
- its TCP `bulk_write` is one `send()` on a non-blocking socket and the caller ignores the count, so
  a short write (full send buffer: a busy phone, a loaded host) silently drops the rest of the message
  and every later header is read from the wrong offset: our transport writes until all is sent.
  (Reads are fine: adb-shell loops until the 24-byte header, then the payload, are complete.)
- a silent command blocks in `select` for `transport_timeout_s` and then raises: every call passes
  its own timeout, and after any error the connection is closed (the stream state is unknown).
- v1 shell streams do not kill the process when they are closed: long runs are started in the
  background and killed by PID (see `remote_process.py`), never left to a stream timeout.
"""

from __future__ import annotations

import logging
import os
import select
import shlex
import socket
import stat
import sys
import threading
import time
from pathlib import Path

from device.errors import AmcError

log = logging.getLogger("device.adb")

DEFAULT_AUTH_TIMEOUT_S = 60.0  # how long the phone's "Allow USB debugging?" prompt is waited for
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_COMMAND_TIMEOUT_S = 30.0
RC_MARKER = "__AMC_RC__="
AUTH_PROMPT = "accept the {prompt} (key {key})..."
# What the phone's authorisation dialog is called: over TCP there is no cable to speak of.
USB_PROMPT = "USB debugging prompt on the phone"
TCP_PROMPT = "debugging prompt on the phone's screen"

q = shlex.quote


class Unreachable(Exception):
    """No TCP connection to the phone's address at all."""


class AdbConnectionLost(AmcError):
    """The connection to the phone broke during a command; `partial` holds what was measured before."""

    def __init__(self, message: str, partial: dict | None = None):
        super().__init__(message)
        self.partial = dict(partial or {})


# -- keys ------------------------------------------------------------------------------------------


def android_user_dir() -> Path:
    """Where Google's adb keeps `adbkey`: $ANDROID_USER_HOME, $ANDROID_SDK_HOME/.android, ~/.android."""
    env = os.environ.get("ANDROID_USER_HOME")
    if env:
        return Path(env).expanduser()
    env = os.environ.get("ANDROID_SDK_HOME")
    if env:
        return Path(env).expanduser() / ".android"
    return Path(os.path.expanduser("~")) / ".android"


def key_path() -> Path:
    return android_user_dir() / "adbkey"


def _display(path: Path) -> str:
    home = os.path.expanduser("~")
    s = str(path)
    return "~" + s[len(home):] if home and home != "/" and s.startswith(home + os.sep) else s


def ensure_key(path: Path | None = None) -> Path:
    """The adb tool's own private key (a phone that trusts `adb` trusts us); generated (0600) if absent."""
    path = Path(path) if path is not None else key_path()
    if path.is_file():
        return path
    from adb_shell.auth.keygen import keygen

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = os.umask(0o077)
    try:
        keygen(str(path))
    except Exception as exc:
        raise AmcError(f"cannot create an ADB key at {path}: {exc}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    log.warning("generated a new ADB key at %s; the phone will ask to authorise it", path)
    return path


def load_signers(path: Path | None = None) -> list:
    """Signers for the host key plus any listed in $ADB_VENDOR_KEYS (files, ':'-separated)."""
    paths = [ensure_key(path)]
    for extra in filter(None, os.environ.get("ADB_VENDOR_KEYS", "").split(os.pathsep)):
        p = Path(extra).expanduser()
        if p.is_file() and p not in paths:
            paths.append(p)
    signers = []
    for p in paths:
        try:
            from adb_shell.auth.sign_pythonrsa import PythonRSASigner

            signers.append(PythonRSASigner.FromRSAKeyPath(str(p)))
        except Exception as exc:
            if p == paths[0]:
                raise AmcError(f"cannot read the ADB key {p}: {exc} (delete it to have a new one made)") from exc
            log.warning("ignoring ADB key %s: %s", p, exc)
    return signers


# -- transports ------------------------------------------------------------------------------------


def _deadline(timeout_s):
    return None if timeout_s is None else time.monotonic() + max(0.0, float(timeout_s))


def _left(deadline):
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _tcp_transport_class():
    from adb_shell.exceptions import TcpTimeoutException
    from adb_shell.transport.tcp_transport import TcpTransport

    class EofTcpTransport(TcpTransport):
        """TcpTransport that reports a closed socket instead of returning b'' forever, and says when
        the TCP connection itself could not be made."""

        def connect(self, transport_timeout_s):
            try:
                super().connect(transport_timeout_s)
            except OSError as exc:  # refused, timed out, no route, unknown host
                raise Unreachable(_reason(exc) if str(exc) else type(exc).__name__) from None

        def bulk_read(self, numbytes, transport_timeout_s):
            sock = self._connection
            if sock is None:
                raise ConnectionResetError("not connected")
            deadline = _deadline(transport_timeout_s)
            while True:
                readable, _, _ = select.select([sock], [], [], _left(deadline))
                if not readable:
                    raise TcpTimeoutException(f"reading from {self._host}:{self._port} timed out "
                                              f"({transport_timeout_s} seconds)")
                try:
                    data = sock.recv(numbytes)
                    break
                except (BlockingIOError, InterruptedError):  # readiness that went away: wait again
                    continue
            if numbytes and not data:
                raise ConnectionResetError("the phone closed the connection")
            return data

        def bulk_write(self, data, transport_timeout_s):
            """Send all of `data` (a message header or payload) or raise: never a short write."""
            sock = self._connection
            if sock is None:
                raise ConnectionResetError("not connected")
            view = memoryview(data).cast("B")
            deadline = _deadline(transport_timeout_s)
            while view:
                _, writable, _ = select.select([], [sock], [], _left(deadline))
                if not writable:
                    raise TcpTimeoutException(f"sending to {self._host}:{self._port} timed out after "
                                              f"{transport_timeout_s} seconds with {len(view)} of {len(data)} "
                                              f"bytes unsent")
                try:
                    n = sock.send(view)
                except (BlockingIOError, InterruptedError):
                    continue
                view = view[n:]
            return len(data)

    return EofTcpTransport


def usb_available() -> tuple[bool, str]:
    """(True, "") when adb-shell's USB transport (libusb1 + a libusb library) can be used."""
    try:
        from adb_shell.transport.usb_transport import UsbTransport  # noqa: F401  (opens a libusb context)
    except Exception as exc:  # ImportError, OSError (no libusb-1.0.so), usb1 errors
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def list_usb_serials() -> list[str]:
    """Serial numbers of the ADB interfaces on USB; [] when there is no USB or no libusb."""
    ok, _ = usb_available()
    if not ok:
        return []
    try:
        from adb_shell.transport.usb_transport import UsbTransport

        serials = []
        for dev in UsbTransport.find_all_adb_devices():
            try:
                serials.append(dev.serial_number)
            except Exception:
                serials.append(dev.usb_info or "?")
        return serials
    except Exception as exc:
        log.debug("USB listing failed: %s", exc)
        return []


# -- connection ------------------------------------------------------------------------------------


class AdbConnection:
    """One adb-shell connection to one phone; reconnects lazily after it was lost."""

    def __init__(self, uri: str, *, host: str | None = None, port: int | None = None, serial: str | None = None,
                 auth_timeout_s: float = DEFAULT_AUTH_TIMEOUT_S, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 key: str | os.PathLike | None = None):
        if (host is None) == (serial is None):
            raise ValueError("give either host/port or serial")
        self.uri = uri
        self.host, self.port, self.serial = host, port, serial
        self.auth_timeout_s = float(auth_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.key = Path(key) if key is not None else None
        self._dev = None
        self._prompted = False
        self._lock = threading.RLock()
        self.commands = 0  # shell commands sent (for benchmarks and tests)
        self.pushes = 0

    # ------------------------------------------------------------------ connect

    @property
    def connected(self) -> bool:
        return self._dev is not None

    def connect(self):
        with self._lock:
            if self._dev is None:
                self._dev = self._open()
            return self._dev

    def _open(self):
        from adb_shell import exceptions as adb_exc
        from adb_shell.adb_device import AdbDevice as ShellDevice

        signers = load_signers(self.key)
        shown_key = _display(self.key or key_path())
        prompt = USB_PROMPT if self.serial is not None else TCP_PROMPT
        if self.serial is not None:
            dev = self._open_usb(ShellDevice)
        else:
            dev = ShellDevice(_tcp_transport_class()(self.host, self.port),
                              default_transport_timeout_s=self.connect_timeout_s)

        prompted = []

        def on_prompt(_dev) -> None:
            prompted.append(True)
            if not self._prompted:
                self._prompted = True
                print(AUTH_PROMPT.format(prompt=prompt, key=shown_key), file=sys.stderr, flush=True)

        try:
            dev.connect(rsa_keys=signers, transport_timeout_s=self.connect_timeout_s,
                        auth_timeout_s=self.auth_timeout_s, read_timeout_s=self.connect_timeout_s,
                        auth_callback=on_prompt)
        except Unreachable as exc:
            _close_quietly(dev)
            raise AmcError(f"cannot reach {self.uri}: {exc}; check the address and that the phone listens "
                           f"(`adb tcpip 5555` over USB first, or wireless debugging)") from None
        except (adb_exc.TcpTimeoutException, adb_exc.AdbTimeoutError, socket.timeout, TimeoutError,
                adb_exc.UsbReadFailedError, ConnectionError, OSError, adb_exc.InvalidResponseError,
                adb_exc.DeviceAuthError, adb_exc.InvalidCommandError, adb_exc.InvalidChecksumError) as exc:
            _close_quietly(dev)
            if prompted:
                if isinstance(exc, (ConnectionError, adb_exc.InvalidResponseError)) or (
                        isinstance(exc, OSError) and not isinstance(exc, (socket.timeout, TimeoutError))):
                    raise AmcError(f"{self.uri} refused the key {shown_key}: accept the {prompt} "
                                   f"(tick 'Always allow'), or use 'Revoke USB debugging authorizations' in "
                                   f"Developer options and retry") from None
                raise AmcError(f"{self.uri} did not accept the key {shown_key} within {self.auth_timeout_s:.0f}s: "
                               f"accept the {prompt} and retry (auth_timeout_s= in the "
                               f"device URI waits longer)") from None
            raise AmcError(f"cannot connect to {self.uri}: {_reason(exc)}") from None
        except Exception as exc:  # libusb errors (usb1.USBError...) are not OSErrors
            _close_quietly(dev)
            hint = (" (is an adb server holding the phone on another port? set ANDROID_ADB_SERVER_PORT to it and "
                    "amc-mobile goes through that server)" if self.serial is not None else "")
            raise AmcError(f"cannot connect to {self.uri}: {type(exc).__name__}: {_reason(exc)}{hint}") from None
        log.info("connected to %s", self.uri)
        return dev

    def _open_usb(self, shell_device_cls):
        ok, why = usb_available()
        if not ok:
            raise AmcError(f"USB is not usable here ({why}): install libusb-1.0 (apt-get install libusb-1.0-0) "
                           f"or connect over TCP (adb tcpip 5555; then adb-tcp:PHONE_IP:5555)")
        from adb_shell import exceptions as adb_exc
        from adb_shell.transport.usb_transport import UsbTransport

        try:
            transport = UsbTransport.find_adb(self.serial or None, None, self.connect_timeout_s)
        except adb_exc.UsbDeviceNotFoundError:
            found = list_usb_serials()
            raise AmcError(f"no phone with serial {self.serial!r} on USB (found: {', '.join(found) or 'none'}); "
                           f"`amc-mobile devices` lists them") from None
        except Exception as exc:
            raise AmcError(f"cannot open USB phone {self.serial!r}: {_reason(exc)}") from None
        dev = shell_device_cls(transport, default_transport_timeout_s=self.connect_timeout_s)
        return dev

    def close(self) -> None:
        with self._lock:
            dev, self._dev = self._dev, None
        if dev is not None:
            _close_quietly(dev)

    # ------------------------------------------------------------------ commands

    def run(self, command: str, timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S, what: str | None = None,
            check: bool = False) -> tuple[str, int]:
        """Run `command` in the phone's shell: (output with stderr merged, exit status).

        A transport failure closes the connection and raises `AdbConnectionLost`.
        """
        wrapped = f"{{ {command}\n}}; printf '\\n{RC_MARKER}%s\\n' \"$?\""
        raw = self._call(lambda dev: dev.shell(wrapped, transport_timeout_s=timeout_s, read_timeout_s=timeout_s,
                                               timeout_s=timeout_s, decode=False),
                         what or _short(command))
        self.commands += 1
        text = raw.decode("utf-8", "replace")
        head, sep, tail = text.rpartition("\n" + RC_MARKER)
        if not sep:
            self.close()
            raise AdbConnectionLost(f"connection to {self.uri} lost during {what or _short(command)}: the command's "
                                    f"output was cut short; reconnect and rerun the command (a table build resumes where it "
                                    f"stopped; a search with --resume RUN_DIR)")
        try:
            rc = int(tail.strip().splitlines()[0])
        except (ValueError, IndexError):
            rc = 255
        if check and rc != 0:
            raise AmcError(f"{what or _short(command)} failed on {self.uri} (exit {rc}): {_short(head, 300)}")
        return head, rc

    def push(self, local: str | os.PathLike, remote: str, mode: int = 0o644, timeout_s: float | None = None,
             what: str | None = None) -> None:
        size = os.path.getsize(local)
        if timeout_s is None:
            timeout_s = DEFAULT_COMMAND_TIMEOUT_S + size / 2e6  # >= 2 MB/s
        self._call(lambda dev: dev.push(str(local), remote, st_mode=stat.S_IFREG | mode,
                                        transport_timeout_s=timeout_s, read_timeout_s=timeout_s),
                   what or f"push of {os.path.basename(local)}")
        self.pushes += 1

    def _call(self, fn, what: str):
        from adb_shell import exceptions as adb_exc

        with self._lock:
            dev = self.connect()
            try:
                return fn(dev)
            except AmcError:
                raise
            except (adb_exc.PushFailedError, adb_exc.AdbCommandFailureException) as exc:
                self.close()
                raise AmcError(f"{what} failed on {self.uri}: {_reason(exc)}") from None
            except (OSError, EOFError, adb_exc.TcpTimeoutException, adb_exc.AdbTimeoutError,
                    adb_exc.InvalidResponseError, adb_exc.InvalidCommandError, adb_exc.InvalidChecksumError,
                    adb_exc.UsbReadFailedError, adb_exc.UsbWriteFailedError, adb_exc.AdbConnectionError,
                    struct_error()) as exc:
                self.close()
                raise AdbConnectionLost(f"connection to {self.uri} lost during {what} ({_reason(exc)}): reconnect "
                                        f"and rerun the command (a table build resumes where it stopped, keeping "
                                        f"everything measured; a search with --resume RUN_DIR)") from None


def struct_error():
    import struct

    return struct.error


def _close_quietly(dev) -> None:
    try:
        dev.close()
    except Exception:
        pass


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _short(s: str, n: int = 80) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."
