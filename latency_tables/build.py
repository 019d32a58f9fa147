"""Build (or resume) a latency table for a model on a device.

1. The configurations: every unit template of the model seen through the channel scope, at the
   channel counts the search can produce (`space.py`), deduplicated by unit key across layers.
2. Adaptive sampling (`sampling.py`): a coarse lattice first, then bisection where interpolation
   misses a measured midpoint by more than the tolerance.
3. Measurement in multi-method `.pte` batches (`batching.py`); each batch's rows are appended to
   `units.csv` as soon as it is measured. A rerun skips every key already present.
   With several devices of one fingerprint (`-d adb:A -d adb:B`), the batches of each round are
   shared out among them (`sharding.py`) and `origins.csv` says which device measured each row;
   `build_tables` gives devices of different fingerprints one table each.
4. Calibration: the whole model and a few uniformly pruned variants, lowered once at the start and
   timed end to end after every round of units (at least CALIBRATION_PASSES times), each pass
   appended to `calibration.csv` (keyed by the model's architecture hash). On a shared machine whole
   models are far more sensitive to neighbours than microsecond units (cache and memory bandwidth):
   timing them throughout the build gives them the same conditions as the units.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from device.errors import AmcError

from device.base import Device, MeasureConfig
from device.stats import LatencyStats

from .batching import DEFAULT_BATCH, DEFAULT_WORKERS, BatchRunner, Companions, Job
from .calibrate import DEFAULT_VARIANTS, calibration_variants
from .schema import CalibrationRow, FailureRow, Stats, TableRow, clean_field, now_iso
from .sharding import PoolRunner, group_by_fingerprint
from .loading import compile_for
from .predict import LatencyModel
from .reference import REFERENCE_NAME, REFERENCE_SPEC, ReferenceRow
from .sampling import DEFAULT_TOLERANCE, AdaptiveSampler
from .space import DEFAULT_COARSE_STEP, DEFAULT_GRID, LOWER_BOUND, all_specs, unit_plans
from .store import TableStore, table_folder
from .network import Target, require_target

# Units take microseconds: time each for at least 30 ms, in 3 runner invocations, and keep the median.
# Interleaved rounds with the drift reference in every round (issue 19): a slow stretch of the device
# lands on every unit of a batch and on the reference alike, and each row stores its ratio to it.
UNIT_CONFIG = MeasureConfig(warmup=20, iterations=100, min_time_ms=30.0, repeats=3, reference=REFERENCE_NAME)
# Whole models take about a millisecond here: at least 100 ms each, in one invocation per pass; a build
# times its calibration models after every round of units and at least CALIBRATION_PASSES times.
MODEL_CONFIG = MeasureConfig(warmup=20, iterations=100, min_time_ms=100.0, repeats=1)
CALIBRATION_PASSES = 5


@dataclass
class BuildReport:
    folder: Path
    model: str
    scope: str
    grid: int
    space: int  # configurations the search can reach (the full lattices)
    sampled: int  # configurations the sampler asked for
    measured: int  # measured in this run
    failed: int  # failed in this run
    present: int  # already in the table when this run started (of those asked for)
    rounds: int
    refined: int  # probes whose miss exceeded the tolerance
    calibration: int  # whole-model measurements taken in this run (calibration models x passes)
    stopped: str | None  # why it stopped early, if it did
    seconds: float
    lower_s: float
    measure_s: float
    failures: list[str] = field(default_factory=list)
    devices: dict[str, int] = field(default_factory=dict)  # configurations measured per device (pooled builds)
    lost: dict[str, str] = field(default_factory=dict)  # devices that left the pool, and why
    noise: float = float("nan")  # this run's noise figure: max(median row noise, level spread) (NaN: no reference)
    noisy: int = 0  # rows of this run marked noisy
    referenced: int = 0  # rows of this run stored with their reference
    reference_error: str | None = None  # why rows went without the reference, when some did
    table_status: str = ""  # ReferenceStatus.line() of the whole table after this run

    def to_dict(self) -> dict:
        d = asdict(self)
        d["folder"] = str(self.folder)
        return d

    def summary(self) -> str:
        rate = self.measured / (self.seconds / 60) if self.seconds > 0 and self.measured else 0.0
        lines = [
            f"table {self.folder}",
            f"model {self.model} (scope {self.scope}, grid {self.grid}): {self.space} reachable unit configurations, "
            f"{self.sampled} sampled ({self.rounds} refinement rounds, {self.refined} intervals refined)",
            f"this run: {self.measured} measured, {self.failed} failed, {self.present} already present, "
            f"{self.calibration} whole-model measurements for calibration; {self.seconds:.0f} s ({rate:.1f} configs/min)",
        ]
        if len(self.devices) > 1 or self.lost:
            lines.append("devices: " + ", ".join(f"{u} {n}" for u, n in self.devices.items())
                         + "".join(f"; {u} left the pool: {why[:160]}" for u, why in self.lost.items()))
        if self.referenced:
            lines.append(noise_line(self.noise, self.noisy, self.referenced))
        if self.reference_error:
            lines.append(f"drift reference: {self.reference_error[:300]}")
        if self.table_status:
            lines.append(self.table_status)
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}; rerun the same command to continue")
        for f in self.failures[:5]:
            lines.append(f"failed: {f}")
        return "\n".join(lines)


class _Limits:
    def __init__(self, max_configs: int | None, budget_minutes: float | None):
        self.max_configs = max_configs
        self.deadline = time.monotonic() + budget_minutes * 60 if budget_minutes else None
        self.used = 0
        self.reason: str | None = None

    def remaining(self) -> int | None:
        return None if self.max_configs is None else max(0, self.max_configs - self.used)

    def stop(self) -> bool:
        if self.max_configs is not None and self.used >= self.max_configs:
            self.reason = f"--max-configs {self.max_configs} reached"
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "--budget-minutes used up"
        return self.reason is not None


log = logging.getLogger("latency_tables")


def _open_device(device: str | Device) -> tuple[Device, bool]:
    if isinstance(device, Device):
        return device, False
    from device.registry import open_device

    return open_device(device), True


def _check_runner(dev: Device) -> None:
    """Fail before minutes of lowering when the device cannot run anything (e.g. et_bench not built)."""
    if isinstance(getattr(type(dev), "runner", None), property):
        dev.runner  # noqa: B018 - the property raises AmcError with the fix


def build_table(target: Target, device: str | Device | Sequence[str | Device] = "local", *,
                grid: int = DEFAULT_GRID, lbound: float = LOWER_BOUND, tolerance: float = DEFAULT_TOLERANCE,
                coarse_step: int = DEFAULT_COARSE_STEP, refine: bool = True,
                config: MeasureConfig | None = None, model_config: MeasureConfig | None = None,
                tables_dir: str | os.PathLike | None = None, table_dir: str | os.PathLike | None = None,
                max_configs: int | None = None, budget_minutes: float | None = None, calibrate: bool = True,
                calibration_count: int = DEFAULT_VARIANTS, batch_size: int = DEFAULT_BATCH,
                workers: int = DEFAULT_WORKERS, progress: bool = True, retry_failed: bool = False) -> BuildReport:
    """Measure what the table for `target` on `device` still lacks; see the module docstring
    (`amc_mobile.tables.build_table` takes a model name, folder or module). A list of devices (all of one fingerprint) shares the work out among them."""
    t_start = time.perf_counter()
    require_target(target, "build_table")
    config = config or UNIT_CONFIG
    # Every build has the drift reference unless the caller names another (or "" for none).
    if config.reference is None:
        config = replace(config, reference=REFERENCE_NAME)
    elif not config.reference:
        config = replace(config, reference=None)
    model_config = model_config or MODEL_CONFIG
    opened: list[tuple[Device, bool]] = []
    limits = _Limits(max_configs, budget_minutes)
    try:
        for d in (device if isinstance(device, (list, tuple)) else [device]):
            opened.append(_open_device(d))
        devs = [d for d, _ in opened]
        dev = devs[0]
        fp = dev.fingerprint(config)
        for other in devs[1:]:
            diff = fp.differences(other.fingerprint(config))
            if diff:
                raise AmcError(f"{other.uri} cannot share a table with {dev.uri} ({'; '.join(diff)}): "
                               f"`table build` with both builds one table per fingerprint")
        store = TableStore(table_dir) if table_dir is not None else TableStore(table_folder(fp, tables_dir))
        store.lock()
        try:
            store.init(fp, config.to_dict(), grid)
            for d in devs:
                _check_runner(d)
            started = now_iso()
            plans = unit_plans(target.graph, target.scope, grid, lbound)
            report = BuildReport(store.folder, target.label, target.scope, grid, len(all_specs(plans)), 0, 0, 0, 0,
                                 0, 0, 0, None, 0.0, 0.0, 0.0)
            entry = {"started": started, "model": target.label, "model_hash": target.hash, "scope": target.scope,
                     "grid": grid, "lbound": lbound, "tolerance": tolerance, "coarse_step": coarse_step,
                     "refine": refine, "measure_config": config.to_dict(), "model_measure_config":
                     model_config.to_dict(), "device": dev.uri if len(devs) == 1 else [d.uri for d in devs]}
            runner = BatchRunner(dev, config, batch_size, workers) if len(devs) == 1 else \
                PoolRunner(devs, config, batch_size, workers)
            if config.reference == REFERENCE_NAME:
                runner.reference = Job(REFERENCE_NAME, spec=REFERENCE_SPEC)
            with runner, \
                    _calibration(store, target, grid, calibration_count if calibrate else 0, runner, model_config,
                                 report) as calib:
                _sample_units(store, plans, runner, limits, report, coarse_step, tolerance, refine, progress,
                              retry_failed, after_round=calib.measure_once)
                while calib.jobs and calib.passes < CALIBRATION_PASSES:
                    calib.measure_once()
                report.lower_s, report.measure_s = runner.stats.lower_s, runner.stats.measure_s
            if isinstance(runner, PoolRunner):
                # in the order the user named them (the pool counts them as batches finish)
                report.devices = {d.uri: runner.per_device[d.uri] for d in devs if d.uri in runner.per_device}
                report.lost = dict(runner.lost)
            report.stopped = limits.reason
            report.reference_error = runner.reference_error
            report.table_status = store.reference_status().line()
            report.seconds = time.perf_counter() - t_start
            if report.measured or report.failed or report.calibration:  # a no-op check leaves the stored table untouched
                store.record_build({**entry, "finished": now_iso(), **{k: v for k, v in report.to_dict().items()
                                                                       if k not in ("folder", "model", "scope", "grid")}})
            return report
        finally:
            store.unlock()
    finally:
        for d, owned in opened:
            if owned:
                d.close()


def noise_line(noise: float, noisy: int, referenced: int, tolerance: float = 0.10) -> str:
    """The device-noise sentence every measuring command prints (issue 19)."""
    from device.noise import noise_sentence

    return noise_sentence(noise, tolerance) + (f" ({noisy} of {referenced} rows marked noisy)" if noisy else "")


def build_tables(target: Target, devices: Sequence[str | Device], **kw) -> list[BuildReport]:
    """`build_table` for several devices: those of one fingerprint share one table, each other
    fingerprint gets its own (built one after the other). A group that fails (every phone of it
    lost) does not stop the others; the first such error is raised at the end, after every
    group's rows are stored."""
    opened: list[tuple[Device, bool]] = []
    try:
        for d in devices:
            opened.append(_open_device(d))
        config = kw.get("config") or UNIT_CONFIG
        groups = group_by_fingerprint([d for d, _ in opened], config)
        if len(groups) > 1:
            log.warning("the devices disagree on the fingerprint: %d tables, one per fingerprint (%s)", len(groups),
                        "; ".join(", ".join(d.uri for d in g) for g in groups))
        if len(groups) > 1 and kw.get("table_dir") is not None:
            raise AmcError("--table-dir names one table, but these devices need "
                           f"{len(groups)} (different fingerprints): leave --table-dir out")
        reports, first_error = [], None
        for group in groups:
            try:
                reports.append(build_table(target, group if len(group) > 1 else group[0], **kw))
            except AmcError as exc:
                if len(groups) == 1:
                    raise
                log.warning("%s: %s", ", ".join(d.uri for d in group), exc)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return reports
    finally:
        for d, owned in opened:
            if owned:
                d.close()


