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
    precisions: dict[str, str] | None = None  # joint search: conv/linear layer -> int8 / fp32

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

    @property
    def constrained(self) -> bool:
        return self.budget is not None

    def fits(self, channels: dict[int, int]) -> bool:
        return self.budget is None or self.cost.predict(channels) <= self.budget * (1 + 1e-9)

    def decide(self, t: int, ratio: float, decided: dict[int, int]) -> int:
        """Kept count of decision layer t for the (clipped) `ratio`, given the earlier decisions."""
        g, c = self.groups[t], self.sizes[t]
        ratio = min(max(float(ratio), self.lbound), self.rbound)
        want = max(round_channels(c, ratio, self.grid), self.grids[t][0])
        if not self.constrained:
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
        self.score = score
        self.wall = self._make_wall(graph, cost, lbound, rbound, grid, reference)
        self._layer_cost = layer_costs(cost, graph, self.groups)
        self._unit_total = float(np.asarray(cost.unit_costs({}), dtype=float).sum()) or 1.0
        self._static = self._static_states()
        self.reset()

    def _make_wall(self, graph: PruningGraph, cost: CostModel, lbound: float, rbound: float, grid: int,
                   reference: float | None) -> ActionWall:
        return ActionWall(graph, self.groups, cost, self.budget, lbound, rbound, grid, reference)

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


# ------------------------------------------------------------------------------------ joint search

PRECISION_STATE = ("is_precision_step", "haq_index", "haq_is_conv", "haq_is_depthwise", "haq_c_in", "haq_c_out",
                   "haq_kernel", "haq_stride", "haq_params")


class JointWall(ActionWall):
    """The action wall at an assumed precision of every unit (`assume`), with an optional exact size wall
    next to the latency one: a configuration fits when it is within both."""

    def __init__(self, graph: PruningGraph, groups: list[int], mixed, budget: float | None, size, size_mb,
                 dtypes: list[str], **kw):
        self.mixed, self.size, self.size_mb, self.dtypes = mixed, size, size_mb, list(dtypes)
        super().__init__(graph, groups, mixed.at(dtypes), budget, **kw)

    @property
    def constrained(self) -> bool:
        return self.budget is not None or self.size_mb is not None

    def assume(self, dtypes: list[str]) -> None:
        self.dtypes, self.cost = list(dtypes), self.mixed.at(dtypes)

    def size_of(self, channels: dict[int, int]) -> float:
        return self.size(channels, self.dtypes)

    def fits(self, channels: dict[int, int]) -> bool:
        return super().fits(channels) and (self.size_mb is None or self.size_of(channels) <= self.size_mb * (1 + 1e-9))


