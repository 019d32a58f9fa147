"""Latency statistics of one measured candidate: raw samples plus the usual summaries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Per-candidate latency, in milliseconds; `samples_ms` keeps every timed iteration."""

    name: str
    median_ms: float
    mean_ms: float
    std_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    samples_ms: tuple[float, ...] = field(repr=False)
    load_ms: float | None = None
    # Why this candidate could not be measured; the numbers are NaN when set.
    error: str | None = None

    @classmethod
    def from_samples(cls, name: str, samples_ms, load_ms: float | None = None) -> "LatencyStats":
        s = np.asarray(list(samples_ms), dtype=float)
        if s.size == 0:
            return cls.failed(name, "no samples")
        return cls(
            name=name,
            median_ms=float(np.median(s)),
            mean_ms=float(s.mean()),
            std_ms=float(s.std(ddof=1)) if s.size > 1 else 0.0,
            p10_ms=float(np.percentile(s, 10)),
            p90_ms=float(np.percentile(s, 90)),
            n=int(s.size),
            samples_ms=tuple(float(x) for x in s),
            load_ms=load_ms,
        )

    @classmethod
    def failed(cls, name: str, error: str) -> "LatencyStats":
        nan = float("nan")
        return cls(name, nan, nan, nan, nan, nan, 0, (), None, error)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self, with_samples: bool = False) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("samples_ms")
        else:
            d["samples_ms"] = list(self.samples_ms)
        return d


def merge_repeats(name: str, repeats: list[LatencyStats]) -> LatencyStats:
    """Pool the samples of several runs of the same candidate into one statistic."""
    samples = [x for r in repeats if r.ok for x in r.samples_ms]
    if not samples:
        errors = "; ".join(r.error or "" for r in repeats)
        return LatencyStats.failed(name, errors or "no samples")
    loads = [r.load_ms for r in repeats if r.load_ms is not None]
    return LatencyStats.from_samples(name, samples, load_ms=float(np.median(loads)) if loads else None)
