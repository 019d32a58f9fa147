"""Several devices of one fingerprint measuring one table: `table build -d adb:A -d adb:B`.

`PoolRunner.run` cuts the jobs into programs of `batch_size` methods and submits all of them to the
lowering processes at once (`BatchRunner`'s pool); each device is one worker thread that takes the
next program (waiting for its lowering if need be), times it with `measure_pte`, and hands the
results over under one lock (the table's append logs are written from one thread at a time). So
lowering on the host overlaps measuring on the phones, a faster phone takes more programs, and
nothing waits for the slowest phone but the last program. (Unlike `local`, where a measurement
must not share the CPU with the exporter, a phone's runner does not run on the host.)

A device whose connection is lost (`AdbConnectionLost`, or any `AmcError` carrying `partial`) hands
over what it finished (its `partial`), and the methods it had not finished go back to the front of
the queue, as the same lowered program with fewer method names: another device measures them,
once. The lost device leaves the pool for the rest of the build. When every device is gone, an
`AmcError` says so (everything finished is in the table already; a rerun measures the rest). Any
other error (a runner that cannot start) stops the pool once the other workers finished their
program, and is raised.

Devices of different fingerprints cannot share a table: `group_by_fingerprint` splits them and
`build_table` is called once per group.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from device.errors import AmcError
from device.base import Device, MeasureConfig, PteDevice
from device.stats import LatencyStats

from .batching import DEFAULT_BATCH, DEFAULT_WORKERS, BatchRunner, Job, _lower_chunk

log = logging.getLogger("latency_tables")


def group_by_fingerprint(devices: Sequence[Device], config: MeasureConfig) -> list[list[Device]]:
    """Devices in groups of equal fingerprint digest, in the order first seen."""
    groups: dict[str, list[Device]] = {}
    for d in devices:
        groups.setdefault(d.fingerprint(config).digest(), []).append(d)
    return list(groups.values())


class PoolRunner(BatchRunner):
    """`BatchRunner.run` over several devices of one fingerprint; `device` is the first (calibration
    models, which must see every pass on one device, are timed there)."""

    def __init__(self, devices: Sequence[Device], config: MeasureConfig, batch_size: int = DEFAULT_BATCH,
                 workers: int = DEFAULT_WORKERS, warm_workers: bool = True):
        devices = list(devices)
        if not devices:
            raise ValueError("no devices")
        for d in devices:
            if not isinstance(d, PteDevice):
                raise AmcError(f"{d.uri} cannot time a prebuilt program: it cannot share a table build with other "
                               f"devices; build its table on its own")
        # lowering must keep up with the phones: about one host core per phone (docs/BENCHMARKS.md, the model)
        super().__init__(devices[0], config, batch_size, max(2, workers, min(len(devices), os.cpu_count() or 1)),
                         warm_workers)
        self.devices = devices
        self.alive = list(devices)
        self.lost: dict[str, str] = {}  # uri -> why it left the pool
        self.per_device: dict[str, int] = collections.Counter()  # methods measured by each device

    def run(self, jobs: Sequence[Job], on_batch: Callable[..., None], should_stop: Callable[[], bool] | None = None,
            after_round: Callable[[], None] | None = None) -> int:
        """Time `jobs` across the pool; `on_batch(results, device_uri)` gets each program's results as
        soon as they are measured; `after_round` runs once at the end (calibration models)."""
        jobs = list(jobs)
        if not jobs or (should_stop is not None and should_stop()):
            return 0
        parts = [jobs[i:i + self.batch_size] for i in range(0, len(jobs), self.batch_size)]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="amc-shard-") as tmp:
            paths = [str(Path(tmp) / f"part{i}.pte") for i in range(len(parts))]
            pool = self._get_pool()
            futures = [pool.submit(_lower_chunk, [j.portable() for j in self.with_reference(p)], path)
                       for p, path in zip(parts, paths)]
            queue: collections.deque = collections.deque(("lower", i) for i in range(len(parts)))
            try:
                self._drain(queue, parts, paths, futures, on_batch, should_stop)
            finally:
                for f in futures:
                    f.cancel()
        self.stats.measure_s += time.perf_counter() - t0
        self.stats.rounds += 1
        self.stats.methods += len(jobs)
        self.stats.per_round.append({"methods": len(jobs), "programs": len(parts), "devices": len(self.alive),
                                     "seconds": time.perf_counter() - t0})
        if after_round is not None and self.alive:
            if self.device not in self.alive:  # calibration follows the first device still there
                self.device = self.alive[0]
            after_round()
        return len(jobs)

    def _lowered(self, i: int, parts, paths, futures, on_batch, cond) -> list[Job]:
        """Program i's jobs that lowered (waiting for its worker process); the others are reported failed."""
        try:
            failed, dt = futures[i].result()
        except cf.process.BrokenProcessPool:  # a worker died (memory?): once more, in a fresh pool
            failed, dt = self._lower_parts([self.with_reference(parts[i])], [paths[i]])[0]
        self.stats.lower_s += dt
        ok = [j for j in parts[i] if j.name not in failed]
        if ok and not Path(paths[i]).is_file():
            failed = {**failed, **{j.name: "not lowered" for j in ok}}
            ok = []
        if failed:
            with cond:
                on_batch([(j, LatencyStats.failed(j.name, failed[j.name])) for j in parts[i] if j.name in failed])
        return ok

    def _drain(self, queue: collections.deque, parts, paths, futures, on_batch, should_stop) -> None:
        """Every program in `queue` measured by the devices still alive; see the module docstring."""
        cond = threading.Condition()
        state = {"in_flight": 0, "error": None, "last_lost": None}

        def worker(dev: Device) -> None:
            while True:
                with cond:
                    while not queue and state["in_flight"] and state["error"] is None:
                        cond.wait()
                    stop = should_stop is not None and should_stop()
                    if not queue or state["error"] is not None or stop:
                        cond.notify_all()
                        return
                    kind, item = queue.popleft()
                    state["in_flight"] += 1
                try:
                    if kind == "lower":
                        path, jobs = paths[item], self._lowered(item, parts, paths, futures, on_batch, cond)
                    else:
                        path, jobs = item
                    results = self.measure_program(dev, path, jobs) if jobs else []
                except AmcError as exc:
                    partial = getattr(exc, "partial", None)
                    with cond:
                        state["in_flight"] -= 1
                        if partial is None:  # not a lost connection: stop the pool
                            state["error"] = exc
                            cond.notify_all()
                            return
                        done = [(j, partial[j.name]) for j in jobs if j.name in partial]
                        rest = [j for j in jobs if j.name not in partial]
                        if done:
                            on_batch(done, dev.uri)
                            self.per_device[dev.uri] += len(done)
                        if rest:
                            queue.appendleft(("measure", (path, rest)))
                        self.alive.remove(dev)
                        self.lost[dev.uri] = str(exc)
                        state["last_lost"] = exc
                        log.warning("%s left the pool (%s); %d of its methods go to the other devices", dev.uri,
                                    exc, len(rest))
                        cond.notify_all()
                    return
                except BaseException as exc:  # KeyboardInterrupt, bugs: stop the others after their program
                    with cond:
                        state["in_flight"] -= 1
                        state["error"] = exc
                        cond.notify_all()
                    return
                by_name = {s.name: s for s in results}
                with cond:
                    if jobs:
                        on_batch([(j, by_name.get(j.name) or LatencyStats.failed(j.name, "not measured"))
                                  for j in jobs], dev.uri)
                        self.per_device[dev.uri] += len(jobs)
                    state["in_flight"] -= 1
                    cond.notify_all()

        threads = [threading.Thread(target=worker, args=(d,), name=f"pool:{d.uri}", daemon=True)
                   for d in list(self.alive)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if state["error"] is not None:
            raise state["error"]
        if queue and not self.alive:
            left = sum(len(parts[x]) if kind == "lower" else len(x[1]) for kind, x in queue)
            err = AmcError(f"every device of the pool is gone ({len(self.lost)} lost; last: {state['last_lost']}); "
                           f"{left} configurations are not measured: rerun to measure them")
            err.partial = {}  # what was finished is handed over already
            raise err from state["last_lost"]
