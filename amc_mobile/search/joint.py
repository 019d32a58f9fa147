"""The joint search (`amc-mobile search --precision joint`): what a run prepares for it beyond the pruning
search (the int8 latency table of the same network, the precision map, HAQ's layer states, the size cost,
the calibration images, the scorer that quantizes) and the quantized model a policy deploys as.

The episode loop, the agent, the reconstruction, the measured wall and the export are the pruning search's
own (loop.py, export.py); `env.JointEnv` is the pruning env with a precision step per layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from amc_mobile.data import Split
from device import example_input
from device.quantize import QuantizedModel, QuantPolicy, quantize_model

from .cost import MixedLatencyCost, SizeCost, pick_by_dtype
from .env import JointEnv, Score
from .reconstruct import PrunedModelBuilder
from .score import evaluate_split


def quant_policy(precisions: dict[str, str]) -> QuantPolicy:
    """A joint policy's precisions as the quantizer takes them (every conv/linear layer named)."""
    return QuantPolicy("fp32", dict(precisions))


class QuantScorer:
    """(channels, precisions) -> Score: the pruned model with its reconstructed weights, quantized by PT2E at
    the precisions (calibrated on training images), evaluated on the validation images. Cached per policy.
    On the CPU: the converted graph's quantize/dequantize ops are the reference kernels."""

    def __init__(self, builder: PrunedModelBuilder, val: Split, calibration: torch.Tensor, metric: str = "top1",
                 batch_size: int | None = None):
        self.builder, self.val, self.calibration = builder, val, calibration
        self.metric, self.batch_size = metric, batch_size
        self._cache: dict[tuple, tuple[float, float]] = {}
        self._deployed: dict[tuple, QuantizedModel] = {}

    @staticmethod
    def _key(channels: dict[int, int], precisions: dict[str, str]) -> tuple:
        return tuple(sorted((int(g), int(c)) for g, c in channels.items())), tuple(sorted(precisions.items()))

    def quantized(self, channels: dict[int, int], precisions: dict[str, str], check_delegation: bool = False
                  ) -> QuantizedModel:
        """The policy's quantized model; `check_delegation` (what deploys: an int8 layer XNNPACK would not
        delegate stays fp32) costs a lowering, so those are kept: the measured wall's pick is the export."""
        key = self._key(channels, precisions)
        if check_delegation and key in self._deployed:
            return self._deployed[key]
        model = self.builder.build(channels).eval()
        qm = quantize_model(model, example_input(model.input_shape), self.calibration, quant_policy(precisions),
                            check_delegation=check_delegation)
        if check_delegation:
            self._deployed[key] = qm
        return qm

    def __call__(self, channels: dict[int, int], precisions: dict[str, str]) -> Score:
        key = self._key(channels, precisions)
        if key in self._cache:
            return Score(*self._cache[key])
        t0 = time.perf_counter()
        with torch.no_grad():
            qm = self.quantized(channels, precisions)
        t1 = time.perf_counter()
        acc, loss = evaluate_split(qm.module, self.val, self.metric, self.batch_size, "cpu")
        self._cache[key] = (acc, loss)
        return Score(acc, loss, prune_s=t1 - t0, eval_s=time.perf_counter() - t1)


@dataclass
class JointSetup:
    """What the joint search adds to `SearchSetup`."""

    int8: object  # the int8 LatencyModel of the same network and scope (`table build --dtype int8` rows)
    layers: list[str]  # conv/linear modules, forward order: one precision step each
    unit_dtypes: Callable[[dict[str, str]], list[str]]  # {layer: precision} -> one dtype per graph unit
    haq: np.ndarray  # HAQ's static state per layer
    size: Callable[[dict[int, int], list[str]], float]  # (channels, unit dtypes) -> MB
    size_mb: float | None
    scorer: QuantScorer

    def size_of(self, channels: dict[int, int], precisions: dict[str, str]) -> float:
        return self.size(channels, self.unit_dtypes(precisions))


def prepare_joint(model: nn.Module, graph, int8_latency, builder: PrunedModelBuilder, val: Split,
                  calibration: torch.Tensor, size_mb: float | None, metric: str, batch_size: int) -> JointSetup:
    from amc_mobile.precision import PrecisionMap

    from .precision_search import haq_states, policy_of

    pmap = PrecisionMap(model, graph)
    layers = pmap.layers
    fp32_size, int8_size = SizeCost(graph, "fp32"), SizeCost(graph, "int8")

    def unit_dtypes(precisions: dict[str, str]) -> list[str]:
        return pmap.unit_dtypes(policy_of(layers, [precisions[n] for n in layers]))

    def size(channels: dict[int, int], dtypes: list[str]) -> float:
        return float(pick_by_dtype(fp32_size.unit_costs(channels), int8_size.unit_costs(channels), dtypes).sum())

    return JointSetup(int8_latency, layers, unit_dtypes, haq_states(model, layers), size, size_mb,
                      QuantScorer(builder, val, calibration, metric, batch_size))


def make_joint_env(setup) -> JointEnv:
    """The joint env over a prepared `SearchSetup` (its fp32 LatencyCost, recalibrated, and the int8 table)."""
    cfg, joint = setup.config, setup.joint
    mixed = MixedLatencyCost(setup.cost.model, joint.int8, ["fp32"] * len(setup.graph.units))
    return JointEnv(setup.graph, setup.layers, mixed, setup.budget, joint.scorer, joint.layers, joint.unit_dtypes,
                    joint.haq, joint.size, joint.size_mb, cfg.lbound, cfg.rbound, cfg.channel_round,
                    reference=setup.info.get("original_measured_ms"))
