"""A batch of methods through ExecuTorch's stock `executor_runner` on a phone (argv and output:
`executor_runner.py`).

It runs one method per invocation, so there is nothing to resume: each method runs once per
repeat, and a method that fails (exit status, no iteration lines) fails for good with the runner's
own reason. Where its log goes to logcat rather than stderr, the lines are read from logcat by the
runner's PID. `min_time_ms` cannot be honoured (the execution count is fixed up front).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from device.base import MeasureConfig
from device.errors import AmcError
from device.runner_driver import MethodResults
from device.stats import LatencyStats

from . import executor_runner as stock
from .connection import q
from .remote_process import RemoteRun

log = logging.getLogger("device.adb")

Start = Callable[[str, float], RemoteRun]  # (shell command, timeout_s) -> how it ended


def run_stock(names: Sequence[str], runner: str, remote_pte: str, config: MeasureConfig, threads: int, *,
              prefix: str, start: Start, timeout_s: float, read_log: Callable[[int], str] | None,
              results: MethodResults, uri: str) -> dict[str, LatencyStats]:
    """{name: stats} for every name. `prefix` goes before the command (taskset); `read_log(pid)` is
    the runner's logcat, None where the phone has no logcat."""
    if config.min_time_ms:
        log.info("%s: executor_runner cannot honour min_time_ms; running warmup + iterations executions", uri)
    for rep in range(results.repeats):
        for n in names:
            if n in results.errors:
                continue
            argv = stock.build_argv(runner, remote_pte, config, n, threads)
            run = start(prefix + " ".join(q(a) for a in argv), timeout_s)
            parsed = stock.parse_output(run.stdout + "\n" + run.stderr)
            if run.returncode == 0 and not parsed.samples_ms and read_log is not None and run.pid:
                parsed = stock.parse_output(read_log(run.pid))
            if run.returncode != 0:
                results.fail(n, stock.failure_reason(run.stdout + "\n" + run.stderr, run.returncode))
                continue
            try:
                stats = parsed.stats(n, config.warmup)
            except AmcError as exc:
                results.fail(n, str(exc))
                continue
            results.add(n, stats, rep)
    return results.results(names)
