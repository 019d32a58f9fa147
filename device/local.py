"""`local`: time candidates on this machine's CPU with ExecuTorch + XNNPACK, through `et_bench`.

How a batch is measured (`measure`):

- every candidate is exported and lowered into ONE multi-method `.pte` (`device.lowering.lower_to_pte`)
  in a temporary folder; a candidate that does not export or lower gets `LatencyStats.failed(reason)`.
- `et_bench` runs once for the whole batch (`--methods` in candidate order), `config.repeats`
  times, as a local subprocess; what to rerun when it stops on a method (crash, timeout, a bad
  drift reference) and how repeats are pooled are `device.runner_driver`'s rules, shared with adb.
  Bad arguments (exit 2, e.g. an affinity mask naming CPUs that do not exist) raise `AmcError`.
- defaults: `threads=1`, no affinity; `warmup`, `iterations`, `min_time_ms` from the config.
- `progress(1)` is called after each candidate is done (failures included): fits `tqdm.update`.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from .errors import AmcError

from .base import Candidate, Fingerprint, MeasureConfig, ProgressFn, PteDevice, tick
from .lowering import lower_to_pte
from .runner import (RunResult, build_argv, executorch_version, find_runner, invocation_timeout, parse_list,
                     run_runner, runner_error)
from .runner_driver import MethodResults, RunnerDriver
from .stats import LatencyStats

log = logging.getLogger(__name__)

BACKEND = "xnnpack"
DEFAULT_THREADS = 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def discover() -> list[tuple[str, str]]:
    return [("local", f"{cpu_model()}, {os.cpu_count()} cores, executorch {executorch_version()} {BACKEND}")]


class LocalDevice(PteDevice):
    """This machine's CPU, through the host `et_bench` (built by `make runner`)."""

    uri = "local"

    def __init__(self, runner: str | os.PathLike | None = None, timeout_s: float | None = None):
        self._runner = Path(runner) if runner is not None else None
        self._timeout_s = timeout_s  # None: derived from the batch
        self.reference_error: str | None = None  # why the last measurement ran without its drift reference

    @classmethod
    def from_uri_rest(cls, rest: str) -> "LocalDevice":
        if rest:
            raise AmcError(f"bad device URI 'local:{rest}': the local device takes no options (use 'local')")
        return cls()

    @property
    def runner(self) -> Path:
        if self._runner is None:
            self._runner = find_runner()
        return self._runner

    # ------------------------------------------------------------------ fingerprint

    def fingerprint(self, config: MeasureConfig | None = None) -> Fingerprint:
        config = config or MeasureConfig()
        threads = config.threads if config.threads is not None else DEFAULT_THREADS
        extra = {"cores": os.cpu_count(), "kernel": platform.release(), "machine": platform.machine()}
        governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
        if governor:
            extra["governor"] = governor
        return Fingerprint(
            kind="local",
            hardware=cpu_model(),
            runtime=f"executorch-{executorch_version()}",
            backend=BACKEND,
            threads=int(threads),
            affinity=config.affinity,
            extra=extra,
        )

    def info(self) -> dict:
        d = self.fingerprint().to_dict()
        try:
            d["runner"] = str(self.runner)
        except AmcError as exc:
            d["runner"] = f"missing: {exc}"
        return d

    # ---------------------------------------------------------------------- measure

    def measure(
        self,
        candidates: Sequence[Candidate],
        config: MeasureConfig = MeasureConfig(),
        progress: ProgressFn | None = None,
    ) -> list[LatencyStats]:
        candidates = list(candidates)
        if not candidates:
            return []
        runner = self.runner  # fail before spending minutes on lowering
        self.reference_error = None  # set when the reference fails
        with tempfile.TemporaryDirectory(prefix="amc-local-") as tmp:
            pte = Path(tmp) / "batch.pte"
            failed = lower_to_pte(candidates, pte)
            for _ in failed:
                tick(progress)
            names = [c.name for c in candidates if c.name not in failed]
            config, self.reference_error = config.without_unlowered_reference(failed)
            if self.reference_error:
                log.warning(self.reference_error)
            measured = self._measure_methods(runner, pte, names, config, progress) if names else {}
        return [
            LatencyStats.failed(c.name, failed[c.name]) if c.name in failed else measured[c.name]
            for c in candidates
        ]

    def measure_pte(
        self,
        path: str | os.PathLike,
        methods: Sequence[str] | None = None,
        config: MeasureConfig = MeasureConfig(),
        progress: ProgressFn | None = None,
    ) -> list[LatencyStats]:
        """Time the methods of an existing `.pte` (all of them when `methods` is None)."""
        path = Path(path)
        if not path.is_file():
            raise AmcError(f"no such .pte file: {path}")
        runner = self.runner
        if methods is None:
            methods = self.list_methods(path)
        methods = list(methods)
        if not methods:
            return []
        self.reference_error = None  # set when the reference fails
        measured = self._measure_methods(runner, path, methods, config, progress)
        return [measured[m] for m in methods]

    def list_methods(self, path: str | os.PathLike) -> list[str]:
        """The method names in a `.pte`, from `et_bench --list`."""
        argv = [str(self.runner), "--model_path", str(path), "--list"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=300)
        except subprocess.TimeoutExpired:
            raise AmcError(f"et_bench --list {path} did not finish within 300s") from None
        if proc.returncode != 0:
            raise runner_error(proc.returncode, proc.stderr)
        return parse_list(proc.stdout)

    def timeout_for(self, n_methods: int, config: MeasureConfig) -> float:
        return float(self._timeout_s) if self._timeout_s is not None else invocation_timeout(n_methods, config)

    def _measure_methods(
        self,
        runner: Path,
        pte: Path,
        names: list[str],
        config: MeasureConfig,
        progress: ProgressFn | None,
    ) -> dict[str, LatencyStats]:
        """{name: stats} for every name: measured, or failed with the runner's reason."""

        def invoke(todo: list[str], cfg: MeasureConfig) -> RunResult:
            argv = build_argv(runner, pte, cfg, todo, default_threads=DEFAULT_THREADS)
            return run_runner(argv, self.timeout_for(len(todo), cfg))

        driver = RunnerDriver(MethodResults(config.repeats, progress), config)
        measured = driver.run(names, invoke)
        self.reference_error = driver.reference_error or self.reference_error
        return measured
