"""Re-time a table's calibration models now and refit the overhead term for this session.

Unit rows are stable facts about kernels; the overhead term is where the device's *current* state
shows: a phone that has warmed up, a shared host that was busy while the table was built. Measured
here: a MobileNet-V2 table built at load 7-10 and fitted on calibration timed then predicted +14%
on a quiet machine (2% of 50 variants within +-10%); the same rows with the calibration models
re-timed in the same session as the variants predicted 100% within +-5%. Re-timing the calibration
models costs seconds (a few whole models, lowered once), so a search does it before it sets its
budget, and the unpruned model's timing doubles as the measured reference of a relative target.

Every pass is appended to the table's `calibration.csv` at once (nothing measured is lost), and a
table's stored fit follows its most recent passes (`loading.RECENT_PASSES`).

Anchored (the default, issue 19): the unpruned model runs in every round of every pass as the drift
reference, and the fit uses each calibration model's median ratio to it x the reference's median over
the session. A device whose level moves between passes, or between runner processes (measured: a 25 us
network at 26 or 34 us depending on the process), moves the reference alike, so the fit sees the
models' relative cost at one level. `calibration.csv` keeps the raw rows; the ratios are in the
`Recalibration` (a search writes it to setup.json).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace

from device.errors import AmcError
from device.base import Device, MeasureConfig
from device.stats import LatencyStats

from .batching import BatchRunner, Job, Programs
from .calibrate import Overhead, calibration_variants, fit_overhead
from .loading import calibration_points, table_grid
from .predict import LatencyModel
from .schema import CalibrationRow, Stats
from .space import DEFAULT_GRID
from .store import TableStore
from .network import Target

# Whole models of about a millisecond: at least 100 ms per timing, one runner invocation per pass.
SESSION_CONFIG = MeasureConfig(warmup=20, iterations=100, min_time_ms=100.0, repeats=1)
SESSION_PASSES = 3
REFERENCE_NAME = "original"  # the unpruned model as the drift reference of anchored recalibration


@dataclass
class Recalibration:
    fit: Overhead
    original_ms: float | None  # the unpruned model: median over the passes of its per-pass medians
    original: dict | None  # its LatencyStats (the pass with the median median), for records
    passes: int
    persisted: int  # rows appended to the table's calibration.csv
    seconds: float
    failures: list[str] = field(default_factory=list)
    anchored: bool = False  # the fit is on ratios to the original x its level (else on raw medians)
    reference_ms: float | None = None  # the original's level: median over the passes of its medians as reference
    ratios: dict[str, list[float]] = field(default_factory=dict)  # per calibration model, one ratio per pass
    calibration_ms: dict[str, float] = field(default_factory=dict)  # what the fit used, per calibration model

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fit"] = self.fit.to_dict()
        return d


def recalibrate(lat: LatencyModel, target: Target, device: str | Device, *, passes: int = SESSION_PASSES,
                config: MeasureConfig = SESSION_CONFIG, store: TableStore | None = None, grid: int | None = None,
                workers: int = 2, anchored: bool = True) -> Recalibration:
    """Time the table's calibration models for `target` `passes` times (interleaved) on `device`,
    refit `lat`'s scale and offset on these timings only, and return what was found. `store`, when
    given, receives every pass as calibration rows. `anchored`: with the original as the drift reference
    in every round, fit on ratios x its level (the module docstring); when the reference cannot be
    timed the raw medians are used and `anchored` is False. Raises AmcError when the device is unusable."""
    from device.registry import open_device

    if passes < 1:
        raise AmcError(f"recalibration needs at least one pass (got {passes})")
    t0 = time.perf_counter()
    if grid is None:
        grid = table_grid(store, target) if store is not None else DEFAULT_GRID
    variants = calibration_variants(target.graph, target.scope, grid)
    x = target.example_input()
    jobs = [Job(f"c{i:02d}", payload=(label, ch)) for i, (label, ch) in enumerate(variants)]

    def materialize(job: Job) -> None:
        ch = job.payload[1]
        job.module = target.pruned(ch)
        job.example_input = x

    rows: list[CalibrationRow] = []
    failures: list[str] = []
    per_pass_full: list[LatencyStats] = []
    ratios: dict[str, list[float]] = {}
    ref_levels: list[float] = []
    if anchored:
        config = replace(config, reference=REFERENCE_NAME)

    def on_batch(results: list[tuple[Job, LatencyStats]]) -> None:
        new = []
        for job, s in results:
            label, ch = job.payload
            if not s.ok:
                failures.append(f"{label}: {s.error}")
                continue
            if not ch:
                per_pass_full.append(s)
            if s.has_reference:
                ratios.setdefault(label, []).append(s.ratio)
                ref_levels.append(s.ref_median_ms)
            new.append(CalibrationRow(target.hash, target.label, label, ch, Stats.of(s)))
        rows.extend(new)
        if store is not None and new:
            store.append_calibration(new)

    owned = isinstance(device, str)
    dev = open_device(device) if owned else device
    try:
        runner = BatchRunner(dev, config, batch_size=len(jobs), workers=workers)
        if anchored:
            runner.reference = Job(REFERENCE_NAME, module=target.module.eval(), example_input=x)
        with runner, Programs(runner, jobs, config, materialize=materialize) as programs:
            for _ in range(passes):
                programs.measure_pass(on_batch)
    finally:
        if owned:
            dev.close()
    level = float(statistics.median(ref_levels)) if ref_levels else None
    # anchored only when every calibration model that was timed has its ratios: a half-anchored fit would
    # mix two levels
    is_anchored = bool(anchored and level and lat.statistic == "median_ms" and {r.variant for r in rows} <= set(ratios))
    values: dict[str, float] = {}
    if is_anchored:
        values = {label: float(statistics.median(v)) * level for label, v in ratios.items()}
        rows = [r.with_median(values[r.variant]) for r in rows]
    sums, measured, used = calibration_points(lat, rows)
    if not sums:
        raise AmcError("recalibration measured none of the calibration models: " + "; ".join(failures[:3]))
    fit = fit_overhead(sums, measured)
    lat.set_calibration(fit.scale, fit.offset, {**fit.to_dict(), "session": True, "passes": passes,
                                                "anchored": is_anchored})
    if not is_anchored:
        values = dict(zip(used, measured))
    original = None
    original_ms = None
    if per_pass_full:
        original_ms = float(statistics.median(s.median_ms for s in per_pass_full))
        original = min(per_pass_full, key=lambda s: abs(s.median_ms - original_ms)).to_dict()
    return Recalibration(fit, original_ms, original, passes, len(rows) if store is not None else 0,
                         round(time.perf_counter() - t0, 2), failures, is_anchored, level if is_anchored else None,
                         ratios if is_anchored else {}, values)
