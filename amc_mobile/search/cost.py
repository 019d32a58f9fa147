"""Cost models: what a channel configuration costs on the target, predicted without building the model.

Every cost model answers for a `channels` dict (group id -> kept channels; groups not named stay at
full width):

- `predict(channels) -> float`: the whole network's cost, in `unit`
- `unit_costs(channels) -> np.ndarray`: one cost per `graph.units` entry (what the sum is made of)
- `full_cost`: `predict({})`, the original model's cost
- `unit`: "ms", "MMAC" or "Mparams"
- `scale`: base units (MAC, parameter, microsecond) per `unit`: log(cost * scale) is the
  accuracy-guaranteed reward's log term (AMC: log of the raw FLOP count), positive for any real model

`FlopsCost` and `ParamsCost` come from the graph's fused units; `LatencyCost` adapts the
latency-table predictor (`latency_tables.predict.LatencyModel`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from amc_mobile.pruning.graph import PruningGraph
from latency_tables.units import UnitSpec


@runtime_checkable
class CostModel(Protocol):
    unit: str
    scale: float
    full_cost: float

    def predict(self, channels: dict[int, int]) -> float: ...

    def unit_costs(self, channels: dict[int, int]) -> np.ndarray: ...


class _GraphCost:
    """A cost that is a sum over fused units of a closed form in their groups' kept counts.

    A unit's channel counts are affine in the kept counts of the groups it follows (c = base + coef *
    kept), so its cost, bilinear in (c_in, c_out), is bilinear in (kept_in, kept_out): it is fitted
    exactly once from four evaluations of `_one` and `predict` is a few numpy ops. A side that
    follows no group reads a constant 1 (the fit does not depend on it).
    """

    unit = ""
    scale = 1.0

    def __init__(self, graph: PruningGraph):
        self.graph = graph
        units = graph.units
        groups = sorted(graph.groups)
        self._pos = {g: i for i, g in enumerate(groups)}
        self._full = np.array([graph.groups[g].size for g in groups] + [1], dtype=np.int64)
        dummy = len(groups)
        self._in = np.array([self._pos[u.in_group] if u.in_group is not None else dummy for u in units], dtype=np.int64)
        self._out = np.array([self._pos[u.out_group] if u.out_group is not None else dummy for u in units],
                             dtype=np.int64)
        coef = []
        for u in units:
            f = {(i, o): self._one(u.at_counts(i, o)) for i in (1, 2) for o in (1, 2)}
            a = f[2, 2] - f[2, 1] - f[1, 2] + f[1, 1]
            b = f[2, 1] - f[1, 1] - a
            d = f[1, 2] - f[1, 1] - a
            coef.append((f[1, 1] - a - b - d, b, d, a))
        self._coef = np.array(coef, dtype=float).reshape(len(units), 4)
        self.full_cost = self.predict({})

    def _one(self, spec: UnitSpec) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _counts(self, channels: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        v = self._full.astype(float)
        for g, c in channels.items():
            v[self._pos[g]] = c
        return v[self._in], v[self._out]

    def unit_costs(self, channels: dict[int, int]) -> np.ndarray:
        ci, co = self._counts(channels)
        e, b, d, a = self._coef.T
        return (e + b * ci + d * co + a * ci * co) / self.scale

    def predict(self, channels: dict[int, int]) -> float:
        return float(self.unit_costs(channels).sum())

    def reference_unit_costs(self, channels: dict[int, int]) -> np.ndarray:
        """The definition, unit by unit from UnitSpec (slow; `unit_costs` must agree with it)."""
        return np.array([self._one(u.at(channels)) for u in self.graph.units], dtype=float) / self.scale

    def __repr__(self) -> str:
        return f"{type(self).__name__}(full_cost={self.full_cost:.4g} {self.unit})"


class FlopsCost(_GraphCost):
    """Multiply-accumulates (AMC's "FLOPs"), in millions."""

    unit = "MMAC"
    scale = 1e6

    def _one(self, spec: UnitSpec) -> float:
        return float(spec.flops())


class ParamsCost(_GraphCost):
    """Parameters of convs (with their BN's scale and shift) and linears, in millions."""

    unit = "Mparams"
    scale = 1e6

    def _one(self, spec: UnitSpec) -> float:
        if spec.kind in ("conv", "dwconv"):
            return float(spec.c_out * (spec.c_in // spec.groups) * spec.kernel**2 + 2 * spec.c_out)
        if spec.kind == "linear":
            return float(spec.c_in * spec.c_out + spec.c_out)
        return 0.0


class LatencyCost:
    """Adapter over the latency-table predictor: anything with `predict(channels)`,
    `unit_latencies(channels)` and `full_latency_ms`, all in milliseconds, and
    `set_calibration(scale, offset)` when the search refits it (a resumed run restores its fit)."""

    unit = "ms"
    scale = 1e3  # the log term is taken in microseconds

    def __init__(self, latency_model):
        for attr in ("predict", "unit_latencies", "full_latency_ms"):
            if not hasattr(latency_model, attr):
                raise TypeError(f"{type(latency_model).__name__} is not a latency model: it has no {attr!r}")
        self.model = latency_model
        self.refresh()

    def refresh(self) -> None:
        """Follow the latency model's calibration (after a refit): the predicted full latency, so that
        every comparison is prediction against prediction."""
        self.full_cost = float(self.model.predict({}))

    def predict(self, channels: dict[int, int]) -> float:
        return float(self.model.predict(channels))

    def unit_costs(self, channels: dict[int, int]) -> np.ndarray:
        return np.asarray(self.model.unit_latencies(channels), dtype=float)

    def __repr__(self) -> str:
        return f"LatencyCost(full_cost={self.full_cost:.4g} ms)"


def layer_costs(cost: CostModel, graph: PruningGraph, groups: list[int]) -> np.ndarray:
    """Per decision group: the cost at full width of the units touching it (producer, depthwise, consumer)."""
    per_unit = cost.unit_costs({})
    return np.array([per_unit[graph.units_touching(g)].sum() for g in groups], dtype=float)
