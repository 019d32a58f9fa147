"""One batch of methods through `et_bench`, on any device that can start it: the retry rules.

A device hands `RunnerDriver.run` an `invoke(todo, config) -> RunResult` (one runner invocation
for the methods `todo` with that config: a local subprocess, a background process on a phone) and
the driver decides what to run next:

- `config.repeats` passes over the methods, the samples of the passes pooled with `merge_repeats`;
- exit 2 (bad arguments) is the caller's mistake and raises; exit 3 "cannot load program" means the
  file is bad, so every method not done fails with that reason;
- otherwise the runner stopped on one method (an interleaved run names it, `RunResult.failed`;
  a plain run goes through `--methods` in order, so it is the first not done): that method fails
  with the runner's reason and the runner is started again for the ones after it;
- a drift reference that stops the runner is dropped from the config (once said, in
  `reference_error`), and the batch goes on unreferenced; when it was asked for as a method too,
  it fails like any culprit;
- two timeouts in a row that finish nothing give up on the rest.

Finished methods are recorded as their records arrive: `record` is the hook a streaming device
calls while the runner still runs, so what a lost connection interrupts loses no finished method
(`MethodResults.complete`). Device-specific rules (adb's redeploy on 126/127) stay in the device's
`invoke`, which may raise.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, Iterable, Sequence

from .base import MeasureConfig, ProgressFn, tick
from .errors import AmcError
from .runner import EXIT_LOAD, EXIT_USAGE, RunnerRecord, RunResult
from .stats import LatencyStats, merge_repeats

log = logging.getLogger(__name__)

Invoke = Callable[[list[str], MeasureConfig], RunResult]


class MethodResults:
    """What a batch has in hand: each method's samples per repeat, and the methods finished for good
    (every repeat in, or failed), which are safe to persist when the batch is cut short."""

    def __init__(self, repeats: int, progress: ProgressFn | None = None):
        self.repeats = max(1, int(repeats))
        self.progress = progress
        self.per_repeat: dict[str, list[LatencyStats]] = {}
        self.errors: dict[str, str] = {}
        self.complete: dict[str, LatencyStats] = {}
        self.runtime_version: str | None = None  # the runner's, as its first record said

    def add(self, name: str, stats: LatencyStats, rep: int) -> None:
        """Samples of repeat `rep`; the last repeat completes the method (one progress tick)."""
        self.per_repeat.setdefault(name, []).append(stats)
        if rep == self.repeats - 1:
            self.complete[name] = merge_repeats(name, self.per_repeat[name])
            tick(self.progress)

    def fail(self, name: str, why: str) -> None:
        """`name` is done for good, with `why` (one progress tick); later repeats skip it."""
        self.errors[name] = why
        self.complete[name] = LatencyStats.failed(name, why)
        tick(self.progress)

    def results(self, names: Sequence[str]) -> dict[str, LatencyStats]:
        return {n: LatencyStats.failed(n, self.errors[n]) if n in self.errors
                else merge_repeats(n, self.per_repeat.get(n, [])) for n in names}


class RunnerDriver:
    """Drives `et_bench` over `names` until each is measured or failed (the rules: module docstring).

    `where` (e.g. " on adb:SERIAL") goes into the messages after the runner's or the reference's name.
    """

    def __init__(self, results: MethodResults, config: MeasureConfig, *, where: str = ""):
        self.results = results
        self.config = config  # the reference is dropped from it when it fails
        self.where = where
        self.reference_error: str | None = None  # why the batch ran without its drift reference
        self._rep = 0
        self._todo: set[str] = set()
        self._taken: set[str] = set()  # methods of the current invocation already recorded

    def record(self, records: Iterable[RunnerRecord]) -> None:
        """Record the finished methods among `records`, each once per invocation (the streaming hook)."""
        for rec in records:
            if rec.method in self._todo and rec.method not in self._taken:
                self._taken.add(rec.method)
                self.results.runtime_version = self.results.runtime_version or rec.runtime_version
                self.results.add(rec.method, rec.to_stats(), self._rep)

    def run(self, names: Sequence[str], invoke: Invoke) -> dict[str, LatencyStats]:
        """{name: stats} for every name: measured, or failed with the runner's reason."""
        results = self.results
        for rep in range(results.repeats):
            self._rep = rep
            todo = [n for n in names if n not in results.errors]
            timeouts = 0
            while todo:
                self._todo, self._taken = set(todo), set()
                res = invoke(todo, self.config)
                self.record(res.records)
                todo, timeouts = self._next(todo, res, timeouts)
        return results.results(names)

    def _next(self, todo: list[str], res: RunResult, timeouts: int) -> tuple[list[str], int]:
        """What is left to run after `res`, and the count of timeouts in a row without progress."""
        done = {r.method for r in res.records}
        rest = [n for n in todo if n not in done]
        if res.error is None:
            if rest:
                raise AmcError(f"et_bench{self.where} exited 0 but did not report {', '.join(rest[:5])}")
            return [], 0
        if res.returncode == EXIT_USAGE:
            raise res.error
        if res.returncode == EXIT_LOAD and "cannot load program" in str(res.error):
            for n in rest:  # the file itself is bad: no method will do better
                self.results.fail(n, str(res.error))
            return [], 0
        if not rest:
            return [], 0
        culprit = res.failed if res.failed is not None else rest[0]
        if self.config.reference is not None and culprit == self.config.reference:
            # A reference that does not run must not sink the batch: measure without it, say so once.
            self.reference_error = (f"the drift reference {culprit!r} failed{self.where} ({res.error}); "
                                    f"measured without it (rows unreferenced)")
            log.warning(self.reference_error)
            self.config = replace(self.config, reference=None)
        elif culprit not in rest:
            culprit = rest[0]  # named a method already done: the one it was on is the first not done
        if culprit in rest:
            self.results.fail(culprit, f"et_bench failed on {culprit!r}: {res.error}")
            rest = [n for n in rest if n != culprit]
        timeouts = timeouts + 1 if res.returncode is None else 0
        if timeouts >= 2 and not done:  # two hangs in a row without progress: give up
            for n in rest:
                self.results.fail(n, f"not measured: et_bench keeps timing out ({res.error})")
            return [], timeouts
        return rest, timeouts
