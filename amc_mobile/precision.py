"""The precision of each fused unit under a quantization policy, by the rule `device/quantize.py` quantizes with:
a conv/linear unit takes its layer's precision; any other unit (add, pool, gate, ...) is int8 when any op
feeding it is. Used to key a mixed-precision model's units by dtype (`UnitSpec.dtype`)."""

from __future__ import annotations

from dataclasses import replace

from torch import fx, nn

from device.quantize import QuantPolicy
from latency_tables.units import UnitSpec

from .pruning.graph import PruningGraph, trace

_LAYER_MODULES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def node_precisions(model: nn.Module, policy: QuantPolicy) -> dict[str, str]:
    """{fx node name or layer module name: precision} on the model's torch.fx trace."""
    gm = trace(model)
    modules = dict(gm.named_modules())
    prec: dict[str, str] = {}
    by_node: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.op == "call_module" and isinstance(modules.get(node.target), _LAYER_MODULES):
            p = policy.precision_of(node.target)
            prec[node.target] = p
        else:
            fed = [by_node[a] for a in node.all_input_nodes if a in by_node]
            p = "int8" if "int8" in fed else "fp32"
        by_node[node] = p
        prec[node.name] = p
    return prec


def unit_dtypes(model: nn.Module, graph: PruningGraph, policy: QuantPolicy) -> list[str]:
    """The dtype of each of `graph.units` (forward order) under `policy`."""
    prec = node_precisions(model, policy)
    return [prec.get(u.name, "fp32") for u in graph.units]


def units_at(graph: PruningGraph, dtypes: list[str], channels: dict[int, int] | None = None) -> list[UnitSpec]:
    """The concrete units at `channels`, each keyed by its dtype."""
    return [replace(spec, dtype=d) for spec, d in zip(graph.units_for(channels or {}), dtypes)]


def with_dtypes(graph: PruningGraph, dtypes: list[str] | str) -> PruningGraph:
    """`graph` with its units keyed by `dtypes` (one per unit, or one for all): what a table of int8 or
    mixed-precision units is built from (same channel plans, the dtype in every key)."""
    if isinstance(dtypes, str):
        dtypes = [dtypes] * len(graph.units)
    units = [replace(u, spec=replace(u.spec, dtype=d)) for u, d in zip(graph.units, dtypes)]
    return replace(graph, units=units)
