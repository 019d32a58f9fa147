"""The on-disk row schemas: one measured unit (`TableRow`) and one measured whole model (`CalibrationRow`).

Rows are plain CSV lines with a fixed header, written one whole line at a time (see `store.py`).
No field may contain a comma, a quote or a newline, so a line splits on "," without a CSV dialect
and a person can read, grep and diff the files. Units are in the column names (`median_ms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from device.errors import AmcError
from device.files import read_text
from device.stats import LatencyStats

from .units import UNIT_KINDS, UnitSpec

TABLE_FORMAT = "amc-mobile-latency-table/1"

UNIT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(UnitSpec))
STAT_FIELDS: tuple[str, ...] = ("median_ms", "mean_ms", "std_ms", "p10_ms", "p90_ms", "n")
UNIT_COLUMNS: tuple[str, ...] = ("key", *UNIT_FIELDS, *STAT_FIELDS, "measured_at")
CALIBRATION_COLUMNS: tuple[str, ...] = ("model_hash", "model", "variant", "channels", *STAT_FIELDS, "measured_at")
FAILURE_COLUMNS: tuple[str, ...] = ("key", "error", "measured_at")
ORIGIN_COLUMNS: tuple[str, ...] = ("key", "device", "measured_at")  # which device measured each unit row


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def clean_field(text: str) -> str:
    """Make free text (an error message, a model label) safe for a comma-split line."""
    return " ".join(str(text).replace(",", ";").replace('"', "'").split())[:300]


@dataclass(frozen=True)
class Stats:
    """The summary of one measurement that a table keeps (raw samples stay with the device's output)."""

    median_ms: float
    mean_ms: float
    std_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    measured_at: str

    @classmethod
    def of(cls, s: LatencyStats, measured_at: str | None = None) -> "Stats":
        if not s.ok:
            raise ValueError(f"{s.name} was not measured: {s.error}")
        return cls(s.median_ms, s.mean_ms, s.std_ms, s.p10_ms, s.p90_ms, int(s.n), measured_at or now_iso())

    def values(self) -> list[str]:
        return [_fmt(self.median_ms), _fmt(self.mean_ms), _fmt(self.std_ms), _fmt(self.p10_ms), _fmt(self.p90_ms),
                str(int(self.n))]


def _fmt(x: float) -> str:
    return f"{float(x):.6g}"


@dataclass(frozen=True)
class TableRow:
    """One measured fused unit."""

    spec: UnitSpec
    stats: Stats

    @property
    def key(self) -> str:
        return self.spec.key()

    @property
    def median_ms(self) -> float:
        return self.stats.median_ms

    def to_line(self) -> str:
        s = self.spec
        unit = [str(getattr(s, f)) for f in UNIT_FIELDS]
        return ",".join([s.key(), *unit, *self.stats.values(), self.stats.measured_at]) + "\n"


@dataclass(frozen=True)
class CalibrationRow:
    """One whole model measured end to end, to fit the overhead term of a prediction."""

    model_hash: str
    model: str
    variant: str
    channels: dict[int, int]  # kept channels per pruned group; groups not listed are full
    stats: Stats

    def with_median(self, median_ms: float) -> "CalibrationRow":
        """The same model with its median replaced (a re-anchored value: ratio x the reference's level)."""
        return replace(self, stats=replace(self.stats, median_ms=float(median_ms)))

    def to_line(self) -> str:
        return ",".join([self.model_hash, clean_field(self.model), clean_field(self.variant),
                         encode_channels(self.channels), *self.stats.values(), self.stats.measured_at]) + "\n"


@dataclass(frozen=True)
class FailureRow:
    """A unit that could not be measured (does not lower, crashes the runner): skipped on resume."""

    key: str
    error: str
    measured_at: str

    def to_line(self) -> str:
        return ",".join([self.key, clean_field(self.error), self.measured_at]) + "\n"


def encode_channels(channels: dict[int, int]) -> str:
    """{3: 64, 5: 96} -> "3=64;5=96" (sorted by group; "" for the unpruned model)."""
    return ";".join(f"{int(g)}={int(c)}" for g, c in sorted(channels.items()))


def decode_channels(text: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for item in filter(None, text.split(";")):
        g, eq, c = item.partition("=")
        if not eq:
            raise ValueError(f"channel item {item!r} is not GROUP=COUNT")
        out[int(g)] = int(c)
    return out


# ------------------------------------------------------------------------------------------ parsing


def _fix_hint(path: Path, line_no: int) -> str:
    return (f"delete that line (e.g. `sed -i '{line_no}d' {path}`) and rerun `amc-mobile table build` "
            f"to measure it again")


def _bad(path: Path, line_no: int, what: str) -> AmcError:
    return AmcError(f"{path} line {line_no}: {what}; {_fix_hint(path, line_no)}")


def _split(path: Path, line_no: int, line: str, columns: tuple[str, ...], last: bool, complete: bool) -> list[str]:
    parts = line.split(",")
    if len(parts) != len(columns):
        truncated = last and not complete and len(parts) < len(columns)
        what = "truncated row" if truncated else "malformed row"
        raise _bad(path, line_no, f"{what} ({len(parts)} of {len(columns)} fields)")
    return parts


def _float(path: Path, line_no: int, name: str, text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise _bad(path, line_no, f"{name} {text!r} is not a number") from None
    if math.isnan(x) or x < 0:
        raise _bad(path, line_no, f"{name} {text!r} is not a non-negative number")
    return x


def _int(path: Path, line_no: int, name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad(path, line_no, f"{name} {text!r} is not an integer") from None


def _stats(path: Path, line_no: int, rec: dict[str, str]) -> Stats:
    vals = [_float(path, line_no, f, rec[f]) for f in STAT_FIELDS[:-1]]
    n = _int(path, line_no, "n", rec["n"])
    if n < 1:
        raise _bad(path, line_no, f"n={n}: a stored row must hold at least one sample")
    if not rec["measured_at"]:
        raise _bad(path, line_no, "measured_at is empty")
    return Stats(*vals, n, rec["measured_at"])


def _lines(path: Path, columns: tuple[str, ...]):
    """(line_no, fields-dict, is_last, file_complete) for each data line; the header is checked."""
    text = read_text(path, "restore it from a backup or delete it and rebuild the table")
    complete = text.endswith("\n") or not text
    lines = text.split("\n")
    if complete:
        lines = lines[:-1]
    if not lines or lines[0].strip() == "":
        raise AmcError(f"{path} line 1: the header is missing; expected {','.join(columns)} "
                       f"(restore the file, or delete it to rebuild)")
    header = lines[0].rstrip("\r").split(",")
    if tuple(header) != columns:
        raise AmcError(f"{path} line 1: unexpected header {lines[0][:120]!r}; expected {','.join(columns)} "
                       f"(was it written by another amc-mobile version? rebuild the table into a new folder)")
    for i, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip("\r")
        last = i == len(lines)
        if not line.strip():
            if last:
                continue
            raise _bad(path, i, "empty line")
        parts = _split(path, i, line, columns, last, complete)
        yield i, dict(zip(columns, parts)), last, complete


def read_unit_rows(path: Path) -> tuple[dict[str, TableRow], int]:
    """All rows of a units CSV keyed by unit key (first occurrence wins), and the number of duplicates."""
    rows: dict[str, TableRow] = {}
    duplicates = 0
    for line_no, rec, _, _ in _lines(path, UNIT_COLUMNS):
        if rec["kind"] not in UNIT_KINDS:
            raise _bad(path, line_no, f"unknown unit kind {rec['kind']!r} (expected one of {', '.join(UNIT_KINDS)})")
        spec_fields = {f: rec[f] for f in UNIT_FIELDS}
        for f in UNIT_FIELDS:
            if f not in ("kind", "act", "dtype"):
                spec_fields[f] = _int(path, line_no, f, rec[f])
        try:
            spec = UnitSpec(**spec_fields)
        except AmcError as exc:
            raise _bad(path, line_no, str(exc)) from None
        if spec.key() != rec["key"]:
            raise _bad(path, line_no, f"key {rec['key']!r} does not match its fields ({spec.key()})")
        row = TableRow(spec, _stats(path, line_no, rec))
        if row.key in rows:
            duplicates += 1
            continue
        rows[row.key] = row
    return rows, duplicates


def read_calibration_rows(path: Path) -> list[CalibrationRow]:
    out = []
    for line_no, rec, _, _ in _lines(path, CALIBRATION_COLUMNS):
        try:
            channels = decode_channels(rec["channels"])
        except ValueError as exc:
            raise _bad(path, line_no, f"channels {rec['channels']!r}: {exc}") from None
        out.append(CalibrationRow(rec["model_hash"], rec["model"], rec["variant"], channels,
                                  _stats(path, line_no, rec)))
    return out


def read_failure_rows(path: Path) -> dict[str, FailureRow]:
    out: dict[str, FailureRow] = {}
    for _, rec, _, _ in _lines(path, FAILURE_COLUMNS):
        out[rec["key"]] = FailureRow(rec["key"], rec["error"], rec["measured_at"])
    return out


def read_origin_rows(path: Path) -> dict[str, str]:
    """unit key -> URI of the device that measured it (first occurrence wins, as for units.csv)."""
    out: dict[str, str] = {}
    for _, rec, _, _ in _lines(path, ORIGIN_COLUMNS):
        out.setdefault(rec["key"], rec["device"])
    return out
