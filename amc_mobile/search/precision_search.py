"""Stage two of the two-stage pipeline: after AMC prunes, a second DDPG agent (the same `DDPGAgent`)
chooses each conv/linear layer's precision, int8 or fp32, under a latency budget.

- **state** per layer, HAQ's (Wang et al., CVPR 2019): index, conv or linear, depthwise, c_in, c_out,
  kernel, stride, params (min-max normalised per column across layers), then the previous action.
- **action** a in [0, 1]: fp32 when a >= 0.5, int8 below (HAQ rounds a continuous action to a bit width;
  XNNPACK offers two widths here).
- **budgets**: measured latency (the default), model size in MB (the seed pipeline's target: the weights as
  the `.pte` stores them, `cost.model_size_mb`: exact, so its wall is exact), or both (both walls hold).
- **action wall**, as the pruning env's: layer t gets fp32 only if the policy so far, this layer fp32 and
  every later layer int8 (the fastest and smallest completion) is within every budget; otherwise int8.
  So every finished policy is within the budgets (latency as predicted), and a budget below the all-int8
  prediction or size is refused before any episode.
- **cost**: the model's fused units at their dtypes (`amc_mobile/precision.py`; int8 units measured taking
  and returning int8) plus a quantize or dequantize per fp32<->int8 edge the policy creates, each unit and
  edge measured standalone on the device, then scale and offset fitted on the measured fp32 and all-int8
  models (`predict_mixed`). How well that predicts mixed models is measured in docs/BENCHMARKS.md
  (benchmarks/mixed_precision_validate.py).
- **reward**: -error of the quantized model (PT2E, calibrated on training images) on validation images.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.precision import PrecisionMap, mixed_units, predict_mixed
from amc_mobile.pruning.graph import PruningGraph
from device.quantize import QuantPolicy
from latency_tables.calibrate import fit_overhead

from .agent import DDPGAgent
from .config import DDPGConfig

HAQ_STATE = ("index", "is_conv", "is_depthwise", "c_in", "c_out", "kernel", "stride", "params", "prev_action")


@dataclass
class UnitCosts:
    """Measured ms of each unit and edge a policy can use (keys: UnitSpec.key()), and the overhead fit."""

    ms: dict[str, float]
    pmap: PrecisionMap
    graph: PruningGraph
    scale: float = 1.0
    offset: float = 0.0

    def unit_sum(self, policy: QuantPolicy) -> float:
        return predict_mixed(self.ms, self.pmap, self.graph, policy)

    def total(self, policy: QuantPolicy) -> float:
        """Predicted ms of the model under `policy`."""
        return predict_mixed(self.ms, self.pmap, self.graph, policy, scale=self.scale, offset=self.offset)


MODEL_KEYS = {"fp32": "model-fp32", "int8": "model-int8"}  # the whole models the overhead is fitted on


def measure_unit_costs(model: nn.Module, graph: PruningGraph, device, config, path: Path) -> UnitCosts:
    """Every unit at fp32 and int8, the q/dq of every possible edge, and the whole model at fp32 and all-int8,
    measured in one batch on `device` (unless `path` already holds them: a rerun measures nothing again).
    Rows are written as the batch returns."""
    from device import Candidate
    from device.quantize import quantize_model

    pmap = PrecisionMap(model, graph)
    have: dict[str, float] = {}
    if path.exists():
        with open(path) as f:
            have = {r["key"]: float(r["median_ms"]) for r in csv.DictReader(f)}
    specs = {}
    for policy in (QuantPolicy("fp32"), QuantPolicy("int8")):
        specs.update({s.key(): s for s in mixed_units(pmap, graph, policy)})
    for t in pmap.edge_units:
        specs.setdefault(t.spec.key(), t.spec)
    todo = [k for k in [*specs, *MODEL_KEYS.values()] if k not in have]
    if todo:
        x = torch.randn(1, *graph.input_shape, generator=torch.Generator().manual_seed(0))
        cands = []
        for i, k in enumerate(todo):
            if k == MODEL_KEYS["fp32"]:
                cands.append(Candidate(f"c{i}", model, x))
            elif k == MODEL_KEYS["int8"]:
                # random calibration images: the ranges change the values, not the kernels' speed
                calib = torch.randn(16, *graph.input_shape, generator=torch.Generator().manual_seed(1))
                cands.append(Candidate(f"c{i}", quantize_model(model, x, calib, QuantPolicy("int8")).module, x))
            else:
                cands.append(Candidate(f"c{i}", *specs[k].build()))
        results = device.measure(cands, config)
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["key", "median_ms"])
            for k, s in zip(todo, results):
                if s.ok:
                    w.writerow([k, f"{s.median_ms:.6f}"])
                    have[k] = s.median_ms
            f.flush()
            os.fsync(f.fileno())
        failed = [(k, s.error) for k, s in zip(todo, results) if not s.ok]
        if failed:
            raise AmcError(f"{len(failed)} unit(s) failed to measure, first {failed[0][0]}: {failed[0][1]}")
    costs = UnitCosts(have, pmap, graph)
    fit = fit_overhead([costs.unit_sum(QuantPolicy(d)) for d in MODEL_KEYS],
                       [have[k] for k in MODEL_KEYS.values()])
    costs.scale, costs.offset = fit.scale, fit.offset
    return costs


def haq_states(model: nn.Module, layers: list[str]) -> np.ndarray:
    """Static HAQ state per layer, min-max normalised per column (the previous action is appended per step)."""
    modules = dict(model.named_modules())
    rows = []
    for i, name in enumerate(layers):
        m = modules[name]
        params = sum(p.numel() for p in m.parameters())
        if isinstance(m, nn.Linear):
            rows.append([i, 0.0, 0.0, m.in_features, m.out_features, 1, 1, params])
        else:
            dw = float(m.groups > 1 and m.groups == m.in_channels)
            rows.append([i, 1.0, dw, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], params])
    rows = np.array(rows, dtype=float)
    lo, hi = rows.min(0), rows.max(0)
    return (rows - lo) / np.where(hi > lo, hi - lo, 1.0)


@dataclass
class PrecisionEpisode:
    precisions: list[str]
    predicted_ms: float  # NaN without a latency budget
    accuracy: float
    reward: float
    size_mb: float = float("nan")  # NaN without a size budget


@dataclass
class PrecisionEnv:
    """One episode = one precision per layer (forward order), then one score. `cost`/`budget_ms` (latency)
    and `size`/`size_mb` (model size) are the two walls; either may be None, not both."""

    layers: list[str]  # layer (module) names, forward order
    static: np.ndarray  # haq_states
    cost: Callable[[dict[str, str]], float] | None  # {layer: precision} -> predicted ms
    budget_ms: float | None
    score: Callable[[dict[str, str]], float]  # {layer: precision} -> top-1
    size: Callable[[dict[str, str]], float] | None = None  # {layer: precision} -> MB
    size_mb: float | None = None
    _chosen: dict[str, str] = field(default_factory=dict)
    _prev: float = 1.0

    def __post_init__(self) -> None:
        if self.budget_ms is None and self.size_mb is None:
            raise AmcError("precision search: give a latency budget, a size budget (MB) or both")
        smallest = {n: "int8" for n in self.layers}
        if self.budget_ms is not None:
            fastest = self.cost(smallest)
            if fastest > self.budget_ms:
                raise AmcError(f"latency budget {self.budget_ms:.3f} ms is below the all-int8 prediction "
                               f"{fastest:.3f} ms: raise the budget or prune more first")
        if self.size_mb is not None:
            least = self.size(smallest)
            if least > self.size_mb * (1 + 1e-12):
                raise AmcError(f"size budget {self.size_mb:.4f} MB is below the all-int8 size {least:.4f} MB: "
                               f"raise it or prune more first")

    def fits(self, choice: dict[str, str]) -> bool:
        return ((self.budget_ms is None or self.cost(choice) <= self.budget_ms)
                and (self.size_mb is None or self.size(choice) <= self.size_mb * (1 + 1e-12)))

    @property
    def state_dim(self) -> int:
        return self.static.shape[1] + 1

    def _state(self, t: int) -> np.ndarray:
        return np.append(self.static[min(t, len(self.layers) - 1)], self._prev).astype(np.float32)

    def reset(self) -> np.ndarray:
        self._chosen, self._prev = {}, 1.0
        return self._state(0)

    def step(self, action: float):
        t = len(self._chosen)
        name = self.layers[t]
        want = "fp32" if action >= 0.5 else "int8"
        if want == "fp32" and not self.fits({**{n: "int8" for n in self.layers}, **self._chosen, name: "fp32"}):
            want = "int8"  # the wall
        self._chosen[name] = want
        self._prev = 1.0 if want == "fp32" else 0.0
        done = len(self._chosen) == len(self.layers)
        if not done:
            return self._state(t + 1), False, None
        policy = dict(self._chosen)
        acc = self.score(policy)
        nan = float("nan")
        ep = PrecisionEpisode([policy[n] for n in self.layers], self.cost(policy) if self.cost else nan, acc,
                              -(1.0 - acc), self.size(policy) if self.size else nan)
        return self._state(t), True, ep


def search_precision(env: PrecisionEnv, episodes: int, warmup: int, seed: int = 0,
                     agent_config: DDPGConfig | None = None,
                     on_episode: Callable[[int, PrecisionEpisode], None] | None = None) -> PrecisionEpisode:
    """The AMC loop with the AMC agent: warm-up episodes at random, then the actor plus decaying noise; every
    transition of an episode gets its reward. Returns the best episode."""
    if episodes < 1 or not 0 <= warmup <= episodes:
        raise AmcError(f"--episodes must be >= 1 and --warmup between 0 and --episodes (got {episodes}, {warmup})")
    agent = DDPGAgent(env.state_dim, len(env.layers), agent_config or DDPGConfig(), seed)
    best = None
    for e in range(episodes):
        s = env.reset()
        sigma = agent.sigma(e, warmup)
        trans = []
        while True:
            a = agent.random_action() if e < warmup else agent.select_action(s, sigma)
            s2, done, ep = env.step(a)
            trans.append((s, a, s2, done))
            s = s2
            if done:
                break
        if math.isfinite(ep.reward):
            for s_, a_, s2_, d_ in trans:
                agent.observe(s_, a_, ep.reward, s2_, d_)
                if e >= warmup:
                    agent.update()
            if best is None or ep.reward > best.reward:
                best = ep
        if on_episode is not None:
            on_episode(e, ep)
    if best is None:
        raise AmcError("every episode's accuracy was NaN: nothing to choose from")
    return best


def policy_of(layers: list[str], precisions: list[str]) -> QuantPolicy:
    return QuantPolicy("fp32", dict(zip(layers, precisions)))


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def make_env(model: nn.Module, graph: PruningGraph, costs: UnitCosts | None, budget_ms: float | None,
             score: Callable[[dict[str, str]], float], size_mb: float | None = None) -> PrecisionEnv:
    """The env over every conv/linear module of the trace (depthwise convs included: they have an int8 form);
    `costs`/`budget_ms` the latency wall, `size_mb` the size wall (either may be None)."""
    from amc_mobile.precision import units_at

    from .cost import model_size_mb

    pmap = costs.pmap if costs is not None else PrecisionMap(model, graph)
    layers = pmap.layers

    def policy(choice: dict[str, str]) -> QuantPolicy:
        return policy_of(layers, [choice[n] for n in layers])

    def cost(choice: dict[str, str]) -> float:
        return costs.total(policy(choice))

    def size(choice: dict[str, str]) -> float:
        return model_size_mb(units_at(graph, pmap.unit_dtypes(policy(choice))))

    return PrecisionEnv(layers, haq_states(model, layers), cost if budget_ms is not None else None, budget_ms, score,
                        size if size_mb is not None else None, size_mb)


def policy_size_mb(model: nn.Module, graph: PruningGraph, policy: QuantPolicy) -> float:
    """The weights of `model` (full width of `graph`) under `policy`, in MB (`cost.model_size_mb`)."""
    from amc_mobile.precision import units_at

    from .cost import model_size_mb

    return model_size_mb(units_at(graph, PrecisionMap(model, graph).unit_dtypes(policy)))
