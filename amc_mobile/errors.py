"""`AmcError` lives in the bottom layer (`device.errors`), so that every package can raise it."""

from device.errors import AmcError

__all__ = ["AmcError"]
