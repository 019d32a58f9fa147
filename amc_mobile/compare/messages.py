"""How a comparison words what went wrong: one line per failure, in the cell or on stderr."""

from __future__ import annotations

import sys
from typing import Callable

from amc_mobile.errors import AmcError

Log = Callable[[str], None]


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    if not isinstance(exc, AmcError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
