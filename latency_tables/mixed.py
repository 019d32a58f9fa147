"""Latency of a mixed-precision (and pruned) network from a table: every fused unit at its dtype, plus the
quantize or dequantize on each fp32<->int8 edge the precision policy creates, then the overhead fit

    measured ~ scale * (sum of units at their dtypes + sum of paid edges) + offset

int8 units are measured taking and returning int8 (`units.py`, dtype int8), so an int8 region costs its
kernels only, and the q/dq a model pays are where its policy puts them: one per fp32<->int8 edge (zero
inside an all-int8 run). The tables know units, not policies: which units are int8 and which edges are paid
come from the model side (`amc_mobile.precision.PrecisionMap`) as a mask and a list of edge indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

import numpy as np

from device.errors import AmcError

from .calibrate import Overhead, fit_overhead
from .network import UnitNetwork, UnitsOn, UnitTemplate
from .predict import DEFAULT_HINT, LatencyModel
from .schema import TableRow
from .space import DEFAULT_GRID, LOWER_BOUND
from .units import EDGE_KINDS, INT8_KINDS


def at_dtype(network: UnitNetwork, dtype: str) -> UnitsOn:
    """`network`'s units keyed by `dtype`; a unit kind with no int8 form keeps fp32 (so does the model)."""
    return UnitsOn(network, [replace(u, spec=replace(u.spec, dtype=dtype if dtype == "fp32" or
                                                     u.spec.kind in INT8_KINDS else "fp32"))
                             for u in network.units])


def int8_build_network(network: UnitNetwork, edge_units: Sequence[UnitTemplate]) -> UnitsOn:
    """What `table build --dtype int8` measures: the units at int8 (those with an int8 form) and the
    quantize/dequantize of every edge a policy can create."""
    for e in edge_units:
        if e.spec.kind not in EDGE_KINDS:
            raise AmcError(f"edge unit {e.name!r} is a {e.spec.kind} unit, not one of {', '.join(EDGE_KINDS)}")
    return UnitsOn(network, [u for u in at_dtype(network, "int8").units if u.spec.dtype == "int8"] + list(edge_units))


@dataclass
class MixedLatencyModel:
    """Whole-model latency of one network for any (channels, int8 units, paid edges), within one scope."""

    fp32: LatencyModel  # the network's units at fp32
    int8: LatencyModel  # the same units at int8 (fp32 where the kind has no int8 form)
    edges: LatencyModel | None  # the quantize/dequantize units of every possible edge (None: no edges)
    scale: float = 1.0
    offset: float = 0.0
    calibration: dict = field(default_factory=dict)

    @classmethod
    def compile(cls, network: UnitNetwork, edge_units: Sequence[UnitTemplate], scope: str, rows: Iterable[TableRow],
                grid: int = DEFAULT_GRID, lbound: float = LOWER_BOUND, build_hint: str = DEFAULT_HINT,
                source: str = "", statistic: str = "median_ms") -> "MixedLatencyModel":
        rows = list(rows)
        kw = dict(grid=grid, lbound=lbound, source=source, statistic=statistic)
        fp32 = LatencyModel.compile(at_dtype(network, "fp32"), scope, rows, build_hint=build_hint, **kw)
        int8_hint = build_hint.replace("table build", "table build --dtype int8") if "--dtype" not in build_hint \
            else build_hint
        int8 = LatencyModel.compile(at_dtype(network, "int8"), scope, rows, build_hint=int8_hint, **kw)
        edges = LatencyModel.compile(UnitsOn(network, list(edge_units)), scope, rows, build_hint=int8_hint, **kw) \
            if edge_units else None
        return cls(fp32, int8, edges)

    @property
    def units(self) -> int:
        return len(self.fp32.plans)

    def _mask(self, int8_units: Sequence[bool] | np.ndarray) -> np.ndarray:
        mask = np.asarray(int8_units, dtype=bool)
        if mask.shape != (self.units,):
            raise AmcError(f"{mask.size} unit precisions for a network of {self.units} units")
        return mask

    def unit_sum(self, channels: Mapping[int, int] | None, int8_units: Sequence[bool] | np.ndarray,
                 edges: Sequence[int] = ()) -> float:
        """Units at their dtypes plus the paid edges (indices into the edge units), unscaled (ms)."""
        mask = self._mask(int8_units)
        total = float(np.where(mask, self.int8.unit_latencies(channels), self.fp32.unit_latencies(channels)).sum())
        if len(edges):
            if self.edges is None:
                raise AmcError("this network has no fp32<->int8 edges to pay")
            total += float(self.edges.unit_latencies(channels)[np.asarray(edges, dtype=np.int64)].sum())
        return total

    def predict(self, channels: Mapping[int, int] | None, int8_units: Sequence[bool] | np.ndarray,
                edges: Sequence[int] = ()) -> float:
        """Predicted whole-model latency in ms: scale * unit_sum + offset."""
        return self.unit_sum(channels, int8_units, edges) * self.scale + self.offset

    def set_calibration(self, scale: float, offset: float, facts: dict | None = None) -> None:
        self.scale, self.offset = float(scale), float(offset)
        self.calibration = {**self.calibration, **(facts or {}), "scale": self.scale, "offset": self.offset}

    def fit(self, points: Sequence[tuple[Mapping[int, int], Sequence[bool], Sequence[int], float]]) -> Overhead:
        """Fit scale and offset on whole models measured end to end: (channels, int8 units, edges, measured ms)
        each (e.g. the fp32 and the all-int8 calibration models of this session), and use them from now on."""
        sums = np.array([self.unit_sum(c, m, e) for c, m, e, _ in points], dtype=float)
        measured = np.array([p[3] for p in points], dtype=float)
        fit = fit_overhead(sums, measured)
        self.set_calibration(fit.scale, fit.offset, fit.to_dict())
        return fit
