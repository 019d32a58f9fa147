"""Predict latency from a table: per-unit lookup or interpolation, compiled into a fast `LatencyModel`.

For each unit template of a model (a `UnitPlan`), the table's rows that lie on that template's line
(1 axis) or lattice (2 axes) are interpolated once, at compile time, onto EVERY integer channel
count the template can take, into one flat numpy array. `predict(channels)` is then a few array
lookups and a sum; `predict_batch` does the same for many configurations at once.

- exact hit: the measured median.
- 1 axis: linear interpolation along that axis between the nearest measured counts (clamped at
  the ends: counts beyond the measured range take the nearest end's latency).
- 2 axes: bilinear, row then column: along c_out within each measured c_in row (rows with at least
  two measured points), then along c_in between rows.
- a template with no entry at all on its line or lattice is an AmcError naming the layer, its unit
  key and the command that builds the missing entries.

Whole-model latency = scale * (sum of units) + offset, fitted on whole models measured end to end
(`calibrate.py`); `unit_latencies` returns the raw per-unit table values (unscaled).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from device.errors import AmcError

from .schema import TableRow
from .network import UnitNetwork
from .space import DEFAULT_GRID, LOWER_BOUND, UnitPlan, unit_plans

Points = dict[tuple[int, ...], float]  # axis values -> median ms


# ------------------------------------------------------------------------------- points per plan


def index_by_shape(rows: Iterable[TableRow]) -> dict[tuple, list[TableRow]]:
    out: dict[tuple, list[TableRow]] = defaultdict(list)
    for r in rows:
        out[r.spec.shape_key()].append(r)
    return out


STATISTICS = ("median_ms", "p10_ms")  # which stored summary a model predicts


def plan_points(plan: UnitPlan, by_shape: Mapping[tuple, list[TableRow]], statistic: str = "median_ms") -> Points:
    """The table's measurements that lie on `plan`'s line or lattice, by axis values."""
    full = plan.full_spec
    if not plan.axes:
        for r in by_shape.get(full.shape_key(), ()):
            if r.spec == full:
                return {(): getattr(r.stats, statistic)}
        return {}
    out: Points = {}
    for r in by_shape.get(full.shape_key(), ()):
        values = tuple(plan.coordinate(r.spec, a) for a in plan.axes)
        if min(values) >= 1 and plan.spec_at(values) == r.spec:
            out[values] = getattr(r.stats, statistic)
    return out


DEFAULT_HINT = "`amc-mobile table build --model MODEL --device DEVICE`"


def missing_entries_error(plan: UnitPlan, build_hint: str = DEFAULT_HINT, source: str = "") -> AmcError:
    where = f" in {source}" if source else ""
    return AmcError(f"no entries for layer {plan.name} (unit key {plan.full_spec.key()}){where}: run {build_hint}")


# ------------------------------------------------------------------------------ dense interpolation


def dense_1d(points: Points, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Latency for every count 0..size (index = count) and a mask of the measured counts."""
    xs = np.array(sorted(k[0] for k in points), dtype=float)
    ys = np.array([points[(int(x),)] for x in xs], dtype=float)
    grid = np.arange(size + 1, dtype=float)
    values = np.interp(grid, xs, ys)
    exact = np.zeros(size + 1, dtype=bool)
    exact[[int(x) for x in xs if x <= size]] = True
    return values, exact


def _rows(points: Points) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    rows: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for (x, y), v in points.items():
        rows[x].append((y, v))
    out = {}
    for x, pts in rows.items():
        pts.sort()
        out[x] = (np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float))
    return out


def usable_rows(points: Points) -> tuple[Points, bool]:
    """The points to interpolate from, possibly transposed (True) so that rows hold >= 2 points."""
    rows = _rows(points)
    good = {x for x, (ys, _) in rows.items() if len(ys) >= 2}
    if good:
        return {k: v for k, v in points.items() if k[0] in good}, False
    cols = _rows({(y, x): v for (x, y), v in points.items()})
    good = {y for y, (xs, _) in cols.items() if len(xs) >= 2}
    if good:
        return {(y, x): v for (x, y), v in points.items() if y in good}, True
    return points, False


