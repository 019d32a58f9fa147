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


# ----------------------------------------------------------------------------------- model size

# What a lowered layer stores, in bytes per element: XNNPACK keeps int8 weights with one fp32 scale per
# output channel (symmetric: no zero point) and a 4-byte bias (the BN folded into it); fp32 layers keep
# 4-byte weights and bias. Units without parameters (add, pool, act, ...) store nothing.
_WEIGHT_BYTES = {"fp32": 4, "int8": 1}
_SCALE_BYTES = 4
_BIAS_BYTES = 4


def unit_bytes(spec: UnitSpec) -> int:
    """The parameter bytes of one fused unit at its dtype, as the lowered program stores them."""
    if spec.kind in ("conv", "dwconv"):
        weights, channels = spec.c_out * (spec.c_in // spec.groups) * spec.kernel ** 2, spec.c_out
    elif spec.kind == "linear":
        weights, channels = spec.c_in * spec.c_out, spec.c_out
    elif spec.kind in ("bn", "layernorm"):  # not folded into a conv: scale and shift, fp32
        return 2 * spec.c_in * 4
    else:
        return 0
    scales = channels * _SCALE_BYTES if spec.dtype == "int8" else 0
    return weights * _WEIGHT_BYTES[spec.dtype] + scales + channels * _BIAS_BYTES


def model_size_mb(units: list[UnitSpec]) -> float:
    """A model's weights in MB (1e6 bytes) from its concrete units at their dtypes: exact for the parameters
    (the `.pte` adds its graph and delegate headers on top, a few kB)."""
    return sum(unit_bytes(u) for u in units) / 1e6


class SizeCost(_GraphCost):
    """Parameter bytes of every unit at one dtype (`unit_bytes`), in MB: bilinear in the kept counts, so the
    closed form is exact."""

    unit = "MB"
    scale = 1e6

    def __init__(self, graph: PruningGraph, dtype: str = "fp32"):
        self.dtype = dtype
        super().__init__(graph)

    def _one(self, spec: UnitSpec) -> float:
        from dataclasses import replace

        return float(unit_bytes(replace(spec, dtype=self.dtype)))


def pick_by_dtype(fp32: np.ndarray, int8: np.ndarray, dtypes: list[str]) -> np.ndarray:
    """Per unit, the fp32 or the int8 figure as `dtypes` (one per unit) says."""
    return np.where(np.asarray(dtypes) == "int8", np.asarray(int8, dtype=float), np.asarray(fp32, dtype=float))


def predict_mixed(fp32, int8, channels: dict[int, int], dtypes: list[str]) -> float:
    """THE latency prediction of a pruned, mixed-precision model (`channels`, one dtype per unit of
    `graph.units`), from a fp32 and an int8 latency model of the same network. Every joint-search cost goes
    through here, so a better predictor replaces this body alone.

    Today: each unit's table latency at its dtype, summed, with the fp32 table's overhead fit (scale, offset)
    on top. Pessimistic: a standalone int8 unit's time holds a quantize and a dequantize, which inside an int8
    region the model does not pay (docs/BENCHMARKS.md, issue 15: +45 % for all-int8 ResNet-20); the search's
    measured wall and final measurement time the quantized model itself."""
    units = pick_by_dtype(fp32.unit_latencies(channels), int8.unit_latencies(channels), dtypes)
    return float(units.sum()) * fp32.scale + fp32.offset


class MixedLatencyCost:
    """A `CostModel` view of a mixed-precision model at fixed unit dtypes: what the action wall, which
    knows channels only, asks (`at(dtypes)` makes one per assumed precision completion)."""

    unit = "ms"
    scale = 1e3

    def __init__(self, fp32, int8, dtypes: list[str]):
        self.fp32, self.int8, self.dtypes = fp32, int8, list(dtypes)
        self.full_cost = predict_mixed(fp32, int8, {}, ["fp32"] * len(self.dtypes))

    def at(self, dtypes: list[str]) -> "MixedLatencyCost":
        return MixedLatencyCost(self.fp32, self.int8, dtypes)

    def predict(self, channels: dict[int, int]) -> float:
        return predict_mixed(self.fp32, self.int8, channels, self.dtypes)

    def unit_costs(self, channels: dict[int, int]) -> np.ndarray:
        return pick_by_dtype(self.fp32.unit_latencies(channels), self.int8.unit_latencies(channels), self.dtypes)

    def __repr__(self) -> str:
        return f"MixedLatencyCost({self.dtypes.count('int8')}/{len(self.dtypes)} units int8)"
