"""The budget holds as measured (issue 19, item 6): at the end of a latency search, measure the best few
policies on the device, in ONE interleaved batch with the original as the drift reference in every
round, and keep the most accurate whose *measured* ratio to the original meets the target within the
measured noise. When none does, walk back (HAQ's final wall, but with measurements): shrink the
prediction budget by the measured overshoot of the most accurate one, refit its channels to it with
the action wall, score and measure again, up to `max_walks` times.

"Within the noise": measured ratio <= target x (1 + the ratio's 95 % CI half-width, from the runner's
adaptive rounds). `summary.json` gets the candidates, what was picked and measured / target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from amc_mobile.errors import AmcError
from amc_mobile.measure_models import MeasuredModels, measure_models
from device.base import Device, MeasureConfig

# The original in every round; rounds go on until each ratio is known to +-2 % (or 15 s timed).
FINAL_CONFIG = MeasureConfig(warmup=10, iterations=40, reference="original", ci_target=0.02, max_time_ms=15000.0,
                             group=8)
DEFAULT_CANDIDATES = 4
MAX_WALKS = 3


@dataclass
class Measured:
    label: str
    channels: dict[int, int]
    accuracy: float
    predicted: float
    ratio: float  # measured, to the original in the same rounds
    ci: float  # relative 95 % CI half-width of the ratio
    median_ms: float
    meets: bool = False
    error: str | None = None
    precisions: dict[str, str] | None = None  # a joint policy's: measured quantized


@dataclass
class MeasuredPick:
    target: float  # the ratio the budget asks for (target_ms / the original's median when given in ms)
    original_ms: float
    noise: float  # the original's robust spread over the rounds, or its drift between 5 slices if larger
    picked: Measured | None
    walked_back: int
    candidates: list[Measured] = field(default_factory=list)
    # the batch the picked policy was measured in, next to the original in the same rounds: the run's
    # final measurement, so the export does not lower and time both models once more
    batch: MeasuredModels | None = field(default=None, repr=False)

    def final_measurement(self) -> dict | None:
        """{"original": ..., "pruned": ..., "fingerprint": ...} as summary.json's `measured`, from `batch`."""
        if self.picked is None or self.batch is None or self.batch.fingerprint is None:
            return None
        return {"original": self.batch["original"].to_dict(), "pruned": self.batch[self.picked.label].to_dict(),
                "fingerprint": self.batch.fingerprint.to_dict(),
                "measure_config": self.batch.config.to_dict(), "from": "measured_budget"}

    @property
    def measured_over_target(self) -> float:
        return self.picked.ratio / self.target if self.picked else float("nan")

    def to_dict(self) -> dict:
        d = {"target_ratio": self.target, "original_ms": self.original_ms, "noise": self.noise,
             "walked_back": self.walked_back, "measured_over_target": self.measured_over_target,
             "picked": None if self.picked is None else self.picked.label,
             "candidates": [{**asdict(c), "channels": {str(g): n for g, n in c.channels.items()}}
                            for c in self.candidates]}
        return d

    def line(self) -> str:
        from device.noise import noise_sentence

        if self.picked is None:
            return (f"measured budget: no policy met the target {self.target:.3f}x as measured "
                    f"({len(self.candidates)} tried, {self.walked_back} walk-backs); the most accurate is kept")
        p = self.picked
        return (f"measured budget: {p.label} measures {p.ratio:.3f}x the original (CI ±{100 * p.ci:.1f} %) for a "
                f"{self.target:.3f}x target: measured/target {self.measured_over_target:.3f}"
                + (f" after {self.walked_back} walk-back(s)" if self.walked_back else "")
                + f"; {noise_sentence(self.noise, 0.10)}")


