"""`amc-mobile devices` for phones: those of every configured adb server (`server_discovery`), those
on USB that no server holds, and the `host:port` entries of $AMC_ADB_TCP (never scanned for)."""

from __future__ import annotations

import os
import re

from device.errors import AmcError

from .adb_device import AdbDevice
from .connection import list_usb_serials
from .server_discovery import discover_server_phones
from .uri_options import parse_options, tcp_address

ENV_TCP = "AMC_ADB_TCP"


def tcp_entries() -> list[str]:
    """The entries of $AMC_ADB_TCP (comma or space separated), each checked as the user typed it:
    a malformed one is an AmcError that names the variable and the entry."""
    entries = [e for e in re.split(r"[,\s]+", os.environ.get(ENV_TCP, "").strip()) if e]
    for entry in entries:
        address, _, query = entry.partition("?")
        try:
            tcp_address(entry, address)
        except AmcError:
            raise AmcError(f"bad {ENV_TCP} entry {entry!r}: expected HOST:PORT (port 1..65535), comma-separated, "
                           f"e.g. {ENV_TCP}=192.168.1.20:5555,10.0.0.7:5555") from None
        try:
            parse_options(entry, query)
        except AmcError as exc:
            raise AmcError(f"bad {ENV_TCP} entry: {exc}") from None
    return entries


def discover() -> list[tuple[str, str]]:
    """The phones of every configured adb server (`server_discovery`), phones on USB that no server
    holds (when libusb is usable; never raises) and every `host:port` entry of $AMC_ADB_TCP: those
    that answer with their model, the others with the reason they could not be reached (the user
    named them). USB phones are listed without connecting (connecting may raise the authorisation
    prompt). A malformed $AMC_ADB_TCP entry raises AmcError."""
    entries = tcp_entries()
    found: list[tuple[str, str]] = discover_server_phones()
    served = {uri for uri, _ in found}
    for serial in list_usb_serials():
        if f"adb:{serial}" in served:  # a running server holds it: it is listed through the server
            continue
        found.append((f"adb:{serial}", "Android phone on USB (amc-mobile device-info adb:SERIAL for details)"))
    for entry in entries:
        # Short waits so that a silent address does not hold up the listing; the URI listed is the
        # user's address without these options.
        address, _, query = entry.partition("?")
        dev = AdbDevice.from_tcp_address(f"{address}?auth_timeout_s=5&connect_timeout_s=3" + (f"&{query}" if query else ""))
        try:
            info = dev.phone_info()
            found.append((dev.uri, f"{info.hardware}, Android {info.android_version}, {info.abi}, "
                                   f"{len(info.cores)} cores"))
        except AmcError as exc:
            found.append((dev.uri, str(exc)))  # "cannot reach ...", "did not accept the key ...": why
        finally:
            dev.close()
    return found
