"""Numbers as the reports and the terminal tables print them."""

from __future__ import annotations

import math


def si(x) -> str:
    """1234567 -> "1.23M"; "-" for a missing value (None, NaN, not a number)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(x):
        return "-"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suf}"
    return f"{x:.0f}"
