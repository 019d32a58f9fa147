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
    # The drift reference's sample in the same round as each of ours (interleaved measurements with a
    # reference; empty otherwise), and the convergence the runner reached (ci_rel None: not asked).
    reference_ms: tuple[float, ...] = field(default=(), repr=False)
    ci_rel: float | None = None
    converged: bool | None = None

    @classmethod
    def from_samples(cls, name: str, samples_ms, load_ms: float | None = None, reference_ms=(),
                     ci_rel: float | None = None, converged: bool | None = None) -> "LatencyStats":
        s = np.asarray(list(samples_ms), dtype=float)
        if s.size == 0:
            return cls.failed(name, "no samples")
        ref = tuple(float(x) for x in reference_ms)
        if ref and len(ref) != s.size:
            raise ValueError(f"{name}: {len(ref)} reference samples for {s.size} samples (they must pair up)")
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
            reference_ms=ref,
            ci_rel=ci_rel,
            converged=converged,
        )

    # ------------------------------------------------------------------ drift reference

    @property
    def has_reference(self) -> bool:
        return bool(self.reference_ms)

    @property
    def ref_median_ms(self) -> float:
        """The reference's median over the same rounds as ours (NaN without a reference)."""
        return float(np.median(self.reference_ms)) if self.reference_ms else float("nan")

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios to the reference: what drift of the device cancels out of."""
        if not self.reference_ms:
            return float("nan")
        s, r = np.asarray(self.samples_ms), np.asarray(self.reference_ms)
        return float(np.median(s / np.where(r > 0, r, np.nan)))

    @property
    def noise(self) -> float:
        """The device's noise during this measurement: the reference's robust spread (1.4826 MAD /
        median, the CV of a normal distribution but blind to a few outliers); NaN without a reference."""
        return robust_cv(self.reference_ms)

    @classmethod
    def failed(cls, name: str, error: str) -> "LatencyStats":
        nan = float("nan")
        return cls(name, nan, nan, nan, nan, nan, 0, (), None, error)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self, with_samples: bool = False) -> dict:
        d = asdict(self)
        ref = d.pop("reference_ms")
        if not with_samples:
            d.pop("samples_ms")
        else:
            d["samples_ms"] = list(self.samples_ms)
            if ref:
                d["reference_ms"] = list(ref)
        if ref:
            d.update(ref_median_ms=self.ref_median_ms, ratio=self.ratio, noise=self.noise)
        for k in ("ci_rel", "converged"):
            if d[k] is None:
                d.pop(k)
        return d


def robust_cv(samples) -> float:
    """1.4826 * MAD / median (NaN for fewer than 3 samples)."""
    s = np.asarray(list(samples), dtype=float)
    if s.size < 3:
        return float("nan")
    med = float(np.median(s))
    if not med > 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(s - med)) / med)


def merge_repeats(name: str, repeats: list[LatencyStats]) -> LatencyStats:
    """Pool the samples of several runs of the same candidate into one statistic."""
    ok = [r for r in repeats if r.ok]
    samples = [x for r in ok for x in r.samples_ms]
    if not samples:
        errors = "; ".join(r.error or "" for r in repeats)
        return LatencyStats.failed(name, errors or "no samples")
    loads = [r.load_ms for r in repeats if r.load_ms is not None]
    # Reference samples stay paired with ours: pooled only when every repeat has them.
    paired = all(r.has_reference for r in ok)
    reference = [x for r in ok for x in r.reference_ms] if paired else []
    asked = [r.ci_rel for r in ok if r.ci_rel is not None]
    ci = None
    if asked:  # the pooled estimate's interval, computed as the runner does
        ci = median_ci_rel(np.asarray(samples) / np.asarray(reference)) if reference else median_ci_rel(samples)
    return LatencyStats.from_samples(name, samples, load_ms=float(np.median(loads)) if loads else None,
                                     reference_ms=reference, ci_rel=ci,
                                     converged=None if ci is None else all(bool(r.converged) for r in ok))


def median_ci_rel(samples) -> float:
    """Distribution-free 95 % CI of the median (order statistics n/2 -+ 0.98 sqrt(n)), as a half-width
    relative to the median; infinity below 6 samples. The same rule as et_bench's --ci_target."""
    s = np.sort(np.asarray(list(samples), dtype=float))
    n = s.size
    if n < 6:
        return float("inf")
    half = 0.98 * np.sqrt(n)
    lo, hi = max(0, int(np.floor(n / 2 - half))), min(n - 1, int(np.ceil(n / 2 + half)))
    med = float(np.median(s))
    return float((s[hi] - s[lo]) / (2 * med)) if med > 0 else float("inf")