def _progress_bar(progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=0, unit="cfg", desc=desc, disable=not progress, dynamic_ncols=True, leave=True)


def _sample_units(store: TableStore, plans, runner: BatchRunner, limits: _Limits, report: BuildReport,
                  coarse_step: int, tolerance: float, refine: bool, progress: bool, retry_failed: bool,
                  after_round=None) -> None:
    values = {k: r.median_ms for k, r in store.units().items()}
    failed = {} if retry_failed else store.failures()
    sampler = AdaptiveSampler(plans, coarse_step, tolerance, refine)
    sampled: set[str] = set()
    counter = [0]
    bar = _progress_bar(progress, "table build")
    noise: list[float] = []
    levels: list[float] = []
    with store.unit_log() as log, store.failure_log() as flog, store.origin_log() as olog, \
            store.reference_log() as rlog:
        def on_batch(results: list[tuple[Job, LatencyStats]], device_uri: str | None = None) -> None:
            uri = device_uri or runner.device.uri
            for job, s in results:
                if s.ok:
                    row = TableRow(job.spec, Stats.of(s))
                    log.append(row.to_line())
                    # after the unit row: a crash between the two leaves a row that reads as
                    # unreferenced, never a reference row for a unit measured again later
                    if s.has_reference:
                        ref = ReferenceRow.of(row.key, s, row.stats.measured_at)
                        rlog.append(ref.to_line())
                        report.referenced += 1
                        report.noisy += ref.noisy
                        noise.append(ref.noise)
                        levels.append(ref.ref_median_ms)
                    olog.append(f"{row.key},{clean_field(uri)},{row.stats.measured_at}\n")
                    values[row.key] = row.median_ms
                    report.measured += 1
                else:
                    flog.append(FailureRow(job.spec.key(), s.error or "failed", now_iso()).to_line())
                    failed[job.spec.key()] = s.error
                    report.failed += 1
                    report.failures.append(f"{job.spec.key()}: {s.error}")
            log.sync()
            rlog.sync()
            flog.sync()
            olog.sync()
            limits.used += len(results)
            bar.update(len(results))

        while True:
            specs = sampler.next_round(values)
            if specs is None:
                break
            todo = []
            for s in specs:
                k = s.key()
                if k in sampled:
                    continue
                sampled.add(k)
                if k in values or k in failed:
                    report.present += 1
                else:
                    todo.append(s)
            left = limits.remaining()
            if left is not None and len(todo) > left:
                todo = todo[:left]
            if todo:
                bar.total += len(todo)
                bar.refresh()
                jobs = []
                for s in todo:
                    counter[0] += 1
                    jobs.append(Job(f"u{counter[0]:04d}", spec=s))
                runner.run(jobs, on_batch, should_stop=limits.stop, after_round=after_round)
            if limits.stop():
                break
    bar.close()
    finite = [x for x in noise if x == x]
    if finite:
        import numpy as np

        from device.noise import level_spread, noise_figure

        report.noise = noise_figure(float(np.median(finite)), level_spread(levels))
    report.sampled = len(sampled)
    report.rounds = sampler.round
    report.refined = sampler.refined_intervals


