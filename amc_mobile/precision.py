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


class PrecisionMap:
    """The model's torch.fx trace compiled once: unit dtypes for any policy in microseconds (a search asks
    thousands of times)."""

    def __init__(self, model: nn.Module, graph: PruningGraph):
        gm = trace(model)
        modules = dict(gm.named_modules())
        index: dict[fx.Node, int] = {}
        self._steps: list[tuple[str | None, list[int]]] = []  # (layer name or None, feeding step indices)
        names: list[str] = []
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            is_layer = node.op == "call_module" and isinstance(modules.get(node.target), _LAYER_MODULES)
            self._steps.append((node.target if is_layer else None,
                                [index[a] for a in node.all_input_nodes if a in index]))
            index[node] = len(names)
            names.append(node.target if is_layer else node.name)
        step_of = {n: i for i, n in enumerate(names)}
        self.layers = [l for l, _ in self._steps if l is not None]
        self._unit_steps = [step_of.get(u.name) for u in graph.units]

    def step_precisions(self, policy: QuantPolicy) -> list[str]:
        out: list[str] = []
        for layer, fed in self._steps:
            if layer is not None:
                out.append(policy.precision_of(layer))
            else:
                out.append("int8" if any(out[i] == "int8" for i in fed) else "fp32")
        return out

    def unit_dtypes(self, policy: QuantPolicy) -> list[str]:
        steps = self.step_precisions(policy)
        return ["fp32" if i is None else steps[i] for i in self._unit_steps]


def unit_dtypes(model: nn.Module, graph: PruningGraph, policy: QuantPolicy) -> list[str]:
    """The dtype of each of `graph.units` (forward order) under `policy`."""
    return PrecisionMap(model, graph).unit_dtypes(policy)


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
