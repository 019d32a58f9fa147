"""The pruning environment: one episode = one preserve ratio per decision layer, then one score.

AMC's rules, with the cost coming from any `CostModel` (table latency, FLOPs, params):

- **rounding**: kept = max(round(c*a), 1), rounded UP to a multiple of the grid (8), DOWN to one
  if that exceeds c (c itself when c is smaller than the grid). `round_channels`.
- **action wall** (constrained mode): the kept count of layer t is the largest grid count, not above
  the one the action asks for, whose predicted total - decided groups as decided, this group at
  that count, undecided later groups at the lower bound - fits the budget. With a linear cost this
  is AMC's a_max = (budget - other) / this; with a table latency it is the same idea, searched on
  the grid. Because the wall works on grid counts, rounding cannot push a policy over the budget
  afterwards; `fit_budget` (HAQ's "final wall": one grid step at a time, best cost per channel
  first) still runs after the last layer so that a non-monotone cost cannot either.
- **reward**: constrained `-error`; accuracy-guaranteed `-error * log(cost in base units)`.
- **state** per layer (min-max normalised per column across layers, as the official code):
  index, type, c_in, c_out, stride, kernel, H*W, FLOPs, the layer's cost at full width on the
  target, then the dynamic part: cost reduced so far, cost of the later layers (both fractions of
  the full model's sum of unit costs: one scale, untouched by calibration), previous preserve ratio.

Scoring the pruned model is delegated to a callable (`score(channels) -> Score`), so the env
holds no model and can be tested with any cost model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from amc_mobile.errors import AmcError
from amc_mobile.pruning.graph import Layer, PruningGraph

from .cost import CostModel, layer_costs

STATE_COLUMNS = ("index", "is_conv", "c_in", "c_out", "stride", "kernel", "hw", "flops", "full_cost",
                 "reduced", "rest", "prev_ratio")
N_STATIC = 9


def round_channels(c: int, ratio: float, grid: int = 8) -> int:
    """AMC's rounding of a preserve ratio to a kept channel count (see module doc)."""
    kept = max(int(round(c * float(ratio))), 1)
    if grid > 1:
        up = -(-kept // grid) * grid
        if up > c:
            up = (c // grid) * grid or c
        kept = up
    return min(kept, c)


def grid_counts(c: int, lbound: float, rbound: float = 1.0, grid: int = 8) -> list[int]:
    """Every kept count a ratio in [lbound, rbound] can round to, ascending."""
    lo, hi = round_channels(c, lbound, grid), round_channels(c, rbound, grid)
    if grid <= 1:
        return list(range(lo, hi + 1))
    counts = {lo, hi} | set(range(-(-lo // grid) * grid, hi + 1, grid))
    return sorted(x for x in counts if lo <= x <= hi)


@dataclass
class Score:
    """What evaluating one pruned model gave; NaN accuracy or loss discards the episode."""

    accuracy: float
    loss: float
    prune_s: float = 0.0
    eval_s: float = 0.0

    @property
    def finite(self) -> bool:
        return math.isfinite(self.accuracy) and math.isfinite(self.loss)


@dataclass
class Episode:
    """The outcome of one episode."""

    actions: list[float]  # what the agent emitted
    ratios: list[float]  # kept / size, after the wall, rounding and walk-back
    channels: dict[int, int]  # decision group -> kept channels
    cost: float  # predicted
    score: Score | None = None
    reward: float | None = None  # None: discarded (NaN)
    walked_back: int = 0  # grid steps the final wall removed
    info: dict = field(default_factory=dict)

    @property
    def discarded(self) -> bool:
        return self.reward is None


class ActionWall:
    """Budget-keeping decisions over a cost model; pure functions of the decided channels."""

    def __init__(self, graph: PruningGraph, groups: list[int], cost: CostModel, budget: float | None,
                 lbound: float = 0.2, rbound: float = 1.0, grid: int = 8, reference: float | None = None):
        """`reference`: the original's cost that targets are fractions of (default the predicted full cost;
        the search passes the measured latency); only used to word the unreachable-budget error."""
        self.graph, self.groups, self.cost, self.budget = graph, list(groups), cost, budget
        self.lbound, self.rbound, self.grid = lbound, rbound, grid
        self.sizes = [graph.groups[g].size for g in self.groups]
        self.grids = [grid_counts(c, lbound, rbound, grid) for c in self.sizes]
        self.lower = {g: gc[0] for g, gc in zip(self.groups, self.grids)}
        self.min_cost = cost.predict(dict(self.lower))
        if budget is not None and self.min_cost > budget * (1 + 1e-9):
            unit = cost.unit
            ref = reference or cost.full_cost
            what = "original" if reference is None else "original (measured)"
            raise AmcError(
                f"the budget {budget:.4g} {unit} ({budget / ref:.1%} of the {what} {ref:.4g} {unit}) cannot be "
                f"reached: with every prunable layer at the lower bound ({lbound}) the minimum reachable cost is "
                f"{self.min_cost:.4g} {unit} ({self.min_cost / ref:.1%}); raise the target to at least "
                f"{math.ceil(self.min_cost / ref * 1000) / 1000:.3f} of the original (or {self.min_cost:.4g} {unit}) "
                f"or lower --lbound")

    def fits(self, channels: dict[int, int]) -> bool:
        return self.budget is None or self.cost.predict(channels) <= self.budget * (1 + 1e-9)

    def decide(self, t: int, ratio: float, decided: dict[int, int]) -> int:
        """Kept count of decision layer t for the (clipped) `ratio`, given the earlier decisions."""
        g, c = self.groups[t], self.sizes[t]
        ratio = min(max(float(ratio), self.lbound), self.rbound)
        want = max(round_channels(c, ratio, self.grid), self.grids[t][0])
        if self.budget is None:
            return want
        trial = dict(decided)
        for later in self.groups[t + 1 :]:
            trial[later] = self.lower[later]
        for count in reversed([x for x in self.grids[t] if x <= want]):
            trial[g] = count
            if self.fits(trial):
                return count
        return self.grids[t][0]  # nothing fits: the final wall will walk back the rest

    def fit_budget(self, channels: dict[int, int]) -> tuple[dict[int, int], int]:
        """HAQ's final wall: remove one grid step at a time from the group with the best predicted
        saving per channel until the prediction fits. Returns (channels, steps taken)."""
        channels = dict(channels)
        if self.budget is None:
            return channels, 0
        steps = 0
        current = self.cost.predict(channels)
        while current > self.budget * (1 + 1e-9):
            best = None
            for t, g in enumerate(self.groups):
                lower = [x for x in self.grids[t] if x < channels[g]]
                if not lower:
                    continue
                trial = dict(channels)
                trial[g] = lower[-1]
                after = self.cost.predict(trial)
                per_channel = (current - after) / (channels[g] - lower[-1])
                if best is None or per_channel > best[0]:
                    best = (per_channel, g, lower[-1], after)
            if best is None:
                raise AmcError(f"cannot bring the predicted cost {current:.4g} {self.cost.unit} under the budget "
                               f"{self.budget:.4g}: every layer is at its lower bound")
            _, g, channels[g], current = best
            steps += 1
        return channels, steps


class PruningEnv:
    """AMC's episode: `reset()` -> state; `step(action)` -> (next state, done, episode or None)."""

    def __init__(self, graph: PruningGraph, layers: list[Layer], cost: CostModel, budget: float | None,
                 score: Callable[[dict[int, int]], Score], reward: str = "constrained",
                 lbound: float = 0.2, rbound: float = 1.0, grid: int = 8, reference: float | None = None):
        if not layers:
            raise AmcError("no decision layers: the model has nothing the search may prune in this scope")
        if reward not in ("constrained", "guaranteed"):
            raise AmcError(f"unknown reward {reward!r}: constrained or guaranteed")
        self.graph, self.layers, self.cost = graph, list(layers), cost
        self.groups = [l.in_group for l in self.layers]
        self.reward_mode = reward
        self.budget = budget if reward == "constrained" else None
        self.wall = ActionWall(graph, self.groups, cost, self.budget, lbound, rbound, grid, reference)
        self.score = score
        self._layer_cost = layer_costs(cost, graph, self.groups)
        self._unit_total = float(np.asarray(cost.unit_costs({}), dtype=float).sum()) or 1.0
        self._static = self._static_states()
        self.reset()

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def state_dim(self) -> int:
        return len(STATE_COLUMNS)

    def _static_states(self) -> np.ndarray:
        rows = [[t, 1.0 if l.kind == "conv" else 0.0, l.c_in, l.c_out, l.stride, l.kernel, l.h_in * l.w_in, l.flops,
                 self._layer_cost[t]] for t, l in enumerate(self.layers)]
        s = np.asarray(rows, dtype=float)
        lo, hi = s.min(axis=0), s.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        return (s - lo) / span

    def _state(self, t: int) -> np.ndarray:
        # One scale for both (issue 19): fractions of the full model's unit sum, before any calibration.
        # `rest` is a sum of raw unit costs; dividing it by the calibrated total made it ~2.4x too large
        # with the shipped table and moved it with every session refit, while `reduced` did not.
        total = self._unit_total
        reduced = (total - float(self.cost.unit_costs(self.decided).sum())) / total if self.decided else 0.0
        rest = float(self._layer_cost[t + 1 :].sum()) / total
        prev = self.ratios[-1] if self.ratios else 1.0
        return np.concatenate([self._static[t], [reduced, rest, prev]]).astype(np.float32)

    def reset(self) -> np.ndarray:
        self.t = 0
        self.decided: dict[int, int] = {}
        self.actions: list[float] = []
        self.ratios: list[float] = []
        return self._state(0)

    def step(self, action: float) -> tuple[np.ndarray | None, bool, Episode | None]:
        t = self.t
        kept = self.wall.decide(t, float(action), self.decided)
        g = self.groups[t]
        self.decided[g] = kept
        self.actions.append(float(action))
        self.ratios.append(kept / self.wall.sizes[t])
        self.t += 1
        if self.t < self.n_layers:
            return self._state(self.t), False, None
        channels, steps = self.wall.fit_budget(self.decided)
        ratios = [channels[g] / c for g, c in zip(self.groups, self.wall.sizes)]
        episode = Episode(list(self.actions), ratios, channels, self.cost.predict(channels), walked_back=steps)
        episode.score = self.score(channels)
        if episode.score.finite:
            episode.reward = self.reward(episode.score.accuracy, episode.cost)
        # The terminal next-state is never bootstrapped from (done=1); a zero state keeps shapes simple.
        return np.zeros(self.state_dim, dtype=np.float32), True, episode

    def reward(self, accuracy: float, cost: float) -> float:
        error = 1.0 - accuracy
        if self.reward_mode == "constrained":
            return -error
        return -error * math.log(max(cost * self.cost.scale, math.e))
