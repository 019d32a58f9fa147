"""Measure named models on an opened device in one batch: the one routine behind a search's budget and
final measurement, the measured wall, the baselines' paired measurements and `compare`.

    measured = measure_models(dev, [("original", model), ("pruned", pruned)], model.input_shape, config)
    measured["pruned"].median_ms        # LatencyStats of the median pass
    measured["pruned"].ratio            # to the drift reference in the same rounds (config.reference)
    measured.noise("original")          # the reference's spread, as every measuring command words it

Thin over `Device.measure`: every model is exported with `device.example_input` (the same `.pte` bytes
everywhere). `passes` > 1 times the whole batch that many times; a device that runs ExecuTorch
programs then lowers the batch once and times that `.pte` in every pass. A shared host's slow stretches
last seconds, so a ratio within one pass (the models alternate within seconds) is far steadier than a
ratio of medians pooled over a minute.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from torch import nn

from device import Candidate, Device, MeasureConfig, PteDevice, example_input
from device.base import Fingerprint
from device.lowering import lower_to_pte
from device.noise import noise_figure, pass_drift
from device.stats import LatencyStats, robust_cv

NamedModel = tuple[str, nn.Module]


@dataclass(frozen=True)
class Lowered:
    """A batch lowered once into one `.pte`, for devices that time a prebuilt program."""

    path: Path
    failed: dict[str, str]  # candidate name -> why it did not lower


@dataclass
class ModelTiming:
    stats: LatencyStats  # of the model's median pass (its only pass when passes == 1)
    pass_median_ms: list[float | None] = field(default_factory=list)  # per pass; None where it failed
    pass_p10_ms: list[float | None] = field(default_factory=list)

    def to_dict(self, with_passes: bool = False) -> dict:
        d = self.stats.to_dict()
        if with_passes and self.stats.ok:
            d.update(pass_median_ms=self.pass_median_ms, pass_p10_ms=self.pass_p10_ms)
        return d


@dataclass
class MeasuredModels:
    timings: dict[str, ModelTiming]  # in the order the models were given
    config: MeasureConfig
    passes: int
    fingerprint: Fingerprint | None = None  # None when the caller did not ask for it
    reference_error: str | None = None  # why the drift reference (config.reference) was left out, if it was

    def __getitem__(self, name: str) -> LatencyStats:
        return self.timings[name].stats

    def stats(self) -> list[LatencyStats]:
        return [t.stats for t in self.timings.values()]

    def noise(self, name: str) -> float:
        """How noisy the device was over `name`'s samples (a drift reference's): the larger of their
        robust spread and their drift between five slices."""
        samples = self[name].samples_ms
        return noise_figure(robust_cv(samples), pass_drift(samples))

    def to_dict(self, with_passes: bool = False) -> dict:
        """{name: LatencyStats dict, "fingerprint": ...}; `with_passes` adds each model's per-pass medians
        and p10s, the MeasureConfig and the number of passes."""
        out: dict = {name: t.to_dict(with_passes) for name, t in self.timings.items()}
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint.to_dict()
        if with_passes:
            out["measure_config"] = self.config.to_dict()
            out["passes"] = self.passes
        return out


def paired_ratio(passes_a: Sequence[float | None], passes_b: Sequence[float | None], a: float | None,
                 b: float | None) -> float | None:
    """a over b from two models' per-pass figures (`ModelTiming.pass_median_ms`, ...): the median of
    the ratios within each pass where both were measured; else a / b; None without figures."""
    ratios = [x / y for x, y in zip(passes_a, passes_b) if x and y]
    if ratios:
        return float(np.median(ratios))
    return a / b if a and b else None


def candidates(models: Sequence[NamedModel], input_shape) -> list[Candidate]:
    x = example_input(input_shape)
    return [Candidate(name, module.eval(), x) for name, module in models]


@contextlib.contextmanager
def lowered_once(cands: Sequence[Candidate]) -> Iterator[Lowered]:
    """The candidates in one temporary `.pte`; a candidate that does not lower is in `failed`."""
    with tempfile.TemporaryDirectory(prefix="amc-batch-") as tmp:
        path = Path(tmp) / "batch.pte"
        yield Lowered(path, lower_to_pte(list(cands), path) if cands else {})


def measure_models(device: Device, models: Sequence[NamedModel], input_shape,
                   config: MeasureConfig = MeasureConfig(), *, passes: int = 1,
                   fingerprint: bool = True) -> MeasuredModels:
    """`models` (name, module) measured on `device` in one batch, `passes` times; see the module doc.
    Device errors (AmcError: runner missing, phone unreachable) propagate; a model that fails gets a
    failed LatencyStats."""
    return measure_candidates(device, candidates(models, input_shape), config, passes=passes,
                              fingerprint=fingerprint)


def measure_candidates(device: Device, cands: Sequence[Candidate], config: MeasureConfig = MeasureConfig(), *,
                       passes: int = 1, lowered: Lowered | None = None, fingerprint: bool = True) -> MeasuredModels:
    """`measure_models` for candidates with their own example inputs; `lowered`: the batch already in a
    `.pte` (`lowered_once`), timed as it is on a device that runs ExecuTorch programs."""
    passes = max(1, passes)
    runs: list[dict[str, LatencyStats]] = []
    failed: dict[str, str] = {}
    reference_error = None
    if isinstance(device, PteDevice) and (lowered is not None or passes > 1):
        with contextlib.ExitStack() as stack:
            lowered = lowered or stack.enter_context(lowered_once(cands))
            failed = lowered.failed
            names = [c.name for c in cands if c.name not in failed]
            run_config, reference_error = config.without_unlowered_reference(failed)
            for _ in range(passes if names else 0):
                runs.append({s.name: s for s in device.measure_pte(lowered.path, names, run_config)})
                reference_error = reference_error or device.reference_error
    else:
        for _ in range(passes):
            runs.append({s.name: s for s in device.measure(cands, config)})
            reference_error = reference_error or device.reference_error
    timings = {c.name: _timing(c.name, failed, [r[c.name] for r in runs if c.name in r]) for c in cands}
    fp = device.fingerprint(config) if fingerprint else None
    return MeasuredModels(timings, config, len(runs), fp, reference_error)


def _timing(name: str, failed: dict[str, str], per: list[LatencyStats]) -> ModelTiming:
    """A model's stats of its median pass, with every pass's median and p10."""
    if name in failed:
        return ModelTiming(LatencyStats.failed(name, failed[name]))
    ok = [s for s in per if s.ok]
    if not ok:
        return ModelTiming(per[0] if per else LatencyStats.failed(name, "not measured"))
    mid = statistics.median(s.median_ms for s in ok)
    best = min(ok, key=lambda s: abs(s.median_ms - mid))
    return ModelTiming(best, [s.median_ms if s.ok else None for s in per], [s.p10_ms if s.ok else None for s in per])