def _measure(device: Device, original: torch.nn.Module, models: list[tuple[str, torch.nn.Module]],
             input_shape, config: MeasureConfig) -> MeasuredModels:
    measured = measure_models(device, [("original", original), *models], input_shape, config)
    if not measured["original"].ok:
        raise AmcError(f"the original could not be measured on {device.uri}: {measured['original'].error}")
    if measured.reference_error:
        raise AmcError(f"the original did not run as the drift reference on {device.uri}: "
                       f"{measured.reference_error}")
    return measured


Precisions = dict[str, str] | None  # a joint policy's per-layer precision (None: all fp32, pruning only)


def pick_measured(candidates: list[dict], *, device: Device, original: torch.nn.Module, input_shape,
                  build: Callable[[dict[int, int], Precisions], torch.nn.Module],
                  score: Callable[[dict[int, int], Precisions], float],
                  refit: Callable[[dict[int, int], Precisions, float], dict[int, int]],
                  predict: Callable[[dict[int, int], Precisions], float],
                  target_ratio: float | None, target_ms: float | None, config: MeasureConfig = FINAL_CONFIG,
                  max_walks: int = MAX_WALKS) -> MeasuredPick:
    """`candidates`: policy dicts (channels, accuracy, cost, and a joint policy's precisions), best first.
    `build(channels, precisions)` is the model as it deploys (quantized at the precisions);
    `refit(channels, precisions, budget)` the action wall's fit to a predicted budget at those precisions;
    `score` the accuracy of a policy. A walk-back keeps the precisions and refits the channels."""
    pool = sorted(candidates, key=lambda c: -(c.get("accuracy") or 0.0))
    models = [(f"p{i}", build({int(g): int(n) for g, n in c["channels"].items()}, c.get("precisions")))
              for i, c in enumerate(pool)]
    measured = _measure(device, original, models, input_shape, config)
    orig = measured["original"]
    target = target_ratio if target_ms is None else target_ms / orig.median_ms
    out: list[Measured] = []
    for (name, _), c in zip(models, pool):
        out.append(_row(name, {int(g): int(n) for g, n in c["channels"].items()}, c.get("accuracy"), c["cost"],
                        measured[name], target, c.get("precisions")))
    result = MeasuredPick(target, orig.median_ms, measured.noise("original"), None, 0, out)
    ok = [m for m in out if m.meets]
    if ok:
        result.picked, result.batch = max(ok, key=lambda m: m.accuracy), measured
        return result
    # Walk back from the most accurate measured one: its predicted budget shrinks by the measured overshoot.
    base = next((m for m in out if m.error is None), None)
    if base is None:
        raise AmcError(f"no candidate policy could be measured on {device.uri}: {out[0].error if out else 'none'}")
    current = base
    for k in range(1, max_walks + 1):
        budget = current.predicted * target / current.ratio * (1 - 0.5 * current.ci)
        prec = current.precisions
        channels = refit(current.channels, prec, budget)
        if channels == current.channels:
            break  # every layer at its lower bound
        measured = _measure(device, original, [(f"w{k}", build(channels, prec))], input_shape, config)
        t = target if target_ms is None else target_ms / measured["original"].median_ms
        m = _row(f"w{k}", channels, score(channels, prec), predict(channels, prec), measured[f"w{k}"], t, prec)
        out.append(m)
        result.walked_back = k
        if m.error is None:
            current = m
            if m.meets:
                result.picked, result.batch = m, measured
                return result
    return result


def _row(name, channels, accuracy, predicted, s, target, precisions: Precisions = None) -> Measured:
    if not s.ok or not s.has_reference:
        return Measured(name, channels, float(accuracy or 0.0), float(predicted), float("nan"), float("nan"),
                        float("nan"), False, s.error or "measured without the original as reference", precisions)
    ci = s.ci_rel if s.ci_rel is not None and math.isfinite(s.ci_rel) else 0.0
    return Measured(name, channels, float(accuracy or 0.0), float(predicted), s.ratio, ci, s.median_ms,
                    s.ratio <= target * (1 + ci), None, precisions)
