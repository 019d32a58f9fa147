"""Device URIs: `local`, `cuda:N`, `adb:SERIAL`, `adb-tcp:HOST:PORT`, `adb-server:HOST:PORT/SERIAL` -> Devices."""

from __future__ import annotations

import importlib
from typing import Callable

from .errors import AmcError

from .base import Device

# scheme -> "module:factory". Factories take the part after the first ':' ("" for none).
# Imported lazily so that `local` never pays for adb or CUDA imports.
_SCHEMES: dict[str, str] = {
    "local": "device.local:LocalDevice.from_uri_rest",
    "cuda": "device.cuda:CudaDevice.from_uri_rest",
    "adb": "device.adb:AdbDevice.from_usb_serial",
    "adb-tcp": "device.adb:AdbDevice.from_tcp_address",
    "adb-server": "device.adb:AdbDevice.from_server_address",
}

# Discovery functions used by `amc-mobile devices`: each returns [(uri, description)].
_DISCOVERY: list[str] = [
    "device.local:discover",
    "device.cuda:discover",
    "device.adb:discover",
]


def _resolve(target: str) -> Callable:
    mod_name, attr = target.split(":")
    obj = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def known_schemes() -> list[str]:
    return sorted(_SCHEMES)


def open_device(uri: str) -> Device:
    """Open the device named by `uri`; an unknown or malformed URI is an AmcError."""
    scheme, _, rest = uri.partition(":")
    if scheme not in _SCHEMES:
        raise AmcError(
            f"unknown device URI {uri!r}: expected one of local, cuda:N, adb:SERIAL, adb-tcp:HOST:PORT, "
            f"adb-server:HOST:PORT/SERIAL"
        )
    try:
        factory = _resolve(_SCHEMES[scheme])
    except (ImportError, AttributeError) as exc:
        raise AmcError(f"device {uri!r} is not available in this installation: {exc}") from exc
    return factory(rest)


def discover() -> list[tuple[str, str]]:
    """Every reachable device as (uri, description); a failing probe adds a line saying why."""
    found: list[tuple[str, str]] = []
    for target in _DISCOVERY:
        try:
            found.extend(_resolve(target)())
        except (ImportError, AttributeError):
            continue
        except AmcError:
            raise  # the user's own configuration is wrong (e.g. a malformed AMC_ADB_TCP): say so, exit non-zero
        except Exception as exc:  # a probe must never hide the other devices
            found.append((target.split(":")[0].split(".")[-1], f"probe failed: {exc}"))
    return found
