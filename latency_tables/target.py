"""What a table is built for: a model (registry name, pruned-model folder, or module), its pruning
graph, and the channel scope the search will use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.pruning.graph import DEFAULT_SCOPE, SCOPES, PruningGraph, build_graph

from .calibrate import model_hash
from .space import DEFAULT_GRID


@dataclass
class Target:
    label: str  # how the user named it: goes into commands we print
    family: str  # registry family ("mobilenet_v2"), for the default scope; "" when unknown
    module: nn.Module
    graph: PruningGraph
    scope: str

    @property
    def hash(self) -> str:
        return model_hash(self.graph)

    def example_input(self) -> torch.Tensor:
        return torch.randn(1, *self.graph.input_shape, generator=torch.Generator().manual_seed(0))


def default_scope(family: str) -> str:
    return DEFAULT_SCOPE.get(family, "all")


def resolve_target(model, graph: PruningGraph | None = None, scope: str | None = None, options=None) -> Target:
    """`model`: a registry name, a pruned-model/checkpoint folder, FILE.py:FACTORY (str or Path), or an
    nn.Module; `options`: amc_mobile.model_io.ModelOptions for a reference."""
    if isinstance(model, nn.Module):
        module = model
        label = getattr(model, "amc_config", {}).get("name") or getattr(model, "amc_label", None) \
            or type(model).__name__
    else:
        from amc_mobile.model_io import load_model

        loaded = load_model(str(model), options=options)
        if loaded.module is None:
            raise AmcError(f"{model} is a compiled .pte: a latency table needs the model's layers "
                           f"(pass a registry name or a pruned-model folder)")
        module, label = loaded.module, str(model)
    module = module.eval()
    family = getattr(module, "amc_config", {}).get("name", "")
    if graph is None:
        graph = build_graph(module)
    scope = scope or default_scope(family)
    if scope not in SCOPES:
        raise AmcError(f"unknown channel scope {scope!r}: expected one of {', '.join(SCOPES)}")
    return Target(label, family, module, graph, scope)


def build_command(target: Target, device_label: str, grid: int = DEFAULT_GRID) -> str:
    """The command that builds what `target` needs, for error messages."""
    cmd = f"amc-mobile table build --model {target.label} --device {device_label}"
    if target.scope != default_scope(target.family):
        cmd += f" --scope {target.scope}"
    if grid != DEFAULT_GRID:
        cmd += f" --grid {grid}"
    return f"`{cmd}`"