def dense_2d(points: Points, size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Latency for every (c_in, c_out) in [0..size_in] x [0..size_out], flattened row-major."""
    use, transposed = usable_rows(points)
    n_rows, n_cols = (size_out, size_in) if transposed else (size_in, size_out)
    rows = _rows(use)
    row_x = np.array(sorted(rows), dtype=float)
    col_grid = np.arange(n_cols + 1, dtype=float)
    along = np.stack([np.interp(col_grid, *rows[int(x)]) for x in row_x])  # (rows, n_cols+1)
    row_grid = np.arange(n_rows + 1, dtype=float)
    if len(row_x) == 1:
        values = np.repeat(along, n_rows + 1, axis=0)
    else:
        # interpolate between rows for every column at once
        pos = np.clip(np.searchsorted(row_x, row_grid, side="right") - 1, 0, len(row_x) - 2)
        x0, x1 = row_x[pos], row_x[pos + 1]
        t = np.clip((row_grid - x0) / (x1 - x0), 0.0, 1.0)[:, None]
        values = along[pos] * (1 - t) + along[pos + 1] * t
    if transposed:
        values = values.T
    exact = np.zeros((size_in + 1, size_out + 1), dtype=bool)
    for (x, y), v in points.items():
        if x <= size_in and y <= size_out:
            values[x, y] = v  # measured points that were not used as rows stay exact hits
            exact[x, y] = True
    return values.ravel(), exact.ravel()


# ------------------------------------------------------------------------- slow reference lookup


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    if x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        return float(ys[-1])
    i = bisect.bisect_right(xs, x) - 1
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return float(ys[i] * (1 - t) + ys[i + 1] * t)


def reference_latency(points: Points, values: tuple[int, ...]) -> tuple[float, bool]:
    """One unit's latency at `values` from its points, by a plain per-query computation (no arrays).

    The definition `LatencyModel` must agree with; returns (ms, exact)."""
    if values in points:
        return points[values], True
    if len(values) == 1:
        xs = sorted(k[0] for k in points)
        return _interp(xs, [points[(x,)] for x in xs], values[0]), False
    use, transposed = usable_rows(points)
    q_row, q_col = (values[1], values[0]) if transposed else values
    rows: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for (x, y), v in use.items():
        rows[x].append((y, v))
    row_x = sorted(rows)
    at_row = []
    for x in row_x:
        pts = sorted(rows[x])
        at_row.append(_interp([p[0] for p in pts], [p[1] for p in pts], q_col))
    return _interp(row_x, at_row, q_row), False


# ----------------------------------------------------------------------------------- the model


@dataclass
class Prediction:
    total_ms: float
    units_ms: np.ndarray
    interpolated: int  # units whose configuration was not measured
    units: int


@dataclass
class LatencyModel:
    """Whole-model latency for any channel configuration of one network (`UnitNetwork`) within one scope.

    `predict(channels)`: channels maps a group id to its kept count; groups left out stay full;
    groups outside the scope may only be given at full width.
    """

    graph: UnitNetwork
    scope: str
    plans: list[UnitPlan]
    groups: tuple[int, ...]  # the scope's groups, in the order predict_batch's columns use
    scale: float = 1.0
    offset: float = 0.0
    calibration: dict = field(default_factory=dict)  # how scale/offset were found
    source: str = ""  # the table folder
    statistic: str = "median_ms"  # the stored summary it predicts (STATISTICS)
    lut: np.ndarray = field(default=None, repr=False)  # every unit's latency at every count, concatenated
    exact: np.ndarray = field(default=None, repr=False)  # whether that entry was measured
    points: list = field(default=None, repr=False)  # per plan: the measured points it interpolates
    # index of unit u's entry = base[u] + v @ strides[:, u], with v = kept counts per scope group (+ a 0)
    _base: np.ndarray = field(default=None, repr=False)
    _strides: np.ndarray = field(default=None, repr=False)
    _v0: list = field(default=None, repr=False)
    _full: np.ndarray = field(default=None, repr=False)
    _gpos: dict = field(default=None, repr=False)

    # ------------------------------------------------------------------------------- compile
    @classmethod
    def compile(cls, graph: UnitNetwork, scope: str, rows: Iterable[TableRow], grid: int = DEFAULT_GRID,
                lbound: float = LOWER_BOUND, build_hint: str = DEFAULT_HINT, source: str = "",
                statistic: str = "median_ms") -> "LatencyModel":
        if statistic not in STATISTICS:
            raise AmcError(f"unknown statistic {statistic!r}: expected one of {', '.join(STATISTICS)}")
        plans = unit_plans(graph, scope, grid, lbound)
        groups = tuple(graph.decision_groups(scope))
        gpos = {g: i for i, g in enumerate(groups)}
        sizes = graph.full_channels()
        by_shape = index_by_shape(rows)
        luts, exacts, bases, all_points = [], [], [], []
        strides = np.zeros((len(groups) + 1, len(plans)), dtype=np.int64)
        offset = 0
        for u, plan in enumerate(plans):
            pts = plan_points(plan, by_shape, statistic)
            if not pts:
                raise missing_entries_error(plan, build_hint, source)
            all_points.append(pts)
            if not plan.axes:
                vals, ex = np.array([pts[()]]), np.array([True])
            elif len(plan.axes) == 1:
                vals, ex = dense_1d(pts, sizes[plan.axes[0].group])
                strides[gpos[plan.axes[0].group], u] = 1
            else:
                si, so = (sizes[ax.group] for ax in plan.axes)
                vals, ex = dense_2d(pts, si, so)
                strides[gpos[plan.axes[0].group], u] += so + 1
                strides[gpos[plan.axes[1].group], u] += 1
            luts.append(vals)
            exacts.append(ex)
            bases.append(offset)
            offset += len(vals)
        full = np.array([sizes[g] for g in groups] + [0], dtype=np.int64)
        return cls(graph=graph, scope=scope, plans=plans, groups=groups, source=source, statistic=statistic,
                   lut=np.concatenate(luts), exact=np.concatenate(exacts), points=all_points,
                   _base=np.array(bases, dtype=np.int64), _strides=strides, _v0=full.tolist(), _full=full,
                   _gpos=gpos)

    def set_calibration(self, scale: float, offset: float, facts: dict | None = None) -> None:
        """Use the overhead fit `scale * unit_sum + offset` from now on; `facts` (how it was found) are
        merged into `calibration`."""
        self.scale, self.offset = float(scale), float(offset)
        self.calibration = {**self.calibration, **(facts or {}), "scale": self.scale, "offset": self.offset}

    # ------------------------------------------------------------------------------ lookups
    def _vector(self, channels: Mapping[int, int]) -> list[int]:
        v = self._v0.copy()
        gpos, full = self._gpos, self._v0
        for g, c in channels.items():
            i = gpos.get(g)
            if i is None:
                return self._vector_checked(channels)
            if not 0 < c <= full[i]:
                raise AmcError(f"group {g} keeps {c} channels: must be within 1..{full[i]}")
            v[i] = int(c)
        return v

    def _vector_checked(self, channels: Mapping[int, int]) -> list[int]:
        inside = {}
        sizes = self.graph.full_channels()
        for g, c in channels.items():
            if g in self._gpos:
                inside[g] = c
            elif g not in sizes:
                raise AmcError(f"group {g} is not a channel group of this model")
            elif int(c) != sizes[g]:
                raise AmcError(f"group {g} is outside the latency model's scope {self.scope!r}: it can only stay "
                               f"full ({sizes[g]} channels), not {c}")
        return self._vector(inside)

    def _indices(self, v) -> np.ndarray:
        return self._base + np.dot(v, self._strides)

    def unit_latencies(self, channels: Mapping[int, int] | None = None) -> np.ndarray:
        """Raw table latency (ms) of every unit template, in `graph.units` order (unscaled)."""
        return self.lut.take(self._indices(self._vector(channels or {})))

    def predict_raw(self, channels: Mapping[int, int] | None = None) -> float:
        """Sum of the unit latencies, before the calibrated scale and offset."""
        return float(self.lut.take(self._indices(self._vector(channels or {}))).sum())

    def predict(self, channels: Mapping[int, int] | None = None) -> float:
        """Predicted whole-model latency in ms: scale * sum(unit latencies) + offset."""
        v = self._vector(channels) if channels else self._v0
        return float(self.lut.take(self._base + np.dot(v, self._strides)).sum()) * self.scale + self.offset

    def channel_matrix(self, configs: Sequence[Mapping[int, int]]) -> np.ndarray:
        """(B, len(groups)+1) int matrix for `predict_batch` from channel dicts."""
        if not len(configs):
            return np.zeros((0, len(self._v0)), dtype=np.int64)
        return np.array([self._vector(c) for c in configs], dtype=np.int64)

    def predict_batch(self, configs: Sequence[Mapping[int, int]] | np.ndarray) -> np.ndarray:
        """Predictions for many configurations: channel dicts, or a (B, len(groups)) array of kept
        counts with columns in `self.groups` order."""
        if isinstance(configs, np.ndarray):
            m = np.asarray(configs, dtype=np.int64)
            if m.ndim != 2 or m.shape[1] not in (len(self.groups), len(self.groups) + 1):
                raise AmcError(f"predict_batch wants a (B, {len(self.groups)}) array of kept counts")
            if m.shape[1] == len(self.groups):
                m = np.concatenate([m, np.zeros((m.shape[0], 1), dtype=np.int64)], axis=1)
            bad = (m[:, :-1] < 1) | (m[:, :-1] > self._full[:-1])
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise AmcError(f"row {r}: group {self.groups[c]} keeps {m[r, c]} channels: must be within "
                               f"1..{self._full[c]}")
        else:
            m = self.channel_matrix(list(configs))
        return self.lut.take(self._base + m @ self._strides).sum(axis=1) * self.scale + self.offset

    def detail(self, channels: Mapping[int, int] | None = None) -> Prediction:
        """The prediction with its per-unit parts and how many units were interpolated (not measured)."""
        idx = self._indices(self._vector(channels or {}))
        units = self.lut.take(idx)
        return Prediction(float(units.sum()) * self.scale + self.offset, units, int((~self.exact[idx]).sum()),
                          len(idx))

    def interpolated(self, channels: Mapping[int, int] | None = None) -> int:
        """How many unit lookups of this configuration missed the table (were interpolated)."""
        return int((~self.exact[self._indices(self._vector(channels or {}))]).sum())

    @property
    def full_latency_ms(self) -> float:
        return self.predict({})

    @property
    def unit_names(self) -> list[str]:
        return [p.name for p in self.plans]

    def reference_predict(self, channels: Mapping[int, int] | None = None, raw: bool = False) -> float:
        """The slow path: each unit's spec looked up one by one (`reference_latency`). For tests."""
        channels = dict(channels or {})
        total = 0.0
        sizes = self.graph.full_channels()
        for plan, pts in zip(self.plans, self.points):
            values = tuple(int(channels.get(a.group, sizes[a.group])) for a in plan.axes)
            total += reference_latency(pts, values)[0]
        return total if raw else total * self.scale + self.offset

    def coverage(self) -> list[dict]:
        """Per unit template: its axes and how many of its choice-lattice configurations were measured."""
        out = []
        for plan, pts in zip(self.plans, self.points):
            lattice = plan.lattice()
            measured = sum(1 for v in lattice if v in pts)
            out.append({"unit": plan.name, "key": plan.full_spec.key(), "axes": plan.describe(),
                        "configs": len(lattice), "measured": measured})
        return out
