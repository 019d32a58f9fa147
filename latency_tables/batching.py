"""Measure many candidates batch by batch: lower, then measure, then hand the results over at once.

Lowering a candidate to ExecuTorch costs ~0.13 s of CPU per method even with a whole batch lowered
at once (device/shared_lowering.py, device/merged_preprocess.py; ~0.33 s one program per method),
while timing a small unit takes tens of milliseconds. So
when the device can time a prebuilt `.pte` (`measure_pte`, as `local` can), each round lowers up to
`workers` programs of `batch_size` methods in a pool of processes, and only then times them one
program after the other: lowering and timing never overlap, so a measurement never shares the CPU
with our own exporter. Other devices get `device.measure(candidates)` per batch.

Each worker pays the exporter's first-use cost once (imports, op tables), when it starts.

Nothing measured is lost when a device gives up in the middle of a program (a phone's connection
dropped): an `AmcError` with a `partial` dict ({name: LatencyStats} of the methods it finished, as
`AdbConnectionLost` has) has those handed to `on_batch` before it propagates; the methods not in it
are not reported at all (no failure rows), so a rerun measures exactly those.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import pickle
import signal
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from device.errors import AmcError
from device.base import Candidate, Device, MeasureConfig, PteDevice
from device.stats import LatencyStats

from .units import UnitSpec

DEFAULT_BATCH = 32  # methods per .pte: lowering per method is flat from ~16, each runner start amortised over more
DEFAULT_WORKERS = 2


@dataclass
class Job:
    """One thing to time: a unit (built where it is lowered) or a whole module."""

    name: str
    spec: UnitSpec | None = None
    module: nn.Module | None = None
    example_input: torch.Tensor | None = None
    payload: object = None  # the caller's bookkeeping (a key, a sample index); never sent to workers

    def candidate(self) -> Candidate:
        if self.spec is not None:
            module, x = self.spec.build()
            return Candidate(self.name, module, x)
        return Candidate(self.name, self.module, self.example_input)

    def portable(self) -> "Job":
        return Job(self.name, self.spec, self.module, self.example_input)


@dataclass
class RunStats:
    rounds: int = 0
    methods: int = 0
    lower_s: float = 0.0
    measure_s: float = 0.0
    per_round: list = field(default_factory=list)


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch", "executorch", "torchao", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def _die_with_parent(parent: int) -> None:
    """Linux: a worker gets SIGTERM when the build that forked it dies (kill -9, OOM). Otherwise an
    orphan keeps lowering and keeps the table folder's build lock (inherited through fork), so the
    next build is told that "another build is writing" when none is."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call: go now
            os._exit(1)
    except (OSError, AttributeError):
        pass  # not Linux: an orphan is then left to finish its batch


def _worker_init(warm: bool, parent: int) -> None:
    _die_with_parent(parent)
    _quiet()
    torch.set_num_threads(1)
    if warm:
        from device.lowering import lower_to_pte

        module, x = UnitSpec("conv", 4, 4, 8, 8, 1).build()
        with tempfile.TemporaryDirectory(prefix="amc-warm-") as tmp:
            lower_to_pte([Candidate("warm", module, x)], Path(tmp) / "warm.pte")


def _lower_chunk(jobs: list[Job], path: str) -> tuple[dict[str, str], float]:
    """In a worker: build and lower `jobs` into one .pte at `path`; returns ({name: why failed}, seconds)."""
    from device.lowering import lower_to_pte

    t0 = time.perf_counter()
    failed: dict[str, str] = {}
    cands = []
    for j in jobs:
        try:
            cands.append(j.candidate())
        except Exception as exc:  # a unit that cannot even be built must not lose its batch
            failed[j.name] = f"candidate {j.name!r} cannot be built: {str(exc).splitlines()[0][:200]}"
    if cands:
        try:
            failed.update(lower_to_pte(cands, Path(path)))
        except Exception as exc:
            for c in cands:
                failed.setdefault(c.name, f"lowering failed: {str(exc).splitlines()[0][:200]}")
    return failed, time.perf_counter() - t0


