"""The `et_bench` runner, from Python: find it, build its command line, read its output.

`build_argv`, `parse_output` and `runner_error` are pure functions of strings: the `local`
device runs the host binary with them, the adb device runs the Android binary on a phone
with the same argv (its own runner path) and the same parsing. `run_runner` is the local
subprocess wrapper.

The runner's contract (docs/ARCHITECTURE.md): one JSON object per method per line on stdout,
flushed after each method; errors are one line on stderr and exit code 2 (bad arguments,
missing file, unknown method), 3 (load failure) or 4 (execution failure).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import AmcError
from .user_dirs import REPO_ROOT, in_checkout

from .base import MeasureConfig
from .stats import LatencyStats

ENV_RUNNER = "AMC_ET_BENCH"
DEFAULT_RUNNER = REPO_ROOT / "build" / "host" / "et_bench"

EXIT_USAGE = 2
EXIT_LOAD = 3
EXIT_EXEC = 4
RUNTIME_VERSION = "1.4.1"  # the ExecuTorch et_bench is built against, when the package cannot say


def executorch_version() -> str:
    """The ExecuTorch release the runners run (the pinned package's, without a local `+...` tag):
    what a fingerprint's runtime names, on every device that runs a `.pte`."""
    try:
        from importlib.metadata import version

        return version("executorch").split("+")[0]
    except Exception:
        return RUNTIME_VERSION


def find_runner() -> Path:
    """The host runner: `$AMC_ET_BENCH`, else `<repo>/build/host/et_bench` in a checkout, else the one
    in the user cache, built there on first use (device/runner_build.py)."""
    env = os.environ.get(ENV_RUNNER)
    if env:
        path = Path(env).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise AmcError(f"{ENV_RUNNER}={env} is not an executable file: build it with `make runner` or fix the variable")
        return path
    if DEFAULT_RUNNER.is_file() and os.access(DEFAULT_RUNNER, os.X_OK):
        return DEFAULT_RUNNER
    if in_checkout():
        raise AmcError(f"et_bench runner not built: run `make runner` (or set {ENV_RUNNER})")
    from .runner_build import build_runner, cached_runner

    cached = cached_runner()
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    return build_runner(cached, log=lambda line: print(line, file=sys.stderr))


def build_argv(
    runner: str | os.PathLike,
    model_path: str | os.PathLike,
    config: MeasureConfig,
    methods: Sequence[str] | None = None,
    *,
    default_threads: int = 1,
    default_affinity: str | None = None,
) -> list[str]:
    """The runner's argv for one invocation. `methods=None`: every method in the program.

    `config.threads`/`config.affinity` of None take the device's defaults given here.
    """
    threads = config.threads if config.threads is not None else default_threads
    affinity = config.affinity if config.affinity is not None else default_affinity
    argv = [
        str(runner),
        "--model_path", str(model_path),
        "--warmup", str(int(config.warmup)),
        "--iterations", str(int(config.iterations)),
        "--min_time_ms", repr(float(config.min_time_ms)),
        "--threads", str(int(threads)),
    ]
    if affinity:
        argv += ["--affinity", str(affinity)]
    if config.interleaved:
        argv += ["--interleave", "--group", str(int(config.group)), "--seed", str(int(config.seed)),
                 "--rewarm", str(int(config.rewarm))]
        if config.reference is not None:
            argv += ["--reference", str(config.reference)]
        if config.ci_target > 0:
            argv += ["--ci_target", repr(float(config.ci_target)), "--max_time_ms", repr(float(config.max_time_ms))]
    if methods is not None:
        methods = list(methods)
        if not methods:
            raise ValueError("methods must not be empty (use None for all methods)")
        if all(m and "," not in m for m in methods):
            argv += ["--methods", ",".join(methods)]  # what every et_bench build understands
        else:
            # A program may name a method "" or "a,b": those go one by one, verbatim (et_bench >= --method).
            for m in methods:
                argv += ["--method", m]
    return argv


@dataclass
class RunnerRecord:
    """One method's line of runner output, as sent."""

    method: str
    iterations_us: list[float]
    load_ms: float | None
    threads: int | None = None
    affinity: str | None = None
    warmup: int | None = None
    runtime_version: str | None = None
    extra: dict = field(default_factory=dict)  # keys beyond the contract (pool_threads, ...)

    def to_stats(self) -> LatencyStats:
        ref = self.extra.get("reference_us") or []
        ci = self.extra.get("ci_rel")
        return LatencyStats.from_samples(self.method, [us / 1000.0 for us in self.iterations_us], self.load_ms,
                                         reference_ms=[float(us) / 1000.0 for us in ref],
                                         ci_rel=None if ci is None else float(ci),
                                         converged=None if ci is None else bool(self.extra.get("converged")))

    @property
    def is_reference(self) -> bool:
        return bool(self.extra.get("is_reference"))


_CONTRACT_KEYS = {"method", "iterations_us", "load_ms", "threads", "affinity", "warmup", "runtime_version"}


def invocation_timeout(n_methods: int, config: MeasureConfig, slowness: float = 1.0) -> float:
    """A generous bound for one runner invocation of `n_methods` (minutes per method would be a hang,
    not a model); `slowness` scales it for devices slower than the host (phones: 2)."""
    per_method = 30.0 + 2.0 * (config.warmup + config.iterations) + 3.0 * config.min_time_ms / 1000.0
    fixed = 60.0 + n_methods * per_method
    if config.ci_target > 0:  # adaptive rounds: each group may time up to max_time_ms
        groups = -(-n_methods // max(1, config.group))
        fixed += groups * 2.0 * config.max_time_ms / 1000.0
    return slowness * fixed


def failed_method(stdout: str) -> tuple[str, str] | None:
    """(method, error) of the `{"failed_method": ...}` line an interleaved run prints before it stops."""
    for raw in stdout.splitlines():
        line = raw.strip()
        if line.startswith('{"failed_method"'):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return None
            return str(obj["failed_method"]), str(obj.get("error", ""))
    return None


def parse_output(stdout: str) -> list[RunnerRecord]:
    """Runner stdout -> one record per complete method line, in order.

    A last line that is cut short (the runner was killed mid-write) is dropped; a
    malformed line before it means the output is not a runner's, and is an AmcError.
    """
    lines = stdout.splitlines()
    complete = stdout.endswith("\n")
    records: list[RunnerRecord] = []
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line:
            continue
        is_last = i == len(lines) - 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if is_last and not complete:
                break  # truncated by a kill or timeout: what came before still counts
            raise AmcError(f"et_bench printed a line that is not JSON: {_clip(line)!r}") from None
        if not isinstance(obj, dict) or "method" not in obj or "iterations_us" not in obj:
            if isinstance(obj, dict) and ("methods" in obj or "failed_method" in obj):
                continue  # a --list line, or the name of the method an interleaved run stopped on
            raise AmcError(f"et_bench printed an unexpected line: {_clip(line)!r}")
        try:
            records.append(
                RunnerRecord(
                    method=str(obj["method"]),
                    iterations_us=[float(x) for x in obj["iterations_us"]],
                    load_ms=None if obj.get("load_ms") is None else float(obj["load_ms"]),
                    threads=obj.get("threads"),
                    affinity=obj.get("affinity"),
                    warmup=obj.get("warmup"),
                    runtime_version=obj.get("runtime_version"),
                    extra={k: v for k, v in obj.items() if k not in _CONTRACT_KEYS},
                )
            )
        except (TypeError, ValueError) as exc:
            raise AmcError(f"et_bench printed a malformed record ({exc}): {_clip(line)!r}") from None
    return records


def parse_stats(stdout: str) -> dict[str, LatencyStats]:
    """Runner stdout -> {method: LatencyStats}, in the order the runner printed them."""
    return {r.method: r.to_stats() for r in parse_output(stdout)}


def parse_list(stdout: str) -> list[str]:
    """Output of `et_bench --list` -> method names."""
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            obj = json.loads(line)
            if isinstance(obj, dict) and isinstance(obj.get("methods"), list):
                return [str(m) for m in obj["methods"]]
    raise AmcError(f"et_bench --list printed no method list: {_clip(stdout)!r}")


def runner_message(stderr: str) -> str:
    """The runner's one-line error: its last non-empty stderr line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def runner_error(returncode: int, stderr: str, what: str = "et_bench") -> AmcError:
    """An AmcError for a failed runner invocation, carrying the runner's own one-line reason."""
    msg = runner_message(stderr)
    if "unknown argument '--method'" in msg:
        msg += f" ({what} predates --method, needed for method names that are empty or hold a comma: rebuild it)"
    if returncode in (EXIT_USAGE, EXIT_LOAD, EXIT_EXEC):
        kind = {EXIT_USAGE: "bad arguments", EXIT_LOAD: "load failure", EXIT_EXEC: "execution failure"}[returncode]
        text = msg or f"{what} failed ({kind}) without a message"
    elif returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = str(-returncode)
        text = f"{what} was killed by {sig}" + (f": {msg}" if msg else "")
    else:
        text = f"{what} exited with code {returncode}" + (f": {msg}" if msg else "")
    err = AmcError(_clip(text, 500))
    err.returncode = returncode  # type: ignore[attr-defined]
    return err


@dataclass
class RunResult:
    """One runner invocation: what it measured before it stopped, and why it stopped."""

    records: list[RunnerRecord]
    returncode: int | None  # None: timed out
    error: AmcError | None
    stderr: str = ""
    failed: str | None = None  # the method an interleaved run stopped on, when it said

    @property
    def stats(self) -> dict[str, LatencyStats]:
        return {r.method: r.to_stats() for r in self.records}


def run_runner(argv: Sequence[str], timeout_s: float) -> RunResult:
    """Run a local runner; never raises for a runner failure (see `RunResult.error`).

    A run that outlives `timeout_s` is killed; the methods it finished still count.
    """
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",  # a runtime message may quote raw bytes of a corrupt file
            start_new_session=True,
        )
    except OSError as exc:
        raise AmcError(f"cannot start {argv[0]}: {exc} (rebuild it with `make runner`)") from exc
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        out, err = proc.communicate()
        records = parse_output(out)
        done = ", ".join(r.method for r in records) or "none"
        return RunResult(
            records,
            None,
            AmcError(f"et_bench did not finish within {timeout_s:.0f}s and was killed (methods done: {_clip(done, 200)})"),
            err,
        )
    records = parse_output(out)
    if proc.returncode == 0:
        return RunResult(records, 0, None, err)
    culprit = failed_method(out)
    return RunResult(records, proc.returncode, runner_error(proc.returncode, err), err,
                     culprit[0] if culprit else None)


def _clip(s: str, n: int = 200) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."
