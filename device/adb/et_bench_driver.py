"""A batch of methods through our `et_bench` on a phone: each invocation a supervised background
process (`remote_process.py`) whose finished method lines stream back while it runs; what to run
next is `device.runner_driver`'s rules, the same as `local`'s.

Pinning: by `taskset` where the phone has it (`prefix`), else by et_bench's own `--affinity`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from device.base import MeasureConfig
from device.errors import AmcError
from device.runner import RunResult, build_argv, failed_method, parse_output, runner_error
from device.runner_driver import MethodResults, RunnerDriver
from device.stats import LatencyStats

from .connection import q
from .remote_process import RemoteRun

# (shell command, timeout_s, on_stdout) -> how it ended; may raise (a runner that cannot start)
Start = Callable[[str, float, Callable[[str], None]], RemoteRun]


def run_et_bench(names: Sequence[str], runner: str, remote_pte: str, config: MeasureConfig, *, threads: int,
                 affinity: str | None, prefix: str, start: Start, timeout_for: Callable[[int, MeasureConfig], float],
                 results: MethodResults, uri: str) -> tuple[dict[str, LatencyStats], str | None]:
    """({name: stats} for every name, why the batch ran without its drift reference when it did)."""
    argv_config = dataclasses.replace(config, threads=threads, affinity=None if prefix else affinity)
    driver = RunnerDriver(results, argv_config, where=f" on {uri}")

    def stream(lines: str) -> None:
        try:
            records = parse_output(lines)
        except AmcError:  # not a runner's output: the final parse says so
            return
        driver.record(records)

    def invoke(todo: list[str], cfg: MeasureConfig) -> RunResult:
        argv = build_argv(runner, remote_pte, cfg, todo, default_threads=threads)
        timeout_s = timeout_for(len(todo), cfg)
        return _result(start(prefix + " ".join(q(a) for a in argv), timeout_s, stream), timeout_s, uri)

    measured = driver.run(names, invoke)
    return measured, driver.reference_error


def _result(run: RemoteRun, timeout_s: float, uri: str) -> RunResult:
    """One invocation read as the runner's result (a timeout names the PID it killed)."""
    records = parse_output(run.stdout)
    if run.returncode is None:
        done = ", ".join(r.method for r in records) or "none"
        error = AmcError(f"et_bench did not finish within {timeout_s:.0f}s on {uri} and was killed "
                         f"(pid {run.pid}; methods done: {done[:200]})")
    elif run.returncode == 0:
        error = None
    else:
        error = runner_error(run.returncode, run.stderr or run.stdout, "et_bench")
    culprit = failed_method(run.stdout) if error is not None else None
    return RunResult(records, run.returncode, error, run.stderr, culprit[0] if culprit else None)