def _hand_over_partial(exc: Exception, jobs: Sequence[Job], on_batch,
                       failed: dict[str, str] | None = None) -> None:
    """Before `exc` propagates: give `on_batch` what the device finished of `jobs` (its `partial`),
    plus the jobs that could not even be built or lowered (`failed`); nothing for the others."""
    partial = getattr(exc, "partial", None) or {}
    failed = failed or {}
    done = []
    for j in jobs:
        if j.name in partial:
            done.append((j, partial[j.name]))
        elif j.name in failed:
            done.append((j, LatencyStats.failed(j.name, failed[j.name])))
    if done and partial:
        on_batch(done)


class BatchRunner:
    """Times jobs on `device` in rounds; see the module docstring. Use as a context manager."""

    def __init__(self, device: Device, config: MeasureConfig, batch_size: int = DEFAULT_BATCH,
                 workers: int = DEFAULT_WORKERS, warm_workers: bool = True):
        self.device = device
        self.config = config
        self.batch_size = max(1, int(batch_size))
        self.workers = max(1, int(workers))
        self.warm_workers = warm_workers
        self.use_pool = self.workers > 1 and isinstance(device, PteDevice)
        self._pool: cf.ProcessPoolExecutor | None = None
        self.stats = RunStats()
        # The drift reference (issue 19): a fixed job lowered into every program and named by
        # `config.reference`, so it runs in every round of every batch; its results are not handed on.
        self.reference: Job | None = None
        self.reference_error: str | None = None  # why programs ran without it, when they did

    def with_reference(self, jobs: list[Job], config: MeasureConfig | None = None) -> list[Job]:
        if self.reference is None or (config or self.config).reference is None:
            return jobs
        return [*jobs, self.reference]

    def measure_program(self, device: Device, path: str, jobs: list[Job],
                        config: MeasureConfig | None = None) -> list[LatencyStats]:
        """`device.measure_pte` of a program lowered with `with_reference`: the jobs' results (paired
        with the reference when it ran). A reference that did not lower or run is dropped, once said."""
        names = [j.name for j in jobs]
        cfg = config or self.config
        if self.reference is not None and cfg.reference is not None:
            try:
                out = device.measure_pte(path, [*names, self.reference.name], cfg)
            except AmcError as exc:
                if "unknown reference method" not in str(exc):
                    raise
                self._reference_failed(f"the drift reference was not lowered into this program ({exc})")
                out = device.measure_pte(path, names, replace(cfg, reference=None))
            why = device.reference_error
            if why:
                self._reference_failed(why)
            return [s for s in out if s.name != self.reference.name]
        return device.measure_pte(path, names, cfg)

    def _reference_failed(self, why: str) -> None:
        if self.reference_error is None:
            import logging

            logging.getLogger("latency_tables").warning("%s; those rows are stored unreferenced", why)
        self.reference_error = why

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            # fork, as torch's DataLoader does: the workers start at once with torch and the exporter
            # already imported, and a caller's script needs no `if __name__ == "__main__"` guard.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context(method),
                                                initializer=_worker_init, initargs=(self.warm_workers, os.getpid()))
        return self._pool

    def start(self) -> None:
        """Start the lowering workers now (their warm-up then overlaps nothing of ours)."""
        if self.use_pool:
            pool = self._get_pool()
            list(pool.map(time.sleep, [0.0] * self.workers))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def round_size(self) -> int:
        return self.batch_size * (self.workers if self.use_pool else 1)

    def run(self, jobs: Sequence[Job], on_batch: Callable[[list[tuple[Job, LatencyStats]]], None],
            should_stop: Callable[[], bool] | None = None, after_round: Callable[[], None] | None = None) -> int:
        """Time `jobs`; `on_batch` gets each program's results as soon as they are measured, and
        `after_round` is called after each round (e.g. `Companions.measure_once`).
        Returns how many jobs were measured (or failed) before `should_stop` said stop."""
        jobs = list(jobs)
        done = 0
        for start in range(0, len(jobs), self.round_size):
            if should_stop is not None and should_stop():
                break
            chunk = jobs[start:start + self.round_size]
            if self.use_pool:
                self._pool_round(chunk, on_batch)
            else:
                self._plain_round(chunk, on_batch)
            done += len(chunk)
            self.stats.rounds += 1
            self.stats.methods += len(chunk)
            if after_round is not None:
                after_round()
        return done

    def _portable(self, jobs: list[Job]) -> bool:
        """Whether the jobs' modules can go to the lowering workers: a model whose class is defined
        where pickle cannot name it (inside a function, an exec'd script) is lowered here instead."""
        cache = self.__dict__.setdefault("_picklable", {})
        for j in jobs:
            if j.module is None:
                continue
            key = id(j.module)
            if key not in cache:
                try:
                    pickle.dumps(j.module)
                    cache[key] = True
                except Exception:
                    cache[key] = False
            if not cache[key]:
                return False
        return True

    def _plain_round(self, jobs: list[Job], on_batch) -> None:
        t0 = time.perf_counter()
        failed: dict[str, str] = {}
        cands = []
        for j in jobs:
            try:
                cands.append(j.candidate())
            except Exception as exc:
                failed[j.name] = f"candidate {j.name!r} cannot be built: {str(exc).splitlines()[0][:200]}"
        cfg = self.config
        if cands and self.reference is not None and cfg.reference is not None:
            cands.append(self.reference.candidate())
        try:
            results = {s.name: s for s in (self.device.measure(cands, cfg) if cands else [])}
            if self.reference is not None:
                results.pop(self.reference.name, None)
                why = self.device.reference_error
                if why:
                    self._reference_failed(why)
        except AmcError as exc:
            _hand_over_partial(exc, jobs, on_batch, failed)
            raise
        dt = time.perf_counter() - t0
        self.stats.measure_s += dt  # lowering happens inside device.measure: not separable here
        self.stats.per_round.append({"methods": len(jobs), "lower_s": None, "measure_s": dt})
        on_batch([(j, results.get(j.name) or LatencyStats.failed(j.name, failed.get(j.name, "not measured")))
                  for j in jobs])

    def _pool_round(self, jobs: list[Job], on_batch) -> None:
        parts = [jobs[i::self.workers] for i in range(self.workers)]
        parts = [p for p in parts if p]
        with tempfile.TemporaryDirectory(prefix="amc-batch-") as tmp:
            paths = [str(Path(tmp) / f"part{i}.pte") for i in range(len(parts))]
            t0 = time.perf_counter()
            outcomes = self._lower_parts([self.with_reference(p) for p in parts], paths)
            t1 = time.perf_counter()
            for p, path, (failed, _) in zip(parts, paths, outcomes):
                ok = [j for j in p if j.name not in failed]
                measured: dict[str, LatencyStats] = {}
                if ok and Path(path).is_file():
                    try:
                        for s in self.measure_program(self.device, path, ok):
                            measured[s.name] = s
                    except AmcError as exc:
                        _hand_over_partial(exc, p, on_batch, failed)
                        raise
                on_batch([(j, measured.get(j.name) or LatencyStats.failed(j.name, failed.get(j.name, "not lowered")))
                          for j in p])
            t2 = time.perf_counter()
        self.stats.lower_s += t1 - t0
        self.stats.measure_s += t2 - t1
        self.stats.per_round.append({"methods": len(jobs), "lower_s": t1 - t0, "measure_s": t2 - t1})

    def _lower_parts(self, parts: list[list[Job]], paths: list[str]) -> list[tuple[dict[str, str], float]]:
        """Lower each part in the pool; a pool whose worker died (killed for memory?) is restarted
        once and the round retried, a second death is an AmcError (nothing measured is lost)."""
        if not self._portable([j for p in parts for j in p]):
            return [_lower_chunk(p, path) for p, path in zip(parts, paths)]
        for attempt in range(2):
            pool = self._get_pool()
            futures = [pool.submit(_lower_chunk, [j.portable() for j in p], path) for p, path in zip(parts, paths)]
            try:
                return [f.result() for f in futures]
            except cf.process.BrokenProcessPool as exc:
                self._restart_pool()
                last = exc
        raise AmcError(f"the lowering worker processes keep dying ({last}); out of memory? "
                       f"rerun with --workers 1 (every row measured so far is kept)")

    def _restart_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Programs:
    """Jobs lowered once into `.pte` files kept in a temporary folder, then timed in as many passes
    as wanted (`measure_pass`), each pass one runner invocation per program. Used where things must
    be compared under the same conditions: every program sees every pass. `materialize(job)` (if
    given) builds a job's module just before it is lowered and the module is dropped afterwards, to
    keep memory flat. Devices that cannot time a prebuilt `.pte` measure the jobs afresh each pass."""

    def __init__(self, runner: BatchRunner, jobs: Sequence[Job], config: MeasureConfig | None = None,
                 materialize: Callable[[Job], None] | None = None, progress: Callable[[int], None] | None = None):
        self.runner = runner
        self.progress = progress
        self.config = config or runner.config
        self.jobs = list(jobs)
        self.materialize = materialize
        self.passes = 0
        self.failed: dict[str, str] = {}
        self.prebuilt = isinstance(runner.device, PteDevice)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._programs: list[tuple[str, list[Job]]] = []
        if self.jobs and self.prebuilt:
            self._lower_all()

    def _lower_all(self) -> None:
        runner = self.runner
        self._tmp = tempfile.TemporaryDirectory(prefix="amc-programs-")
        n = runner.workers if runner.use_pool else 1
        t0 = time.perf_counter()
        for r, start in enumerate(range(0, len(self.jobs), runner.batch_size * n)):
            chunk = self.jobs[start:start + runner.batch_size * n]
            if self.materialize is not None:
                for j in chunk:
                    self.materialize(j)
            parts = [p for p in (chunk[i::n] for i in range(n)) if p]
            paths = [str(Path(self._tmp.name) / f"r{r:03d}-{i}.pte") for i in range(len(parts))]
            lowered = [runner.with_reference(p, self.config) for p in parts]
            if runner.use_pool:
                outcomes = runner._lower_parts(lowered, paths)
            else:
                outcomes = [_lower_chunk(p, path) for p, path in zip(lowered, paths)]
            for p, path, (failed, _) in zip(parts, paths, outcomes):
                self.failed.update(failed)
                ok = [j for j in p if j.name not in failed]
                if ok and Path(path).is_file():
                    self._programs.append((path, ok))
            if self.materialize is not None:
                for j in chunk:
                    j.module = None
            if self.progress is not None:
                self.progress(len(chunk))
        runner.stats.lower_s += time.perf_counter() - t0

    def measure_pass(self, on_batch: Callable[[list[tuple[Job, LatencyStats]]], None] | None = None
                     ) -> list[tuple[Job, LatencyStats]]:
        """Time every job once; `on_batch` gets each program's results as soon as they are measured."""
        if not self.jobs:
            return []
        t0 = time.perf_counter()
        results: list[tuple[Job, LatencyStats]] = []
        if self.prebuilt:
            for path, jobs in self._programs:
                try:
                    measured = {s.name: s for s in self.runner.measure_program(self.runner.device, path, jobs,
                                                                               self.config)}
                except AmcError as exc:
                    if on_batch is not None:
                        _hand_over_partial(exc, jobs, on_batch)
                    raise
                batch = [(j, measured[j.name]) for j in jobs]
                results += batch
                if on_batch is not None:
                    on_batch(batch)
            failed = [(j, LatencyStats.failed(j.name, self.failed[j.name])) for j in self.jobs if j.name in self.failed]
            if failed and on_batch is not None:
                on_batch(failed)
            results += failed
        else:
            for start in range(0, len(self.jobs), self.runner.batch_size):
                jobs = self.jobs[start:start + self.runner.batch_size]
                if self.materialize is not None:
                    for j in jobs:
                        self.materialize(j)
                try:
                    measured = {s.name: s for s in self.runner.device.measure([j.candidate() for j in jobs],
                                                                              self.config)}
                except AmcError as exc:
                    if on_batch is not None:
                        _hand_over_partial(exc, jobs, on_batch)
                    raise
                batch = [(j, measured[j.name]) for j in jobs]
                if self.materialize is not None:
                    for j in jobs:
                        j.module = None
                results += batch
                if on_batch is not None:
                    on_batch(batch)
        self.runner.stats.measure_s += time.perf_counter() - t0
        self.passes += 1
        return results

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Companions(Programs):
    """Programs timed again whenever asked (after every round of a build), so that whole models
    measured for calibration see the same conditions as the units around them, not one moment of a
    shared machine. `on_pass` gets each pass's results, to persist them at once."""

    def __init__(self, runner: BatchRunner, jobs: Sequence[Job],
                 on_pass: Callable[[list[tuple[Job, LatencyStats]]], None], config: MeasureConfig | None = None):
        super().__init__(runner, jobs, config)
        self.on_pass = on_pass

    def measure_once(self) -> None:
        if self.jobs:  # each program's results as soon as it is timed (a lost device loses no earlier one)
            self.measure_pass(self.on_pass)
