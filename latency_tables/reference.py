"""The drift reference of a table build (issue 19): a fixed mid-size unit in every program, its rows.

Every batch of a build is timed in interleaved rounds with REFERENCE_SPEC lowered into its program as
REFERENCE_NAME, so each unit row has the reference's latency in the very rounds the unit was timed.
`references.csv` (next to `units.csv`, one row per unit key, like `origins.csv`) keeps, per unit:

    key, ref_key, median_ms, ref_median_ms, ratio, noise, ci_rel, noisy, measured_at

`ratio` is the median of the per-round ratios unit/reference: what a slow stretch of the device
cancels out of. `noise` is the device's noise while the row was taken: the larger of the reference's
robust spread over those rounds (1.4826 MAD / median) and the drift between five slices of them. `noisy` is 1 when that spread exceeds NOISY_SPREAD or the
runner's adaptive rounds did not reach their CI target before the time cap (the row is kept).

A table built before this (no `references.csv`) still loads; `reference_status` says it is
unreferenced, and its rows keep their raw medians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device.stats import LatencyStats

from .schema import _float, _lines, now_iso
from .units import UnitSpec

# Mid-size on every target we have: ~25 us on the host's 1-thread XNNPACK, long enough to time well,
# short enough to cost a few % of a batch's rounds.
REFERENCE_SPEC = UnitSpec("conv", 16, 16, 32, 32, kernel=3, stride=1, padding=1, act="relu")
REFERENCE_NAME = "drift_ref"
REFERENCES_FILE = "references.csv"
REFERENCE_COLUMNS: tuple[str, ...] = ("key", "ref_key", "median_ms", "ref_median_ms", "ratio", "noise", "ci_rel",
                                      "noisy", "measured_at")
# A reference spread above this marks a row noisy: beyond it one sample says little about the next.
NOISY_SPREAD = 0.10


@dataclass(frozen=True)
class ReferenceRow:
    key: str
    ref_key: str
    median_ms: float
    ref_median_ms: float
    ratio: float
    noise: float
    ci_rel: float  # NaN when the runner was not asked for a CI target
    noisy: bool
    measured_at: str

    @classmethod
    def of(cls, key: str, s: LatencyStats, measured_at: str | None = None) -> "ReferenceRow":
        from device.noise import noise_figure, pass_drift

        noise = noise_figure(s.noise, pass_drift(s.reference_ms))
        ci = float("nan") if s.ci_rel is None else float(s.ci_rel)
        noisy = (not math.isnan(noise) and noise > NOISY_SPREAD) or s.converged is False
        return cls(key, REFERENCE_SPEC.key(), s.median_ms, s.ref_median_ms, s.ratio, noise, ci, noisy,
                   measured_at or now_iso())

    def to_line(self) -> str:
        f = lambda x: "nan" if math.isnan(x) else f"{float(x):.6g}"  # noqa: E731
        return ",".join([self.key, self.ref_key, f(self.median_ms), f(self.ref_median_ms), f(self.ratio),
                         f(self.noise), f(self.ci_rel), "1" if self.noisy else "0", self.measured_at]) + "\n"


def _num(path: Path, line_no: int, name: str, text: str) -> float:
    return float("nan") if text == "nan" else _float(path, line_no, name, text)


def read_reference_rows(path: Path) -> dict[str, ReferenceRow]:
    """unit key -> its reference row (first occurrence wins, as for units.csv)."""
    out: dict[str, ReferenceRow] = {}
    for line_no, rec, _, _ in _lines(path, REFERENCE_COLUMNS):
        if rec["key"] in out:
            continue
        vals = {c: _num(path, line_no, c, rec[c]) for c in ("median_ms", "ref_median_ms", "ratio", "noise", "ci_rel")}
        out[rec["key"]] = ReferenceRow(rec["key"], rec["ref_key"], noisy=rec["noisy"] == "1",
                                       measured_at=rec["measured_at"], **vals)
    return out


@dataclass(frozen=True)
class ReferenceStatus:
    """How much of a table carries drift references, and the device noise they saw."""

    units: int
    referenced: int
    noisy: int
    noise: float  # median reference spread over the referenced rows (NaN when none)
    ref_median_ms: float  # the reference's median level over the build (NaN when none)
    level_spread: float = float("nan")  # how far its level moved between rows: (p90 - p10) / median

    @property
    def figure(self) -> float:
        from device.noise import noise_figure

        return noise_figure(self.noise, self.level_spread)

    @property
    def label(self) -> str:
        if self.units and not self.referenced:
            return "unreferenced (built before drift references: raw medians, not drift-normalised)"
        if self.referenced < self.units:
            return f"partly referenced ({self.referenced} of {self.units} rows)"
        return "referenced"

    def line(self) -> str:
        s = f"drift reference: {self.label}"
        if self.referenced:
            s += (f"; device noise during the build: reference spread {100 * self.noise:.1f} % within rows, its "
                  f"level moved {100 * self.level_spread:.1f} % between them; {self.noisy} rows marked noisy")
        return s


def reference_status(units: dict, refs: dict[str, ReferenceRow]) -> ReferenceStatus:
    rows = [refs[k] for k in units if k in refs]
    noise = [r.noise for r in rows if not math.isnan(r.noise)]
    level = [r.ref_median_ms for r in rows if not math.isnan(r.ref_median_ms)]
    from device.noise import level_spread

    return ReferenceStatus(len(units), len(rows), sum(r.noisy for r in rows),
                           float(np.median(noise)) if noise else float("nan"),
                           float(np.median(level)) if level else float("nan"), level_spread(level))


def anchored_rows(units: dict, refs: dict[str, ReferenceRow]) -> dict:
    """The table's unit rows with each referenced row's median replaced by its ratio to the drift
    reference x the reference's median level over the whole build: a slow stretch of the device during
    the build, which lands on a contiguous run of rows, cancels out of the ratio, and one level puts
    every row back on the same footing. Rows without a reference (or a NaN ratio) keep their raw median.
    The level is the build's, not the device's now: the calibration's scale carries the device's level
    now, as it does for raw medians."""
    from dataclasses import replace

    status = reference_status(units, refs)
    level = status.ref_median_ms
    if math.isnan(level):
        return dict(units)
    out = {}
    for k, row in units.items():
        r = refs.get(k)
        if r is None or math.isnan(r.ratio):
            out[k] = row
        else:
            out[k] = replace(row, stats=replace(row.stats, median_ms=r.ratio * level))
    return out


# Timed against the reference by `amc-mobile noise`: a bigger unit, so the rounds are not all reference.
PROBE_SPEC = UnitSpec("conv", 16, 16, 64, 64, kernel=3, stride=1, padding=1, act="relu")


@dataclass(frozen=True)
class NoiseReport:
    device: str
    seconds: float
    rounds: int
    reference_ms: float  # the reference's median
    spread: float  # its robust spread (the noise figure)
    drift: float  # spread of the medians of 5 consecutive slices
    ratio_ci: float  # 95 % CI half-width of the probe/reference ratio
    tolerance: float

    @property
    def figure(self) -> float:
        from device.noise import noise_figure

        return noise_figure(self.spread, self.drift)

    @property
    def noisy(self) -> bool:
        from device.noise import is_noisy

        return is_noisy(self.figure, self.tolerance)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "figure": self.figure, "noisy": self.noisy}

    def summary(self) -> str:
        from device.noise import noise_sentence

        return "\n".join([
            f"device {self.device}: {self.rounds} interleaved rounds in {self.seconds:.1f} s timed",
            f"reference unit {REFERENCE_SPEC.key()}: median {self.reference_ms:.4f} ms, spread "
            f"{100 * self.spread:.1f} %, drift between 5 slices {100 * self.drift:.1f} %",
            f"ratio of {PROBE_SPEC.key()} to it: 95 % CI ±{100 * self.ratio_ci:.2f} %",
            noise_sentence(self.figure, self.tolerance),
        ])


def measure_noise(device, seconds: float = 3.0, tolerance: float = 0.10) -> NoiseReport:
    """Time the reference and PROBE_SPEC in interleaved rounds for about `seconds` of timed runs."""
    from device.base import Candidate, Device, MeasureConfig
    from device.noise import pass_drift
    from device.registry import open_device
    from device.stats import median_ci_rel

    from device.errors import AmcError

    owned = not isinstance(device, Device)
    dev = open_device(device) if owned else device
    try:
        cands = []
        for name, spec in ((REFERENCE_NAME, REFERENCE_SPEC), ("probe", PROBE_SPEC)):
            module, x = spec.build()
            cands.append(Candidate(name, module, x))
        cfg = MeasureConfig(warmup=20, iterations=30, min_time_ms=seconds * 1000.0 / 2, reference=REFERENCE_NAME)
        ref, probe = dev.measure(cands, cfg)
        if not ref.ok:
            raise AmcError(f"the reference unit could not be measured on {dev.uri}: {ref.error}")
        if not probe.ok:
            raise AmcError(f"the probe unit could not be measured on {dev.uri}: {probe.error}")
        from device.stats import robust_cv

        ratios = np.asarray(probe.samples_ms) / np.asarray(probe.reference_ms) if probe.has_reference else []
        return NoiseReport(dev.uri, float(sum(ref.samples_ms) + sum(probe.samples_ms)) / 1000.0, probe.n,
                           ref.median_ms, robust_cv(ref.samples_ms), pass_drift(ref.samples_ms),
                           median_ci_rel(ratios) if len(ratios) else float("nan"), tolerance)
    finally:
        if owned:
            dev.close()
