"""Several devices of one fingerprint measuring one table: `table build -d adb:A -d adb:B`.

Each round is lowered once (the process pool of `BatchRunner`) into programs of `batch_size`
methods; the programs go into one queue and each device is one worker thread that takes the next
program, times it with `measure_pte`, and hands the results over (under one lock: the table's
append logs are not shared between threads otherwise). So a faster phone takes more programs and
nothing waits for the slowest one but the round's last program.

A device whose connection is lost (`AdbConnectionLost`, or any `AmcError` carrying `partial`) hands
over what it finished (its `partial`), and the methods it had not finished go back into the queue,
as the same lowered program with fewer method names: another device measures them, once. The lost
device leaves the pool for the rest of the build. When every device is gone, the last loss is
raised (everything finished is in the table already; a rerun measures the rest). Any other error
(a runner that cannot start) stops the round and is raised once the other workers finished their
program.

Devices of different fingerprints cannot share a table: `group_by_fingerprint` splits them and
`build_table` is called once per group.
"""

from __future__ import annotations

import collections
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from amc_mobile.errors import AmcError
from device.base import Device, MeasureConfig
from device.stats import LatencyStats

from .batching import DEFAULT_BATCH, DEFAULT_WORKERS, BatchRunner, Job

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
            if not callable(getattr(d, "measure_pte", None)):
                raise AmcError(f"{d.uri} cannot time a prebuilt program: it cannot share a table build with other "
                               f"devices; build its table on its own")
        super().__init__(devices[0], config, batch_size, max(2, workers), warm_workers)
        self.devices = devices
        self.alive = list(devices)
        self.lost: dict[str, str] = {}  # uri -> why it left the pool
        self.per_device: dict[str, int] = collections.Counter()  # methods measured by each device

    @property
    def round_size(self) -> int:
        return self.batch_size * max(self.workers, len(self.alive))

    def run(self, jobs: Sequence[Job], on_batch: Callable[..., None], should_stop: Callable[[], bool] | None = None,
            after_round: Callable[[], None] | None = None) -> int:
        jobs = list(jobs)
        done = 0
        for start in range(0, len(jobs), self.round_size):
            if should_stop is not None and should_stop():
                break
            chunk = jobs[start:start + self.round_size]
            self._shard_round(chunk, on_batch)
            done += len(chunk)
            self.stats.rounds += 1
            self.stats.methods += len(chunk)
            if after_round is not None:
                if self.device not in self.alive:  # calibration follows the first device still there
                    self.device = self.alive[0]
                after_round()
        return done

    def _shard_round(self, jobs: list[Job], on_batch) -> None:
        n = max(1, -(-len(jobs) // self.batch_size))
        parts = [p for p in (jobs[i::n] for i in range(n)) if p]
        with tempfile.TemporaryDirectory(prefix="amc-shard-") as tmp:
            paths = [str(Path(tmp) / f"part{i}.pte") for i in range(len(parts))]
            t0 = time.perf_counter()
            outcomes = self._lower_parts(parts, paths)
            t1 = time.perf_counter()
            queue: collections.deque[tuple[str, list[Job]]] = collections.deque()
            failed_rows = []
            for p, path, (failed, _) in zip(parts, paths, outcomes):
                ok = [j for j in p if j.name not in failed]
                failed_rows += [(j, LatencyStats.failed(j.name, failed[j.name])) for j in p if j.name in failed]
                if ok and Path(path).is_file():
                    queue.append((path, ok))
                elif ok:
                    failed_rows += [(j, LatencyStats.failed(j.name, "not lowered")) for j in ok]
            if failed_rows:
                on_batch(failed_rows)
            self._drain(queue, on_batch)
            t2 = time.perf_counter()
        self.stats.lower_s += t1 - t0
        self.stats.measure_s += t2 - t1
        self.stats.per_round.append({"methods": len(jobs), "lower_s": t1 - t0, "measure_s": t2 - t1,
                                     "devices": len(self.alive)})

    def _drain(self, queue: collections.deque, on_batch) -> None:
        """Every program in `queue` measured by the devices still alive; see the module docstring."""
        cond = threading.Condition()
        state = {"in_flight": 0, "error": None, "last_lost": None}

        def worker(dev: Device) -> None:
            while True:
                with cond:
                    while not queue and state["in_flight"] and state["error"] is None:
                        cond.wait()
                    if not queue or state["error"] is not None:
                        cond.notify_all()
                        return
                    path, jobs = queue.popleft()
                    state["in_flight"] += 1
                try:
                    results = dev.measure_pte(path, [j.name for j in jobs], self.config)
                except AmcError as exc:
                    partial = getattr(exc, "partial", None)
                    with cond:
                        state["in_flight"] -= 1
                        if partial is None:  # not a lost connection: stop the pool
                            queue.appendleft((path, jobs))
                            state["error"] = exc
                            cond.notify_all()
                            return
                        done = [(j, partial[j.name]) for j in jobs if j.name in partial]
                        rest = [j for j in jobs if j.name not in partial]
                        if done:
                            on_batch(done, dev.uri)
                            self.per_device[dev.uri] += len(done)
                        if rest:
                            queue.appendleft((path, rest))
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
                        queue.appendleft((path, jobs))
                        state["error"] = exc
                        cond.notify_all()
                    return
                by_name = {s.name: s for s in results}
                with cond:
                    on_batch([(j, by_name.get(j.name) or LatencyStats.failed(j.name, "not measured")) for j in jobs],
                             dev.uri)
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
        if queue:  # every device is gone
            left = sum(len(j) for _, j in queue)
            err = AmcError(f"every device of the pool is gone ({len(self.lost)} lost; last: {state['last_lost']}); "
                           f"{left} configurations of this round are not measured: rerun to measure them")
            err.partial = {}  # what was finished is handed over already
            raise err from state["last_lost"]
