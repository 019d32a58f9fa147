"""The configuration space a search can reach: channel choices per group, and per unit the lattice of
(c_in, c_out) values it can take.

AMC's rounding: a preserve ratio a in [lbound, 1] keeps max(round(c*a), 1) channels, rounded up to
a multiple of `grid` (down when that exceeds c). So a group of c channels can keep every multiple of
`grid` from that lower bound up to c, plus c itself.

A `UnitPlan` is one unit template of the model seen through a channel scope: 0 axes (the unit
depends on no pruned group: one configuration), 1 axis (one pruned group drives c_in, c_out or both,
as for a depthwise conv) or 2 axes (c_in and c_out follow two different pruned groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from device.errors import AmcError
from .network import UnitNetwork, UnitTemplate

from .units import UnitSpec

DEFAULT_GRID = 8
LOWER_BOUND = 0.2  # AMC's smallest preserve ratio
DEFAULT_COARSE_STEP = 4


def round_channels(size: int, ratio: float, grid: int = DEFAULT_GRID) -> int:
    """AMC's rounding of a preserve ratio to a kept channel count."""
    kept = max(int(round(size * ratio)), 1)
    if grid > 1:
        kept = int(math.ceil(kept / grid) * grid)
        if kept > size:
            kept = (size // grid) * grid or size
    return max(1, min(kept, size))


def channel_choices(size: int, grid: int = DEFAULT_GRID, lbound: float = LOWER_BOUND) -> list[int]:
    """Every kept count the search can produce for a group of `size` channels, ascending."""
    if grid < 1:
        raise AmcError(f"--grid must be >= 1, got {grid}")
    lo = round_channels(size, lbound, grid)
    values = set(range(lo, size + 1, grid)) if grid > 1 else set(range(lo, size + 1))
    values.add(size)
    return sorted(values)


def coarse_indices(n: int, step: int = DEFAULT_COARSE_STEP) -> list[int]:
    """Every `step`-th index plus both ends."""
    if n <= 0:
        return []
    idx = set(range(0, n, max(1, step)))
    idx.add(n - 1)
    return sorted(idx)


@dataclass(frozen=True)
class Axis:
    group: int
    role: str  # "in": drives c_in; "out": drives c_out; "both": c_in = c_out (depthwise, add, pool)
    choices: tuple[int, ...]


@dataclass(frozen=True)
class UnitPlan:
    """One unit template and the axes along which the search moves it."""

    index: int  # position in graph.units
    template: UnitTemplate
    axes: tuple[Axis, ...]

    @property
    def name(self) -> str:
        return self.template.name

    @property
    def full_spec(self) -> UnitSpec:
        return self.template.spec

    def spec_at(self, values: tuple[int, ...]) -> UnitSpec:
        return self.template.at({a.group: v for a, v in zip(self.axes, values)})

    def lattice(self, value_sets: tuple[tuple[int, ...], ...] | None = None) -> list[tuple[int, ...]]:
        sets = value_sets if value_sets is not None else tuple(a.choices for a in self.axes)
        if not sets:
            return [()]
        grids = np.meshgrid(*[np.asarray(s) for s in sets], indexing="ij")
        return [tuple(int(v) for v in vals) for vals in zip(*(g.ravel() for g in grids))]

    def coordinate(self, spec: UnitSpec, axis: Axis) -> int:
        """The axis value (kept count of its group) at which this unit is `spec`; -1 when none is."""
        count = self.template.count_of(spec, "out" if axis.role == "out" else "in")
        return -1 if count is None else count

    def describe(self) -> str:
        if not self.axes:
            return "fixed"
        return " x ".join(f"{a.role}[g{a.group}: {a.choices[0]}..{a.choices[-1]}, {len(a.choices)}]"
                          for a in self.axes)


def unit_plans(graph: UnitNetwork, scope: str, grid: int = DEFAULT_GRID,
               lbound: float = LOWER_BOUND) -> list[UnitPlan]:
    """One plan per unit template, in forward order."""
    groups = set(graph.decision_groups(scope))
    sizes = graph.full_channels()
    plans = []
    for i, t in enumerate(graph.units):
        gi = t.in_group if t.in_group in groups else None
        go = t.out_group if t.out_group in groups else None
        axes: list[Axis] = []
        if gi is not None and gi == go:
            axes.append(Axis(gi, "both", tuple(channel_choices(sizes[gi], grid, lbound))))
        else:
            if gi is not None:
                axes.append(Axis(gi, "in", tuple(channel_choices(sizes[gi], grid, lbound))))
            if go is not None:
                axes.append(Axis(go, "out", tuple(channel_choices(sizes[go], grid, lbound))))
        plans.append(UnitPlan(i, t, tuple(axes)))
    return plans


def all_specs(plans: list[UnitPlan]) -> dict[str, UnitSpec]:
    """Every configuration the plans can produce, deduplicated by unit key."""
    out: dict[str, UnitSpec] = {}
    for p in plans:
        for values in p.lattice():
            s = p.spec_at(values)
            out.setdefault(s.key(), s)
    return out


def random_channels(graph: UnitNetwork, scope: str, rng: np.random.Generator, grid: int = DEFAULT_GRID,
                    lbound: float = LOWER_BOUND) -> dict[int, int]:
    """A random pruned configuration: each group in scope keeps a uniformly drawn choice."""
    out = {}
    sizes = graph.full_channels()
    for g in graph.decision_groups(scope):
        choices = channel_choices(sizes[g], grid, lbound)
        out[g] = int(choices[rng.integers(len(choices))])
    return out


def uniform_channels(graph: UnitNetwork, scope: str, ratio: float, grid: int = DEFAULT_GRID) -> dict[int, int]:
    """Every group in scope pruned to the same preserve ratio (AMC's rounding)."""
    sizes = graph.full_channels()
    return {g: round_channels(sizes[g], ratio, grid) for g in graph.decision_groups(scope)}
