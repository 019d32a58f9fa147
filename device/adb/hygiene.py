"""Measurement hygiene on a phone: where to run (big cores), when to run (cool), what to record.

- Affinity and threads: by default the runner is pinned (`taskset MASK`) to the fastest cluster
  (highest cpuinfo_max_freq) and the threadpool gets one thread per core of it. Both come from
  `MeasureConfig.affinity`/`threads` when set. (Phones with a single prime core may do better with
  prime+mid for threads > 1: pass `--affinity` and `--threads` for that.)
- Thermal guard: before each batch, wait until the hottest CPU thermal zone is under `max_temp_c`
  (default 45 °C), polling every `poll_s`; after `timeout_s` (default 120 s) warn and go on.
- Snapshots of governors, current frequencies and temperatures before and after each batch, and the
  spread of the per-repeat medians, go into the device's `last_batch_report` (and the log).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from device.stats import LatencyStats

from .phone_info import Core, Snapshot, cpus_to_mask, fastest_cluster

log = logging.getLogger("device.adb")

DEFAULT_MAX_TEMP_C = 45.0
DEFAULT_THERMAL_TIMEOUT_S = 120.0
DEFAULT_THERMAL_POLL_S = 5.0


def default_affinity_and_threads(cores: list[Core]) -> tuple[str | None, int]:
    """(hex mask of the fastest cluster, its core count); (None, 1) when cpufreq is unreadable."""
    big = fastest_cluster(cores)
    if big is None or not big.cpus:
        return None, 1
    return cpus_to_mask(big.cpus), len(big.cpus)


@dataclass
class ThermalWait:
    snapshot: Snapshot
    waited_s: float
    timed_out: bool
    start_temp_c: float | None


class ThermalGuard:
    """Waits for the phone to cool below `max_temp_c` (None: never waits, still snapshots)."""

    def __init__(self, max_temp_c: float | None = DEFAULT_MAX_TEMP_C, timeout_s: float = DEFAULT_THERMAL_TIMEOUT_S,
                 poll_s: float = DEFAULT_THERMAL_POLL_S, sleep: Callable[[float], None] = time.sleep):
        self.max_temp_c = max_temp_c
        self.timeout_s = float(timeout_s)
        self.poll_s = max(0.01, float(poll_s))
        self._sleep = sleep

    def wait(self, snapshot: Callable[[], Snapshot], label: str = "phone") -> ThermalWait:
        snap = snapshot()
        t0 = time.monotonic()  # waiting starts after the first look
        start = snap.max_cpu_temp_c()
        if self.max_temp_c is None or start is None:
            return ThermalWait(snap, 0.0, False, start)
        temp = start
        announced = False
        while temp is not None and temp >= self.max_temp_c:
            waited = time.monotonic() - t0
            if waited >= self.timeout_s:
                log.warning("%s: CPU still at %.1f °C after waiting %.0f s for < %.1f °C; measuring anyway "
                            "(results may be throttled)", label, temp, waited, self.max_temp_c)
                return ThermalWait(snap, waited, True, start)
            if not announced:
                log.info("%s: CPU at %.1f °C, waiting up to %.0f s for it to cool below %.1f °C", label, temp,
                         self.timeout_s, self.max_temp_c)
                announced = True
            self._sleep(min(self.poll_s, max(0.0, self.timeout_s - waited)))
            snap = snapshot()
            temp = snap.max_cpu_temp_c()
        return ThermalWait(snap, time.monotonic() - t0 if announced else 0.0, False, start)


def repeat_summary(name: str, per_repeat: list[LatencyStats]) -> dict:
    """Median of each repeat and their spread ((max - min) / median of medians, in %)."""
    medians = [r.median_ms for r in per_repeat if r.ok]
    if not medians:
        return {"repeat_medians_ms": [], "median_ms": None, "spread_pct": None}
    mid = float(np.median(medians))
    spread = (max(medians) - min(medians)) / mid * 100.0 if mid > 0 and len(medians) > 1 else 0.0
    return {"repeat_medians_ms": [round(m, 6) for m in medians], "median_ms": round(mid, 6),
            "spread_pct": round(spread, 3)}


def frequency_changes(before: Snapshot, after: Snapshot) -> list[str]:
    """Cores whose governor changed, or whose current frequency dropped by > 10 % (throttling hints)."""
    notes = []
    b_gov, a_gov = before.governors, after.governors
    b_f, a_f = before.cur_khz, after.cur_khz
    for cpu in sorted(set(b_gov) & set(a_gov)):
        if b_gov[cpu] != a_gov[cpu]:
            notes.append(f"cpu{cpu} governor {b_gov[cpu]} -> {a_gov[cpu]}")
        fb, fa = b_f.get(cpu), a_f.get(cpu)
        if fb and fa and fa < 0.9 * fb:
            notes.append(f"cpu{cpu} {fb // 1000} -> {fa // 1000} MHz")
    return notes
