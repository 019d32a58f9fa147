"""A phone behind an adb server (Google's, local or on another host): the same interface as the
direct `AdbConnection` (`run`, `push`, `close`, `connected`, `commands`, `pushes`), so `AdbDevice`,
`deploy` and the hygiene code work unchanged over either transport.

Every command is one TCP connection to the server (as `adb shell` does): there is no session to
lose between commands, so "lost" means the server or the phone went away during one. After the
phone was reached once, every transport failure is `AdbConnectionLost` (partial results kept by the
caller), and its message says which of the two went away, found out by asking the server.

Which server `adb:SERIAL` uses: `local_server()` (the one `adb` itself would use: $ADB_SERVER_SOCKET,
$ANDROID_ADB_SERVER_PORT, 127.0.0.1:5037) when it answers; the direct USB path when nothing listens
on the default address. A server named by a variable that does not answer is an error, not a
silent fall-back.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from device.errors import AmcError

from . import host_protocol as hp
from .connection import (AUTH_PROMPT, USB_PROMPT, DEFAULT_AUTH_TIMEOUT_S, DEFAULT_COMMAND_TIMEOUT_S, DEFAULT_CONNECT_TIMEOUT_S,
                         RC_MARKER, AdbConnectionLost)

log = logging.getLogger("device.adb")

ENV_SERVERS = "AMC_ADB_SERVERS"  # more servers for `amc-mobile devices`: HOST:PORT,HOST:PORT
_WAIT_STATES = ("authorizing", "connecting")


def start_hint(address: hp.ServerAddress) -> str:
    if address.host in ("127.0.0.1", "localhost", "::1"):
        return (f"start it (`adb -P {address.port} start-server`), or tunnel to a remote one "
                f"(`ssh -N -L {address.port}:localhost:5037 HOST`)")
    return (f"start it on that host (`adb -a -P {address.port} nodaemon server`) and check that port "
            f"{address.port} is open to this machine, or tunnel (`ssh -N -L 5038:localhost:5037 {address.host}`, "
            f"then adb-server:localhost:5038/SERIAL)")


def unreachable_error(address: hp.ServerAddress, why: str) -> AmcError:
    var = "" if address.source in ("default", "URI") else f" (from {address.source})"
    return AmcError(f"cannot reach the adb server at {address}{var}: {why}; {start_hint(address)}")


def local_server(timeout_s: float = 1.0) -> hp.ServerAddress | None:
    """The local adb server when one answers; None when nothing listens at the default address."""
    address = hp.configured_server()
    try:
        hp.server_version(address, timeout_s)
    except hp.ServerUnreachable as exc:
        if address.is_default:
            return None
        raise unreachable_error(address, str(exc)) from None
    except (hp.StreamCut, hp.ServerFailed, ValueError) as exc:
        if address.is_default:
            log.info("something listens on %s but is not an adb server (%s): using USB directly", address, exc)
            return None
        raise AmcError(f"{address} (from {address.source}) is not an adb server ({exc}): fix or unset "
                       f"{address.source}") from None
    return address


def state_error(uri: str, address: hp.ServerAddress, entry: hp.DeviceEntry) -> AmcError:
    """What to do about a phone the server lists in a state other than `device`."""
    return AmcError(f"{uri}: the adb server at {address} has the phone {state_advice(entry.state)}")


def state_advice(state: str) -> str:
    if state == "unauthorized":
        return ("unauthorized: accept the 'Allow debugging?' prompt on the phone (tick 'Always allow'); no prompt? "
                "revoke debugging authorisations in Developer options, then replug or `adb reconnect`")
    if state == "offline":
        return ("offline: unplug and replug it (or `adb reconnect offline` on the server's host); if it stays "
                "offline, restart that server (`adb kill-server`, then `adb start-server`)")
    if state.startswith("no permissions"):
        return ("without permission to open its USB device: install udev rules for Android phones (Debian: "
                "apt-get install android-sdk-platform-tools-common), add the user to plugdev, replug")
    if state in _WAIT_STATES:
        return f"{state}: wait a few seconds and retry"
    return f"in state {state!r} (not a booted phone with debugging on): boot it normally and retry"


class ServerConnection:
    """One phone (`serial`) behind the adb server at `address`."""

    def __init__(self, uri: str, address: hp.ServerAddress, serial: str, *,
                 auth_timeout_s: float = DEFAULT_AUTH_TIMEOUT_S, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S):
        self.uri = uri
        self.address = address
        self.serial = serial
        self.auth_timeout_s = float(auth_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self._ready = False
        self._reached = False  # the phone answered once: later failures are losses, not set-up errors
        self._shell_v2 = True
        self._prompted = False
        self._lock = threading.RLock()
        self.commands = 0
        self.pushes = 0

    @property
    def connected(self) -> bool:
        return self._ready

    def connect(self) -> None:
        """Check the server has the phone, online (waiting for an authorisation prompt as the direct
        path does), and whether it speaks shell v2."""
        with self._lock:
            if self._ready:
                return
            deadline = time.monotonic() + self.auth_timeout_s
            while True:
                entry = self._entry()
                if entry.state == "device":
                    break
                waiting = entry.state in _WAIT_STATES or entry.state == "unauthorized"
                if not waiting or time.monotonic() >= deadline:
                    raise self._lost_or(state_error(self.uri, self.address, entry))
                if entry.state == "unauthorized" and not self._prompted:
                    self._prompted = True
                    print(AUTH_PROMPT.format(prompt=USB_PROMPT, key=f"of the adb server at {self.address}"), file=sys.stderr,
                          flush=True)
                time.sleep(0.25)
            try:
                self._shell_v2 = "shell_v2" in hp.device_features(self.address, self.serial, self.connect_timeout_s)
            except (hp.ServerUnreachable, hp.ServerFailed, hp.StreamCut) as exc:
                raise self._lost_or(AmcError(f"{self.uri}: the adb server at {self.address} did not give the "
                                             f"phone's features ({exc}); retry")) from None
            self._ready = self._reached = True
            log.info("%s: through the adb server at %s (shell %s)", self.uri, self.address,
                     "v2" if self._shell_v2 else "v1")

    def _entry(self) -> hp.DeviceEntry:
        try:
            entries = hp.list_devices(self.address, self.connect_timeout_s)
        except hp.ServerUnreachable as exc:
            raise self._lost_or(unreachable_error(self.address, str(exc))) from None
        except (hp.ServerFailed, hp.StreamCut) as exc:
            raise self._lost_or(AmcError(f"the adb server at {self.address} did not list its phones ({exc}): "
                                         f"restart it (`adb kill-server`; `adb start-server`)")) from None
        for entry in entries:
            if entry.serial == self.serial:
                return entry
        listed = ", ".join(f"{e.serial} ({e.state})" for e in entries) or "none"
        raise self._lost_or(AmcError(
            f"no phone {self.serial!r} on the adb server at {self.address} (it has: {listed}): plug it in with USB "
            f"debugging on, or `adb connect HOST:PORT` for a phone on the network; `amc-mobile devices` lists them"))

    def _lost_or(self, error: AmcError) -> AmcError:
        """`error` as it is before the phone was ever reached; after that, a lost connection."""
        if not self._reached:
            return error
        why = str(error).removeprefix(f"{self.uri}: ")
        return AdbConnectionLost(f"connection to {self.uri} lost: {why}; everything measured before is kept, "
                                 f"rerun to go on")

    def close(self) -> None:
        self._ready = False

    # ------------------------------------------------------------------ commands

    def run(self, command: str, timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S, what: str | None = None,
            check: bool = False) -> tuple[str, int]:
        what = what or _short(command)
        with self._lock:
            self.connect()
            try:
                if self._shell_v2:
                    raw, rc = hp.shell_v2(self.address, self.serial, command, timeout_s, self.connect_timeout_s)
                    text = raw.decode("utf-8", "replace")
                else:  # v1 has no exit status and no end mark of its own
                    wrapped = f"{{ {command}\n}}; printf '\\n{RC_MARKER}%s\\n' \"$?\""
                    text = hp.shell_v1(self.address, self.serial, wrapped, timeout_s,
                                       self.connect_timeout_s).decode("utf-8", "replace")
                    text, sep, tail = text.rpartition("\n" + RC_MARKER)
                    if not sep:
                        raise hp.StreamCut("the output was cut short")
                    try:
                        rc = int(tail.strip().splitlines()[0])
                    except (ValueError, IndexError):
                        rc = 255
            except (hp.ServerUnreachable, hp.StreamCut, hp.ServerFailed) as exc:
                raise self._lost(what, exc) from None
            self.commands += 1
        if check and rc != 0:
            raise AmcError(f"{what} failed on {self.uri} (exit {rc}): {_short(text, 300)}")
        return text, rc

    def push(self, local: str | os.PathLike, remote: str, mode: int = 0o644, timeout_s: float | None = None,
             what: str | None = None) -> None:
        what = what or f"push of {os.path.basename(local)}"
        if timeout_s is None:
            timeout_s = DEFAULT_COMMAND_TIMEOUT_S + os.path.getsize(local) / 2e6  # >= 2 MB/s
        with self._lock:
            self.connect()
            try:
                hp.sync_push(self.address, self.serial, local, remote, mode, timeout_s, self.connect_timeout_s)
            except hp.ServerFailed as exc:
                if self._phone_gone():
                    raise self._lost(what, exc) from None
                raise AmcError(f"{what} failed on {self.uri}: {exc} (phone storage full, or {remote} not "
                               f"writable?)") from None
            except (hp.ServerUnreachable, hp.StreamCut) as exc:
                raise self._lost(what, exc) from None
            self.pushes += 1

    def _phone_gone(self) -> bool:
        try:
            return not any(e.serial == self.serial and e.state == "device"
                           for e in hp.list_devices(self.address, 3.0))
        except (hp.ServerUnreachable, hp.ServerFailed, hp.StreamCut):
            return True

    def _lost(self, what: str, exc: Exception) -> AdbConnectionLost:
        """Which went away, the server or the phone: asked of the server (one quick query)."""
        self._ready = False
        self._reached = True
        try:
            entries = hp.list_devices(self.address, 3.0)
        except (hp.ServerUnreachable, hp.ServerFailed, hp.StreamCut):
            why = f"the adb server at {self.address} went away ({exc}): {start_hint(self.address)}"
        else:
            entry = next((e for e in entries if e.serial == self.serial), None)
            if entry is None:
                why = (f"the phone left the adb server at {self.address} ({exc}; unplugged?): plug it back in "
                       f"(or `adb connect` it again)")
            elif entry.state != "device":
                why = f"the adb server at {self.address} now has the phone {state_advice(entry.state)}"
            else:
                why = f"the stream to the phone broke ({exc}): check the cable and the phone"
        return AdbConnectionLost(f"connection to {self.uri} lost during {what}: {why}; everything measured before "
                                 f"is kept, rerun to go on")


def _short(s: str, n: int = 80) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."
