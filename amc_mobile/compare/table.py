"""The comparison's result as a tidy table (one row per model x device; compare.csv's columns), the
console table and the headline sentences."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from amc_mobile.formatting import si

from .load import ModelEntry
from .measure import Cell, DeviceResult


# Column order of compare.csv (tidy: one row per model x device).
COLUMNS = [
    "model", "role", "source", "device", "status", "error",
    "median_ms", "p90_ms", "p10_ms", "mean_ms", "std_ms", "n", "load_ms", "speedup",
    "size_mb", "precision", "params", "macs", "macs_ratio", "top1", "accuracy_note",
    "hardware", "runtime", "backend", "threads", "fingerprint",
]


@dataclass
class CompareResult:
    models: list[ModelEntry]
    devices: list[DeviceResult]
    config: object  # device.MeasureConfig
    run_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def original(self) -> ModelEntry:
        return self.models[0]

    def cell(self, model: str, device: str) -> Cell:
        for d in self.devices:
            if d.uri == device:
                for c in d.cells:
                    if c.model == model:
                        return c
        raise KeyError((model, device))

    @property
    def exit_code(self) -> int:
        cells = [c for d in self.devices for c in d.cells]
        return 0 if all(c.ok for c in cells) else 1

    def rows(self) -> list[dict]:
        nan = float("nan")
        orig = self.original
        rows = []
        for d in self.devices:
            base = next((c for c in d.cells if c.model == orig.label), None)
            base_ms = base.stats.median_ms if base is not None and base.ok else nan
            fp = d.fingerprint
            for i, m in enumerate(self.models):
                c = next(c for c in d.cells if c.model == m.label)
                s = c.stats if c.ok else None
                med = s.median_ms if s is not None else nan
                rows.append({
                    "model": m.label,
                    "role": "original" if i == 0 else "compressed",
                    "source": m.loaded.source,
                    "device": d.uri,
                    "status": c.status,
                    "error": c.error or "",
                    "median_ms": med,
                    "p90_ms": s.p90_ms if s is not None else nan,
                    "p10_ms": s.p10_ms if s is not None else nan,
                    "mean_ms": s.mean_ms if s is not None else nan,
                    "std_ms": s.std_ms if s is not None else nan,
                    "n": s.n if s is not None else 0,
                    "load_ms": (s.load_ms if s is not None and s.load_ms is not None else nan),
                    "speedup": base_ms / med if med > 0 and not math.isnan(base_ms) else nan,
                    "size_mb": _num(m.size_mb),
                    "precision": m.precision,
                    "params": _num(m.params),
                    "macs": _num(m.macs),
                    "macs_ratio": (m.macs / orig.macs if m.macs is not None and orig.macs else nan),
                    "top1": _num(m.top1),
                    "accuracy_note": m.accuracy_note or "",
                    "hardware": fp.hardware if fp else "",
                    "runtime": fp.runtime if fp else "",
                    "backend": fp.backend if fp else "",
                    "threads": fp.threads if fp else "",
                    "fingerprint": fp.digest() if fp else "",
                })
        return rows

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.rows(), columns=COLUMNS)


def _num(x) -> float:
    return float("nan") if x is None else x


# ----------------------------------------------------------------------------- printing


def _f(x, fmt: str, dash: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)) or x == "":
        return dash
    return format(x, fmt)


def format_table(rows: list[dict]) -> str:
    """The console table: one line per model x device; a failed cell shows its reason."""
    mw = max([len(r["model"]) for r in rows] + [5])
    dw = max([len(r["device"]) for r in rows] + [6])
    head = (f"{'model':{mw}s}  {'device':{dw}s}  {'median ms':>9s}  {'p90 ms':>8s}  {'speedup':>7s}  "
            f"{'MACs':>7s}  {'params':>7s}  {'size MB':>7s}  {'precision':>11s}  {'top-1':>6s}")
    out = [head, "-" * len(head)]
    for r in rows:
        left = f"{r['model']:{mw}s}  {r['device']:{dw}s}  "
        if r["status"] != "ok":
            out.append(left + r["error"])
            continue
        sp = r["speedup"]
        out.append(left + f"{_f(r['median_ms'], '.3f'):>9s}  {_f(r['p90_ms'], '.3f'):>8s}  "
                   f"{(_f(sp, '.2f') + 'x') if not math.isnan(sp) else '-':>7s}  {si(r['macs']):>7s}  "
                   f"{si(r['params']):>7s}  {_f(r['size_mb'], '.2f'):>7s}  {r['precision']:>11s}  "
                   f"{(_f(r['top1'] * 100, '.2f') + '%') if not math.isnan(r['top1']) else '-':>6s}")
    return "\n".join(out)


def summary_lines(result: CompareResult) -> list[str]:
    """Headline sentences: `pruned (48% MACs): 2.10x on local, 1.40x on cuda:0`."""
    rows = result.rows()
    lines = []
    for m in result.models[1:]:
        parts = []
        for d in result.devices:
            r = next(r for r in rows if r["model"] == m.label and r["device"] == d.uri)
            parts.append(f"{r['speedup']:.2f}x on {d.uri}" if not math.isnan(r["speedup"]) else f"n/a on {d.uri}")
        ratio = f" ({m.macs / result.original.macs:.0%} MACs)" if m.macs and result.original.macs else ""
        lines.append(f"{m.label}{ratio} vs {result.original.label}: " + ", ".join(parts))
    return lines