def _calibration(store: TableStore, target: Target, grid: int, count: int, runner: BatchRunner,
                 config: MeasureConfig, report: BuildReport) -> Companions:
    """The calibration models this table still lacks, lowered once and timed after every round of unit
    measurements (plus passes at the end up to CALIBRATION_PASSES), each pass appended at once."""
    have: dict[tuple, int] = {}
    for r in store.calibration():
        if r.model_hash == target.hash:
            k = (r.variant, tuple(sorted(r.channels.items())))
            have[k] = have.get(k, 0) + 1
    todo = [(label, ch) for label, ch in calibration_variants(target.graph, target.scope, grid, count)
            if have.get((label, tuple(sorted(ch.items()))), 0) < CALIBRATION_PASSES] if count else []
    x = target.example_input()
    jobs = []
    for i, (label, ch) in enumerate(todo):
        jobs.append(Job(f"m{i:02d}", module=target.pruned(ch), example_input=x, payload=(label, ch)))

    def on_pass(results: list[tuple[Job, LatencyStats]]) -> None:
        with store.calibration_log() as log:
            for job, s in results:
                if s.ok:
                    label, ch = job.payload
                    log.append(CalibrationRow(target.hash, target.label, label, ch, Stats.of(s)).to_line())
                    report.calibration += 1
                else:
                    report.failures.append(f"calibration model {job.payload[0]}: {s.error}")

    return Companions(runner, jobs, on_pass, config)


def ensure_table(target: Target, device_uri: str | Device = "local", *,
                 tables_dir: str | os.PathLike | None = None, grid: int = DEFAULT_GRID,
                 config: MeasureConfig | None = None, progress: bool = True, unit_values: str = "median",
                 **build_kw) -> LatencyModel:
    """Build whatever the table for (model, scope, device) still lacks, then load it as a LatencyModel.
    A complete table costs only the check (seconds). `device_uri`: a URI, or an opened Device (left open).
    `unit_values`: `loading.UNIT_VALUES`."""
    require_target(target, "ensure_table")
    report = build_table(target, device_uri, grid=grid, config=config, tables_dir=tables_dir, progress=progress,
                         **build_kw)
    # A build stopped by a limit still gives a model when every layer has entries (interpolation fills
    # the rest); otherwise compiling names the first layer without any.
    return compile_for(target, TableStore(report.folder), device_uri, grid, unit_values=unit_values)
