"""A reproducible noisy neighbour: CPU + memory hogs with a duty cycle, on the runner's cores (issue 19).

    with NoiseInjector(duty=0.5):          # one hog per CPU this process may use
        ...measure...

Each hog is a child process pinned to one CPU that, in every `period_ms`, streams through a
`memory_mb` buffer (caches and memory bandwidth, as a neighbour VM or a phone's background app
does) for `duty` of the period and sleeps for the rest. Same settings, same load: benchmarks take
their figures with and without it on a quiet machine as well as a shared one, and tests use it to
check that the noise figure rises and the warning appears; never to assert a timing.

The hogs are started and stopped by the caller (`start`/`stop`, or the context manager), killed by
their own PIDs; a hog also exits by itself when its parent is gone (it polls `os.getppid()`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from device.errors import AmcError

_HOG = r"""
import os, sys, time
import numpy as np
duty, period, mb, parent = float(sys.argv[1]), float(sys.argv[2]) / 1000.0, int(sys.argv[3]), int(sys.argv[4])
buf = np.ones(max(1, mb) * (1 << 20) // 8)
chunk = max(1, min(buf.size, (1 << 20) // 8))  # 1 MiB per step: the busy part ends on time
print("ready", flush=True)
i = 0
while os.getppid() == parent:
    t0 = time.perf_counter()
    busy_until = t0 + duty * period
    while time.perf_counter() < busy_until:
        s = (i * chunk) % buf.size
        buf[s:s + chunk] += 1.0
        i += 1
    rest = t0 + period - time.perf_counter()
    if rest > 0:
        time.sleep(rest)
"""


@dataclass
class NoiseInjector:
    duty: float = 0.5  # fraction of each period a hog is busy (0 < duty <= 1)
    period_ms: float = 50.0
    memory_mb: int = 32  # per hog: larger than a core's L2, so the runner's caches get evicted
    cpus: list[int] | None = None  # None: every CPU this process may use (where the runner runs too)
    _procs: list[subprocess.Popen] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.duty <= 1:
            raise AmcError(f"noise injector duty must be in (0, 1], got {self.duty:g}")
        if not 1 <= self.period_ms <= 10_000:
            raise AmcError(f"noise injector period must be 1..10000 ms, got {self.period_ms:g}")
        if not 1 <= self.memory_mb <= 4096:
            raise AmcError(f"noise injector memory must be 1..4096 MiB per hog, got {self.memory_mb}")

    @property
    def running(self) -> bool:
        return any(p.poll() is None for p in self._procs)

    def start(self) -> "NoiseInjector":
        if self._procs:
            return self
        cpus = self.cpus if self.cpus is not None else sorted(os.sched_getaffinity(0))
        for cpu in cpus:
            p = subprocess.Popen([sys.executable, "-c", _HOG, repr(self.duty), repr(self.period_ms),
                                  str(self.memory_mb), str(os.getpid())],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._procs.append(p)
            try:
                os.sched_setaffinity(p.pid, {cpu})
            except OSError as exc:
                self.stop()
                raise AmcError(f"cannot pin a noise hog to CPU {cpu}: {exc}") from None
        for p in self._procs:  # every hog has its buffer before the caller measures anything
            if p.stdout is None or p.stdout.readline().strip() != "ready":
                self.stop()
                raise AmcError("a noise hog did not start (numpy missing?)")
        return self

    def stop(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        for p in self._procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if p.stdout is not None:
                p.stdout.close()
        self._procs = []

    def __enter__(self) -> "NoiseInjector":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        cpus = self.cpus if self.cpus is not None else sorted(os.sched_getaffinity(0))
        return (f"noise injector: {len(cpus)} hog(s) on CPU {','.join(map(str, cpus))}, duty {100 * self.duty:.0f} % "
                f"of {self.period_ms:g} ms, {self.memory_mb} MiB each")
