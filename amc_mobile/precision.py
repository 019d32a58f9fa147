"""The precision of each fused unit under a quantization policy, by the rule `device/quantize.py` quantizes with:
a conv/linear unit takes its layer's precision; any other unit (add, pool, gate, ...) is int8 when any op
feeding it is and its kind has an int8 form (`latency_tables.units.INT8_KINDS`). Used to key a
mixed-precision model's units by dtype (`UnitSpec.dtype`).

And where the policy puts the q/dq: an **edge** is a tensor passed between an fp32 and an int8 op (the model's
input into an int8 op and an int8 op's result as the model's output included). The model pays a quantize
(fp32 -> int8) or a dequantize (int8 -> fp32) there, once per edge; inside an int8 region it pays none.
`PrecisionMap.edges` lists every edge a policy can create as a pair of units (quantize, dequantize) keyed
by the edge's tensor; `active_edges(policy)` says which of them a policy pays. `predict_mixed` (and
`latency_tables.mixed.MixedLatencyModel` for tables) sums a model's units at their dtypes plus its edges.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from torch import fx, nn

from device.quantize import PRECISIONS, QuantPolicy
from latency_tables.network import UnitTemplate
from latency_tables.units import EDGE_KINDS, INT8_KINDS, UnitSpec

from .errors import AmcError
from .pruning.graph import PruningGraph, trace

_LAYER_MODULES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
INPUT, OUTPUT = -1, -2  # the model's input and output as the two ends of an edge


@dataclass(frozen=True)
class Edge:
    """A tensor from step `src` (INPUT: the model's input) to step `dst` (OUTPUT: the model's output) that is
    an fp32<->int8 boundary whenever the two ends differ in precision; `units` indexes its quantize and its
    dequantize template in `PrecisionMap.edge_units`."""

    src: int
    dst: int
    name: str
    quantize: int
    dequantize: int


class PrecisionMap:
    """The model's torch.fx trace compiled once: unit dtypes and q/dq edges for any policy in microseconds (a
    search asks thousands of times)."""

    def __init__(self, model: nn.Module, graph: PruningGraph):
        gm = trace(model)
        modules = dict(gm.named_modules())
        index: dict[fx.Node, int] = {}
        self._steps: list[tuple[str | None, list[int]]] = []  # (layer name or None, feeding step indices)
        names: list[str] = []
        reads_input: list[int] = []
        outputs: list[int] = []
        for node in gm.graph.nodes:
            if node.op == "output":
                outputs = [index[a] for a in node.all_input_nodes if a in index]
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            is_layer = node.op == "call_module" and isinstance(modules.get(node.target), _LAYER_MODULES)
            fed = node.all_input_nodes
            if any(a.op == "placeholder" for a in fed):
                reads_input.append(len(names))
            self._steps.append((node.target if is_layer else None, [index[a] for a in fed if a in index]))
            index[node] = len(names)
            names.append(node.target if is_layer else node.name)
        step_of = {n: i for i, n in enumerate(names)}
        self.layers = [l for l, _ in self._steps if l is not None]
        self._graph = graph
        self._unit_steps = [step_of.get(u.name) for u in graph.units]
        self._unit_of_step = {st: u for u, st in enumerate(self._unit_steps) if st is not None}
        # a unit kind without an int8 form stays fp32 whatever feeds it (the quantizer leaves it unannotated)
        self._fp32_only = {st for u, st in enumerate(self._unit_steps)
                           if st is not None and self._steps[st][0] is None and graph.units[u].spec.kind not in INT8_KINDS}
        self._layer_of_unit = [None if st is None else self._steps[st][0] for st in self._unit_steps]
        self.step_names = names
        self.edges: list[Edge] = []
        self.edge_units: list[UnitTemplate] = []  # quantize, dequantize of each edge, in `edges` order
        self.unplaced: list[str] = []  # edges whose tensor no unit describes
        for dst in reads_input:
            self._add_edge(INPUT, dst)
        for dst, (layer, fed) in enumerate(self._steps):
            # a one-input op that is neither a layer nor fp32-only always has its input's precision
            if layer is None and len(fed) < 2 and dst not in self._fp32_only:
                continue
            for src in dict.fromkeys(fed):
                self._add_edge(src, dst)
        for src in dict.fromkeys(outputs):
            self._add_edge(src, OUTPUT)
        self._edge_ends = [(e.src, e.dst) for e in self.edges]

    # ------------------------------------------------------------------------------------ edges
    def _tensor(self, src: int, dst: int) -> UnitTemplate | None:
        """The edge's tensor as a channel-keeping template: the input of the unit at `dst` when there is
        one (a linear's flattened input included), else the output of the unit that produced `src`; None
        when no fused unit produces or consumes it (e.g. the input read by a plain tensor op)."""
        u = self._unit_of_step.get(dst)
        if u is not None:
            t = self._graph.units[u]
            spec = t.spec
            return UnitTemplate("", UnitSpec("quantize", spec.h, spec.w, spec.c_in, spec.c_in, dtype="int8"),
                                t.in_group, t.in_group, t.in_coef, t.in_coef, t.in_base, t.in_base)
        step = src
        while step not in self._unit_of_step:
            fed = self._steps[step][1] if step >= 0 else []
            if len(fed) != 1:
                return None
            step = fed[0]
        t = self._graph.units[self._unit_of_step[step]]
        h, w = t.spec.output_hw()
        return UnitTemplate("", UnitSpec("quantize", h, w, t.spec.c_out, t.spec.c_out, dtype="int8"),
                            t.out_group, t.out_group, t.out_coef, t.out_coef, t.out_base, t.out_base)

    def _end(self, step: int) -> str:
        return {INPUT: "input", OUTPUT: "output"}.get(step) or self.step_names[step]

    def _add_edge(self, src: int, dst: int) -> None:
        t = self._tensor(src, dst)
        name = f"{self._end(src)}->{self._end(dst)}"
        if t is None:
            self.unplaced.append(name)  # its q/dq goes unpredicted: a few microseconds at most
            return
        k = len(self.edge_units)
        for kind in EDGE_KINDS:
            self.edge_units.append(replace(t, name=f"{kind}:{name}", spec=replace(t.spec, kind=kind)))
        self.edges.append(Edge(src, dst, name, k, k + 1))

    def active_edges(self, policy: QuantPolicy) -> list[int]:
        """Indices into `edge_units` of the q/dq `policy` pays: a quantize where an fp32 value (or the input)
        feeds int8 ops, a dequantize where an int8 value feeds fp32 ops (or the output). Once per value, as
        PT2E inserts them: a value read by two int8 ops is quantized once, one read by two fp32 ops (a
        block's input into its conv and its shortcut conv) dequantized once."""
        steps = self.step_precisions(policy)
        out: list[int] = []
        paid: set[tuple[int, bool]] = set()
        for k, (src, dst) in enumerate(self._edge_ends):
            a = "fp32" if src == INPUT else steps[src]
            b = "fp32" if dst == OUTPUT else steps[dst]
            if a != b and (src, a == "int8") not in paid:
                paid.add((src, a == "int8"))
                out.append(2 * k + (a == "int8"))  # fp32 -> int8: quantize (2k); int8 -> fp32: dequantize
        return out

    def edge_specs(self, policy: QuantPolicy, channels: Mapping[int, int] | None = None) -> list[UnitSpec]:
        """The q/dq units `policy` pays, at `channels` (group -> kept; missing groups full)."""
        return [self.edge_units[i].at(dict(channels or {})) for i in self.active_edges(policy)]

    # ------------------------------------------------------------------------------- precisions
    def step_precisions(self, policy: QuantPolicy) -> list[str]:
        out: list[str] = []
        fp32_only = self._fp32_only
        for i, (layer, fed) in enumerate(self._steps):
            if layer is not None:
                out.append(policy.precision_of(layer))
            else:
                out.append("int8" if i not in fp32_only and any(out[j] == "int8" for j in fed) else "fp32")
        return out

    def unit_dtypes(self, policy: QuantPolicy) -> list[str]:
        steps = self.step_precisions(policy)
        return ["fp32" if i is None else steps[i] for i in self._unit_steps]

    def policy_of(self, unit_dtypes: Sequence[str]) -> QuantPolicy:
        """The layer policy behind per-unit dtypes (one per `graph.units`): each conv/linear unit's dtype is
        its layer's precision; the other units' dtypes must be what the rule gives them (else an error)."""
        if len(unit_dtypes) != len(self._unit_steps):
            raise AmcError(f"{len(unit_dtypes)} unit dtypes for a model of {len(self._unit_steps)} units")
        for d in unit_dtypes:
            if d not in PRECISIONS:
                raise AmcError(f"unknown unit dtype {d!r}: expected one of {', '.join(PRECISIONS)}")
        policy = QuantPolicy("fp32", {l: d for l, d in zip(self._layer_of_unit, unit_dtypes) if l is not None})
        got = self.unit_dtypes(policy)
        for u, (want, have) in enumerate(zip(unit_dtypes, got)):
            if want != have:
                raise AmcError(f"unit {self._graph.units[u].name!r} cannot be {want} when its layers are as given: "
                               f"it is {have} (a unit that is not a conv/linear follows the ops feeding it)")
        return policy


def unit_dtypes(model: nn.Module, graph: PruningGraph, policy: QuantPolicy) -> list[str]:
    """The dtype of each of `graph.units` (forward order) under `policy`."""
    return PrecisionMap(model, graph).unit_dtypes(policy)


def units_at(graph: PruningGraph, dtypes: list[str], channels: dict[int, int] | None = None) -> list[UnitSpec]:
    """The concrete units at `channels`, each keyed by its dtype."""
    return [replace(spec, dtype=d) for spec, d in zip(graph.units_for(channels or {}), dtypes)]


def mixed_units(pmap: PrecisionMap, graph: PruningGraph, policy: QuantPolicy,
                channels: Mapping[int, int] | None = None) -> list[UnitSpec]:
    """Every unit a mixed-precision model runs at `channels`: its fused units at their dtypes, then the
    quantize/dequantize of each edge `policy` creates. The sum of their latencies is what
    `predict_mixed` and `latency_tables.mixed.MixedLatencyModel` predict from."""
    ch = dict(channels or {})
    return units_at(graph, pmap.unit_dtypes(policy), ch) + pmap.edge_specs(policy, ch)


def with_dtypes(graph: PruningGraph, dtypes: list[str] | str) -> PruningGraph:
    """`graph` with its units keyed by `dtypes` (one per unit, or one for all): what a table of int8 or
    mixed-precision units is built from (same channel plans, the dtype in every key). A unit kind with no
    int8 form (`INT8_KINDS`) keeps fp32, as it does in a quantized model."""
    if isinstance(dtypes, str):
        dtypes = [dtypes] * len(graph.units)
    units = [replace(u, spec=replace(u.spec, dtype=d if d == "fp32" or u.spec.kind in INT8_KINDS else "fp32"))
             for u, d in zip(graph.units, dtypes)]
    return replace(graph, units=units)


def predict_mixed(unit_ms: Mapping[str, float], pmap: PrecisionMap, graph: PruningGraph, policy: QuantPolicy,
                  channels: Mapping[int, int] | None = None, scale: float = 1.0, offset: float = 0.0) -> float:
    """Whole-model ms of `graph` under `policy` at `channels` from measured units (`unit_ms`: UnitSpec.key()
    -> ms): scale * (units at their dtypes + the q/dq of every edge) + offset. A unit not in `unit_ms` is a
    one-line error naming it. (`latency_tables.mixed.MixedLatencyModel` is the same sum over a table.)"""
    total = 0.0
    for spec in mixed_units(pmap, graph, policy, channels):
        ms = unit_ms.get(spec.key())
        if ms is None:
            raise AmcError(f"no measurement of unit {spec.key()}: measure it first (`table build --dtype int8` "
                           f"for a table)")
        total += ms
    return scale * total + offset


def int8_mask(pmap: PrecisionMap, policy: QuantPolicy) -> list[bool]:
    """Which of `graph.units` run in int8 under `policy` (what `MixedLatencyModel` takes)."""
    return [d == "int8" for d in pmap.unit_dtypes(policy)]


@dataclass
class MixedPredictor:
    """A model's mixed-precision latency from its table: `predict(channels, dtypes)` with `dtypes` a
    QuantPolicy or one dtype per `graph.units` (the conv/linear units' dtypes decide; the rest must agree)."""

    pmap: PrecisionMap
    latency: "MixedLatencyModel"  # noqa: F821  (latency_tables.mixed, imported where it is built)

    def _policy(self, dtypes: QuantPolicy | Sequence[str]) -> QuantPolicy:
        return dtypes if isinstance(dtypes, QuantPolicy) else self.pmap.policy_of(dtypes)

    def unit_sum(self, channels: Mapping[int, int] | None, dtypes: QuantPolicy | Sequence[str]) -> float:
        policy = self._policy(dtypes)
        return self.latency.unit_sum(channels, int8_mask(self.pmap, policy), self.pmap.active_edges(policy))

    def predict(self, channels: Mapping[int, int] | None, dtypes: QuantPolicy | Sequence[str]) -> float:
        """Predicted ms of the model pruned to `channels` (group -> kept; missing groups full) at `dtypes`."""
        return self.unit_sum(channels, dtypes) * self.latency.scale + self.latency.offset
