"""The syntax of adb device URIs shared by the constructors (`AdbDevice.from_*`) and by discovery's
check of $AMC_ADB_TCP: the `?key=value&...` options and `HOST[:PORT]` addresses."""

from __future__ import annotations

import math
import re
from urllib.parse import parse_qsl

from device.errors import AmcError

_OPTIONS = {"runner", "max_temp_c", "thermal_timeout_s", "thermal_poll_s", "timeout_s", "auth_timeout_s",
            "connect_timeout_s"}


def parse_options(uri: str, query: str) -> dict:
    opts: dict = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _OPTIONS:
            raise AmcError(f"unknown option {key!r} in device URI {uri!r}: known are {', '.join(sorted(_OPTIONS))}")
        if key == "runner":
            opts[key] = value
            continue
        if key == "max_temp_c" and value.lower() in ("", "none", "off", "0"):
            opts[key] = None
            continue
        try:
            opts[key] = float(value)
        except ValueError:
            raise AmcError(f"option {key}={value!r} in device URI {uri!r} must be a number") from None
        if not (math.isfinite(opts[key]) and opts[key] > 0):  # a NaN timeout never fires; a negative one at once
            raise AmcError(f"option {key}={value!r} in device URI {uri!r} must be a positive number")
    return opts


def tcp_address(uri: str, address: str) -> tuple[str, int]:
    """(host, port) of `HOST[:PORT]` or `[IPv6][:PORT]`; `uri` is what the error message shows."""
    m = re.fullmatch(r"\[(?P<h6>[0-9A-Fa-f:.]+)\](?::(?P<p6>\d+))?|(?P<h>[^:\[\]]+)(?::(?P<p>\d+))?", address)
    if not m:
        raise AmcError(f"bad device URI {uri!r}: expected adb-tcp:HOST:PORT (e.g. adb-tcp:192.168.1.20:5555)")
    port = int(m.group("p6") or m.group("p") or 5555)
    if not 0 < port < 65536:
        raise AmcError(f"bad port in device URI {uri!r}: expected 1..65535")
    return m.group("h6") or m.group("h"), port
