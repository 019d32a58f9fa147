"""`amc-mobile devices`: the phones of every configured adb server, with model, SoC and state.

Servers: the local one (`host_protocol.configured_server()`) when it answers, plus each `HOST:PORT`
in $AMC_ADB_SERVERS (comma or space separated), e.g. the lab hosts of docs in README "Phones on
other hosts". Phones of the local server are `adb:SERIAL`, the others `adb-server:HOST:PORT/SERIAL`.
A phone that is not usable is listed with its state and what to do; a configured server that does
not answer is one line saying so.
"""

from __future__ import annotations

import logging
import os
import re

from device.errors import AmcError

from . import host_protocol as hp
from .adb_device import AdbDevice
from .server_connection import ENV_SERVERS, local_server, start_hint, state_advice

log = logging.getLogger("device.adb")


def configured_servers() -> tuple[list[hp.ServerAddress], list[tuple[str, str]]]:
    """(servers that answer, lines for those that do not or are misconfigured)."""
    servers: list[hp.ServerAddress] = []
    problems: list[tuple[str, str]] = []
    try:
        local = local_server()
        if local is not None:
            servers.append(local)
    except AmcError as exc:
        problems.append(("adb-server", str(exc)))
    for entry in re.split(r"[,\s]+", os.environ.get(ENV_SERVERS, "").strip()):
        if not entry:
            continue
        try:
            host, port = hp.parse_host_port(entry, f"{ENV_SERVERS}={os.environ[ENV_SERVERS]}")
        except AmcError as exc:
            problems.append((f"adb-server:{entry}", str(exc)))
            continue
        address = hp.ServerAddress(host, port, "URI")
        if any((s.host, s.port) == (host, port) for s in servers):
            continue
        try:
            hp.server_version(address, 2.0)
        except (hp.ServerUnreachable, hp.StreamCut, hp.ServerFailed, ValueError) as exc:
            problems.append((f"adb-server:{address}", f"adb server from {ENV_SERVERS} not reachable ({exc}): "
                                                      f"{start_hint(address)}"))
            continue
        servers.append(address)
    return servers, problems


def discover_server_phones() -> list[tuple[str, str]]:
    servers, found = configured_servers()
    for address in servers:
        try:
            entries = hp.list_devices(address, 5.0)
        except (hp.ServerUnreachable, hp.StreamCut, hp.ServerFailed) as exc:
            found.append((f"adb-server:{address}", f"adb server did not list its phones: {exc}"))
            continue
        via = f"via the adb server at {address}"
        for entry in entries:
            uri = f"adb:{entry.serial}" if address.source != "URI" else f"adb-server:{address}/{entry.serial}"
            if entry.state != "device":
                model = f"{entry.model}, " if entry.model else ""
                found.append((uri, f"{model}{state_advice(entry.state)} ({via})"))
                continue
            dev = AdbDevice(serial=entry.serial, server=address, auth_timeout_s=0, connect_timeout_s=5)
            try:
                info = dev.phone_info()
                found.append((uri, f"{info.hardware}, Android {info.android_version}, {info.abi}, "
                                   f"{len(info.cores)} cores ({via})"))
            except AmcError as exc:
                found.append((uri, f"{entry.model or 'phone'}: cannot read its properties: {exc}"))
            finally:
                dev.close()
    return found
