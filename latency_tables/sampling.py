"""Adaptive sampling: which unit configurations to measure, round by round.

Per unit plan and axis, a set of choice indices is "in the lattice"; every configuration of the
lattice (the product of the axes' sets) gets measured. Round 0 puts every `coarse_step`-th choice
plus both ends in. Each later round probes the midpoint of every interval still flagged: the
probe is a whole lattice line (one point for a 1-axis plan), so the lattice stays complete and
bilinear interpolation stays well defined. When linear interpolation between the interval's ends
misses the measured probe by more than `tolerance` (relative), both halves are flagged for the next
round; otherwise the interval is done. Bisection ends at the grid step.

The sampler only looks at measured values, so a resumed build replays the same decisions from the
stored rows and measures only what is still missing.

Measured on `local` (XNNPACK, x86): along OUTPUT channels latency is a staircase or a zigzag, not a
line (ResNet-20's 3x3 convs at 7x7 cost the same for 40 and 64 output channels; MobileNet-V2's 1x1
expansions at 28x28 cost up to ~35% more at odd multiples of 8 than at the next multiple of 16), while
along input channels it is close to linear. Interpolating between the coarse points alone misses
the other grid points by ~5% (median) and ~25% (90th percentile) per unit there, so refinement
matters: it ended up measuring 75% (MobileNet-V2) to 93% (ResNet-20) of the grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .space import DEFAULT_COARSE_STEP, UnitPlan, coarse_indices
from .units import UnitSpec

DEFAULT_TOLERANCE = 0.05


@dataclass
class _AxisState:
    sets: set[int]
    pending: list[tuple[int, int]] = field(default_factory=list)
    probing: list[tuple[int, int, int]] = field(default_factory=list)


class AdaptiveSampler:
    def __init__(self, plans: list[UnitPlan], coarse_step: int = DEFAULT_COARSE_STEP,
                 tolerance: float = DEFAULT_TOLERANCE, refine: bool = True):
        self.plans = plans
        self.tolerance = float(tolerance)
        self.refine = refine
        self.round = 0
        self.refined_intervals = 0  # probes that missed: their halves were refined
        self.probes = 0
        self._state: list[list[_AxisState]] = []
        for p in plans:
            axes = []
            for a in p.axes:
                idx = coarse_indices(len(a.choices), coarse_step)
                pending = [(i0, i1) for i0, i1 in zip(idx, idx[1:]) if i1 - i0 >= 2] if refine else []
                axes.append(_AxisState(set(idx), pending))
            self._state.append(axes)
        self._started = False

    # ----------------------------------------------------------------------------------------
    def _values(self, plan: UnitPlan, st: list[_AxisState]) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(plan.axes[k].choices[i] for i in sorted(s.sets)) for k, s in enumerate(st))

    def lattice_specs(self) -> list[UnitSpec]:
        """Every configuration of every plan's current lattice, deduplicated, most useful first:
        each plan's full-width point, then its smallest, then the rest."""
        ranked: dict[str, tuple[tuple[int, int], UnitSpec]] = {}
        for pi, (plan, st) in enumerate(zip(self.plans, self._state)):
            sets = self._values(plan, st)
            top = tuple(a.choices[-1] for a in plan.axes)
            bottom = tuple(a.choices[0] for a in plan.axes)
            for values in plan.lattice(sets):
                level = 0 if values == top else 1 if values == bottom else 2
                spec = plan.spec_at(values)
                rank = (level, pi)
                key = spec.key()
                if key not in ranked or rank < ranked[key][0]:
                    ranked[key] = (rank, spec)
        return [spec for _, spec in sorted(ranked.values(), key=lambda r: r[0])]

    def next_round(self, values: Mapping[str, float]) -> list[UnitSpec] | None:
        """The configurations to measure next (some may be measured already: callers skip those),
        or None when sampling is complete. `values`: unit key -> median ms of everything measured."""
        if not self._started:
            self._started = True
            return self.lattice_specs()
        self._evaluate(values)
        scheduled = False
        for plan, st in zip(self.plans, self._state):
            for s in st:
                for i0, i1 in s.pending:
                    if i1 - i0 < 2:
                        continue
                    m = (i0 + i1) // 2
                    s.probing.append((i0, m, i1))
                    s.sets.add(m)
                    scheduled = True
                s.pending = []
        if not scheduled:
            return None
        self.round += 1
        return self.lattice_specs()

    def _evaluate(self, values: Mapping[str, float]) -> None:
        for plan, st in zip(self.plans, self._state):
            for k, s in enumerate(st):
                if not s.probing:
                    continue
                # the other axis's lattice values (none for a 1-axis plan)
                others = [[plan.axes[j].choices[i] for i in sorted(st[j].sets)] for j in range(len(st)) if j != k]
                for probe in s.probing:
                    self.probes += 1
                    err = self._probe_error(plan, k, probe, others[0] if others else [None], values)
                    if err is not None and err > self.tolerance:
                        self.refined_intervals += 1
                        i0, m, i1 = probe
                        s.pending += [(a, b) for a, b in ((i0, m), (m, i1)) if b - a >= 2]
                s.probing = []

    @staticmethod
    def _probe_error(plan: UnitPlan, k: int, probe: tuple[int, int, int], others: list,
                     values: Mapping[str, float]) -> float | None:
        """Worst relative miss of linear interpolation at the probe, over the other axis's values."""
        i0, m, i1 = probe
        choices = plan.axes[k].choices
        x0, xm, x1 = choices[i0], choices[m], choices[i1]
        t = (xm - x0) / (x1 - x0)

        def at(x: int, w) -> float | None:
            vals = (x,) if w is None else ((x, w) if k == 0 else (w, x))
            return values.get(plan.spec_at(vals).key())

        worst = None
        for w in others:
            v0, vm, v1 = at(x0, w), at(xm, w), at(x1, w)
            if v0 is None or vm is None or v1 is None or vm <= 0:
                continue  # a configuration that failed to measure: nothing to judge
            err = abs(v0 + t * (v1 - v0) - vm) / vm
            worst = err if worst is None else max(worst, err)
        return worst
