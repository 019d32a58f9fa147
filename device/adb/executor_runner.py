"""ExecuTorch's stock `executor_runner` (v1.3+) as an alternative to et_bench: argv and output parsing.

It runs ONE method per invocation (`--method_name`), `--num_executions` times, with no warm-up, and
logs (ET_LOG, to stderr with the posix PAL; to logcat with the android one) one line per execution:

    I 00:00:01.234567 executorch:executor_runner.cpp:612] Iteration 3 of 60: 1.234500 ms

plus `Model loaded in X ms.` and `Model executed successfully N time(s) in X ms.` (a sum). We run
`warmup + iterations` executions and discard the first `warmup` samples ourselves. Flags used:
`--model_path`, `--num_executions`, `--cpu_threads`, `--method_name` (and nothing version-specific
such as `--print_output`). `min_time_ms` cannot be honoured (the count is fixed up front).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from device.errors import AmcError

from device.base import MeasureConfig
from device.stats import LatencyStats

ITERATION_RE = re.compile(r"Iteration\s+(\d+)\s+of\s+(\d+)\s*:\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*ms")
LOADED_RE = re.compile(r"Model loaded in\s+([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*ms")
TOTAL_RE = re.compile(r"Model executed successfully\s+(\d+)\s+time\(s\) in\s+([0-9]*\.?[0-9]+)\s*ms")


def build_argv(runner: str, model_path: str, config: MeasureConfig, method: str, threads: int) -> list[str]:
    return [
        str(runner),
        "--model_path", str(model_path),
        "--num_executions", str(int(config.warmup) + int(config.iterations)),
        "--cpu_threads", str(int(threads)),
        "--method_name", str(method),
    ]


@dataclass
class ExecutorRunnerOutput:
    samples_ms: list[float]  # every execution, in order (warm-up included)
    expected: int | None  # N of "Iteration i of N"
    load_ms: float | None
    total: tuple[int, float] | None  # (executions, ms) of the summary line

    def stats(self, method: str, warmup: int) -> LatencyStats:
        timed = self.samples_ms[int(warmup):]
        if not timed:
            if self.total is not None:
                raise AmcError("executor_runner printed only its total time, no per-iteration lines: it predates "
                               "ExecuTorch v1.3; use et_bench (the default runner) or a newer executor_runner")
            raise AmcError("executor_runner printed no 'Iteration i of N: x ms' lines (its logs may go to logcat: "
                           "build it with EXECUTORCH_PAL_DEFAULT=posix and EXECUTORCH_ENABLE_LOGGING=ON)")
        return LatencyStats.from_samples(method, timed, self.load_ms)


def parse_output(text: str) -> ExecutorRunnerOutput:
    """The per-iteration times, load time and summary from executor_runner's log text (any prefix)."""
    by_index: dict[int, float] = {}
    expected = None
    for m in ITERATION_RE.finditer(text):
        by_index[int(m.group(1))] = float(m.group(3))
        expected = int(m.group(2))
    load = LOADED_RE.search(text)
    total = TOTAL_RE.search(text)
    return ExecutorRunnerOutput(
        samples_ms=[by_index[i] for i in sorted(by_index)],
        expected=expected,
        load_ms=float(load.group(1)) if load else None,
        total=(int(total.group(1)), float(total.group(2))) if total else None,
    )


def failure_reason(text: str, returncode: int | None) -> str:
    """The runner's own error (ET_LOG Error / ET_CHECK_MSG lines), else its exit status."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E ") or "Check failed" in ln or "failed" in ln.lower()]
    why = errors[-1] if errors else (lines[-1] if lines else "")
    why = re.sub(r"^[EIWDF] \d\d:\d\d:\d\d\.\d+ \S+\] ", "", why)
    status = f"exit {returncode}" if returncode is not None else "timed out"
    return f"executor_runner failed ({status})" + (f": {why[:200]}" if why else "")
