"""The one device a search (or baseline) measures on: opened at its first use, closed when the run ends.

A phone is then connected and deployed to once per run, not once per measurement (the budget, the
table, the measured wall and the final measurement all use the same connection), and a run that never
measures (a FLOPs budget without a final measurement, a predicted latency reference on a URI this host
cannot reach) never opens it.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

from device import Device, open_device


class DeviceSession:
    """`with DeviceSession(cfg.device) as session: ... session.device() ...`. An opened Device passed in
    is used as it is and left open (its opener closes it)."""

    def __init__(self, device: str | Device):
        self._given = device if isinstance(device, Device) else None
        self._opened: Device | None = None
        self.uri = device.uri if isinstance(device, Device) else device

    def device(self) -> Device:
        """The opened device; AmcError when it cannot be opened (tried again at the next use, as a
        phone may come back)."""
        if self._given is not None:
            return self._given
        if self._opened is None:
            self._opened = open_device(self.uri)
        return self._opened

    def close(self) -> None:
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    def __enter__(self) -> "DeviceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_session(uri: str, shared: DeviceSession | None = None) -> ContextManager[DeviceSession]:
    """A run's session: `shared` as it is (its owner closes it), else a new one on `uri`, closed on exit."""
    return contextlib.nullcontext(shared) if shared is not None else DeviceSession(uri)