class JointEnv(PruningEnv):
    """APQ's point, on AMC's env: one agent decides each layer's preserve ratio AND its precision.

    Interleaved steps, in forward order over the conv/linear layers: a decision layer gets a ratio step
    (AMC's, its input channels), then every layer a precision step (HAQ's, a >= 0.5 -> fp32). One action
    per step keeps the DDPG agent, its replay buffer and checkpoints as they are (a 2-D action would need
    a second actor output and a critic over both, and a ratio on layers that have none to prune); the state
    says which kind of step it is.

    The wall is the pruning env's, over the mixed cost: every step's choice is the largest (ratio) or the
    fp32 (precision) one whose fastest completion - later groups at the lower bound, every undecided layer
    int8 - is within the latency budget (predicted, `cost.predict_mixed`) and the size budget (exact).
    That completion fits at the start (else an error before any episode) and every step keeps it fitting,
    so every finished policy is within both budgets. Reward: -error of the pruned (reconstructed) model
    after post-training quantization at the chosen precisions.

    State: [is_precision_step, HAQ's static columns of the layer, AMC's static columns of the decision
    layer (zeros on a layer with no ratio), reduced, rest, previous ratio, previous precision].
    """

    def __init__(self, graph: PruningGraph, layers: list[Layer], mixed, budget: float | None,
                 score: Callable[[dict[int, int], dict[str, str]], Score], precision_layers: list[str],
                 unit_dtypes: Callable[[dict[str, str]], list[str]], haq: np.ndarray,
                 size: Callable[[dict[int, int], list[str]], float] | None = None, size_mb: float | None = None,
                 lbound: float = 0.2, rbound: float = 1.0, grid: int = 8, reference: float | None = None):
        if budget is None and size_mb is None:
            raise AmcError("joint search: give a latency budget, a size budget (--size-mb) or both")
        index = {n: i for i, n in enumerate(precision_layers)}
        missing = [l.name for l in layers if l.name not in index]
        if missing:
            raise AmcError(f"joint search: decision layer(s) {', '.join(missing)} are not conv/linear modules of the "
                           f"trace; the joint search needs every pruned layer to be a precision layer")
        order = [index[l.name] for l in layers]
        if order != sorted(order):
            raise AmcError("joint search: the decision layers are not in forward order; use --precision fp32")
        self.precision_layers, self.unit_dtypes, self.haq = list(precision_layers), unit_dtypes, haq
        ratio_of = {index[l.name]: t for t, l in enumerate(layers)}
        self.steps: list[tuple[str, int]] = []
        for i in range(len(precision_layers)):
            if i in ratio_of:
                self.steps.append(("ratio", ratio_of[i]))
            self.steps.append(("precision", i))
        self._decision_of = ratio_of
        self._layer_of_decision = {t: i for i, t in ratio_of.items()}
        self.mixed, self.size, self.size_mb = mixed, size, size_mb
        super().__init__(graph, layers, mixed.at(self._dtypes({})), budget, score, "constrained", lbound, rbound,
                         grid, reference)
        if size_mb is not None and not self.wall.fits(dict(self.wall.lower)):
            raise AmcError(f"size budget {size_mb:.4f} MB cannot be reached: every prunable layer at the lower bound "
                           f"({lbound}) and every layer int8 is {self.wall.size_of(dict(self.wall.lower)):.4f} MB; "
                           f"raise --size-mb or lower --lbound")

    def _make_wall(self, graph, cost, lbound, rbound, grid, reference) -> JointWall:
        try:
            return JointWall(graph, self.groups, self.mixed, self.budget, self.size, self.size_mb, self._dtypes({}),
                             lbound=lbound, rbound=rbound, grid=grid, reference=reference)
        except AmcError as exc:
            raise AmcError(f"{exc} (every layer int8 as well)") from exc

    def _dtypes(self, chosen: dict[str, str]) -> list[str]:
        """Unit dtypes with the undecided layers int8 (the fastest completion)."""
        return self.unit_dtypes({n: chosen.get(n, "int8") for n in self.precision_layers})

    @property
    def n_layers(self) -> int:
        return len(self.steps)

    @property
    def state_dim(self) -> int:
        return 1 + self.haq.shape[1] + N_STATIC + 4

    def _state(self, k: int) -> np.ndarray:
        k = min(k, len(self.steps) - 1)
        kind, idx = self.steps[k]
        i = idx if kind == "precision" else self._layer_of_decision[idx]
        t = self._decision_of.get(i)
        prune = self._static[t] if t is not None else np.zeros(N_STATIC)
        total = self._unit_total
        reduced = (total - float(self.wall.cost.unit_costs(self.decided).sum())) / total if self.decided else 0.0
        rest = float(self._layer_cost[self.t:].sum()) / total
        prev_ratio = self.ratios[-1] if self.ratios else 1.0
        prev_prec = 1.0 if not self.chosen or list(self.chosen.values())[-1] == "fp32" else 0.0
        return np.concatenate([[float(kind == "precision")], self.haq[i], prune,
                               [reduced, rest, prev_ratio, prev_prec]]).astype(np.float32)

    def reset(self) -> np.ndarray:
        self.k = 0
        self.chosen: dict[str, str] = {}
        self.t = 0
        self.decided = {}
        self.actions, self.ratios = [], []
        self.wall.assume(self._dtypes({}))
        return self._state(0)

    def step(self, action: float) -> tuple[np.ndarray | None, bool, Episode | None]:
        kind, idx = self.steps[self.k]
        if kind == "ratio":
            kept = self.wall.decide(self.t, float(action), self.decided)
            self.decided[self.groups[self.t]] = kept
            self.ratios.append(kept / self.wall.sizes[self.t])
            self.t += 1
        else:
            name = self.precision_layers[idx]
            want = "fp32" if action >= 0.5 else "int8"
            if want == "fp32":
                self.wall.assume(self._dtypes({**self.chosen, name: "fp32"}))
                trial = {**self.wall.lower, **self.decided}
                if not self.wall.fits(trial):
                    want = "int8"
            self.chosen[name] = want
            self.wall.assume(self._dtypes(self.chosen))
        self.actions.append(float(action))
        self.k += 1
        if self.k < len(self.steps):
            return self._state(self.k), False, None
        channels, steps = self.wall.fit_budget(self.decided)
        ratios = [channels[g] / c for g, c in zip(self.groups, self.wall.sizes)]
        episode = Episode(list(self.actions), ratios, channels, self.wall.cost.predict(channels), walked_back=steps,
                          precisions=dict(self.chosen))
        if self.size_mb is not None:
            episode.info["size_mb"] = self.wall.size_of(channels)
        episode.score = self.score(channels, dict(self.chosen))
        if episode.score.finite:
            episode.reward = self.reward(episode.score.accuracy, episode.cost)
        return np.zeros(self.state_dim, dtype=np.float32), True, episode
