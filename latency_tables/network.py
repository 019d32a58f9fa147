"""What a latency table knows of a network: its fused units at full width and the channel groups
their counts follow. The model side (`amc_mobile.pruning.graph`) builds it; the tables never look
at modules or pruning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from device.base import example_input
from device.files import config_hash

from .units import UnitSpec

__all__ = ["UnitTemplate", "UnitNetwork", "UnitsOn", "Target", "model_hash", "require_target"]


@dataclass(frozen=True)
class UnitTemplate:
    """A fused unit at full width, with the groups its channel counts follow:
    c_in = in_base + in_coef * kept[in_group] (and the same for c_out). A side that follows no
    group keeps the spec's count."""

    name: str
    spec: UnitSpec
    in_group: int | None
    out_group: int | None
    in_coef: int = 1
    out_coef: int = 1
    in_base: int = 0
    out_base: int = 0

    def at(self, channels: dict[int, int]) -> UnitSpec:
        c_in = self.spec.c_in if self.in_group not in channels else self.in_base + self.in_coef * channels[self.in_group]
        c_out = self.spec.c_out if self.out_group not in channels else \
            self.out_base + self.out_coef * channels[self.out_group]
        return self.spec.with_channels(c_in, c_out)

    def at_counts(self, kept_in: int, kept_out: int) -> UnitSpec:
        """The unit when its input group keeps `kept_in` and its output group `kept_out` (a unit whose
        two sides follow one group still gets two independent counts: what a bilinear fit needs)."""
        c_in = self.spec.c_in if self.in_group is None else self.in_base + self.in_coef * kept_in
        c_out = self.spec.c_out if self.out_group is None else self.out_base + self.out_coef * kept_out
        return self.spec.with_channels(c_in, c_out)

    def count_of(self, spec: UnitSpec, side: str) -> int | None:
        """The kept count of the group followed on `side` ("in"/"out") that gives `spec`, or None."""
        group, base, coef, c = ((self.in_group, self.in_base, self.in_coef, spec.c_in) if side == "in" else
                                (self.out_group, self.out_base, self.out_coef, spec.c_out))
        if group is None or (c - base) % coef:
            return None
        return (c - base) // coef


class UnitNetwork(Protocol):
    """The units of a network and the groups of channels that may be pruned together."""

    input_shape: tuple[int, ...]
    units: list[UnitTemplate]  # every fused unit, forward order

    def full_channels(self) -> dict[int, int]:
        """Every group's size at full width."""

    def decision_groups(self, scope: str) -> list[int]:
        """The groups the search may prune within `scope`, forward order."""


@dataclass
class UnitsOn:
    """Other units over a network's channel groups: the same groups and decision groups as `base` (a
    "decoupled" scope is `base`'s choice, not one recomputed from these units). How a model's int8 units
    and its q/dq edges are compiled into `LatencyModel`s next to its fp32 ones."""

    base: UnitNetwork
    units: list[UnitTemplate]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.base.input_shape

    def full_channels(self) -> dict[int, int]:
        return self.base.full_channels()

    def decision_groups(self, scope: str) -> list[int]:
        return self.base.decision_groups(scope)


def model_hash(network: UnitNetwork) -> str:
    """Hash of a network as latency sees it: input shape and fused units at full width. The same
    architecture shares calibration however it was built (registry name, folder, module)."""
    return config_hash({"input": list(network.input_shape), "units": [u.spec.key() for u in network.units]})


@dataclass
class Target:
    """What a table is built for: a network, the scope the search will use, and whole pruned models
    to calibrate and validate with. `prune(channels)` is the model side's pruning (group -> kept)."""

    label: str  # how the user named the model: goes into the commands we print
    module: nn.Module
    graph: UnitNetwork
    scope: str
    prune: Callable[[dict[int, int]], nn.Module]
    default_scope: str = "all"  # the model's default: a build command names --scope only when it differs

    @property
    def hash(self) -> str:
        return model_hash(self.graph)

    def example_input(self) -> torch.Tensor:
        return example_input(self.graph.input_shape)

    def pruned(self, channels: dict[int, int]) -> nn.Module:
        """The model with group g keeping channels[g] (the original when nothing is pruned), in eval mode."""
        return (self.prune(channels) if channels else self.module).eval()

    def build_command(self, device_label: str, grid: int | None = None) -> str:
        """The command that builds what this target needs, for error messages."""
        from .space import DEFAULT_GRID

        cmd = f"amc-mobile table build --model {self.label} --device {device_label}"
        if self.scope != self.default_scope:
            cmd += f" --scope {self.scope}"
        if grid not in (None, DEFAULT_GRID):
            cmd += f" --grid {grid}"
        return f"`{cmd}`"


def require_target(target, where: str) -> None:
    """Tables take a Target; a model name or module is resolved by `amc_mobile.tables` (the model side)."""
    if not isinstance(target, Target):
        raise TypeError(f"{where} takes a latency_tables.network.Target, not {type(target).__name__}: "
                        f"use amc_mobile.tables.{where} for a model name, folder or module")
