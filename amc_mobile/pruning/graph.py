"""The channel dependency graph: which channels must be pruned together, and the fused units they feed.

After Torch-Pruning's dependency graph, with few nouns:

- a **channel group** is a set of channels that is only ever pruned as one: a conv's output channels,
  the BN after it, a depthwise conv that passes them through, and the input channels of the
  convs/linears that consume them. Residual adds merge groups.
- a **layer** is a (non-depthwise) conv or linear. AMC's *prunable layers* are the layers whose
  **input** group is prunable: the agent's action for such a layer is the preserve ratio of its
  input channels, which also shrinks the producing conv, any depthwise conv and the BNs between.
- a **unit** is a fused kernel as the runtime executes it (conv+BN+activation, depthwise+BN+act,
  linear, add(+act), pool); latency tables are keyed by units.

The analysis runs on a torch.fx trace, so any model built from the supported ops works, not only
the built-in families; an unsupported pattern is an AmcError naming the node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from amc_mobile.errors import AmcError
from latency_tables.units import UnitSpec

SCOPES = ("all", "decoupled")
# Per-family default scope: where "all" would make the latency table impractically large.
DEFAULT_SCOPE = {"mobilenet_v2": "decoupled"}

_PASSTHROUGH_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.Identity, nn.Dropout, nn.AdaptiveAvgPool2d,
    nn.AvgPool2d, nn.MaxPool2d, nn.Sigmoid, nn.Hardtanh,
)
_PASSTHROUGH_FUNCTIONS = {F.relu, F.relu6, torch.relu, F.hardswish, F.silu, F.dropout, F.adaptive_avg_pool2d,
                          F.avg_pool2d, F.max_pool2d, torch.sigmoid, torch.nn.functional.hardtanh}
_PASSTHROUGH_METHODS = {"relu", "relu_", "contiguous", "clone", "sigmoid"}
_ACT_OF_MODULE = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}
_ACT_OF_FUNCTION = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish"}


@dataclass
class ChannelGroup:
    id: int
    size: int  # channels at full width
    fixed_reason: str | None = None  # why it may not be pruned; None = prunable
    members: list[tuple[str, str]] = field(default_factory=list)  # (module name, role)

    @property
    def prunable(self) -> bool:
        return self.fixed_reason is None


@dataclass(frozen=True)
class Layer:
    """A conv (groups=1) or linear layer, with its shapes at full width."""

    name: str
    kind: str  # "conv" or "linear"
    in_group: int
    out_group: int
    c_in: int
    c_out: int
    kernel: int
    stride: int
    h_in: int
    w_in: int
    flops: int
    params: int


@dataclass(frozen=True)
class UnitTemplate:
    """A fused unit at full width, with the groups its channel counts follow."""

    name: str
    spec: UnitSpec
    in_group: int | None
    out_group: int | None

    def at(self, channels: dict[int, int]) -> UnitSpec:
        c_in = channels.get(self.in_group, self.spec.c_in) if self.in_group is not None else self.spec.c_in
        c_out = channels.get(self.out_group, self.spec.c_out) if self.out_group is not None else self.spec.c_out
        return self.spec.with_channels(c_in, c_out)


@dataclass
class PruningGraph:
    input_shape: tuple[int, ...]
    groups: dict[int, ChannelGroup]
    layers: list[Layer]  # every conv/linear, forward order
    units: list[UnitTemplate]  # every fused unit, forward order

    @property
    def prunable_layers(self) -> list[Layer]:
        """AMC's decision points: the first layer consuming each prunable group, in forward order."""
        seen: set[int] = set()
        out = []
        for layer in self.layers:
            g = layer.in_group
            if self.groups[g].prunable and g not in seen:
                seen.add(g)
                out.append(layer)
        return out

    def decision_layers(self, scope: str = "all") -> list[Layer]:
        """AMC's decision points within `scope` (see `decision_groups`)."""
        allowed = set(self.decision_groups(scope))
        return [l for l in self.prunable_layers if l.in_group in allowed]

    def decision_groups(self, scope: str = "all") -> list[int]:
        """Groups the search may prune, in forward order.

        - "all": every prunable group.
        - "decoupled": greedily, in forward order, skip a group when some unit ties it to a group
          already chosen, so every unit depends on at most one pruned group. For MobileNet-V2 this
          is AMC's choice (the expansion channels, plus the stem and head); it turns the latency
          table's (c_in, c_out) surfaces into lines, roughly 6x fewer configurations to measure.
        """
        if scope not in SCOPES:
            raise AmcError(f"unknown channel scope {scope!r}: expected one of {', '.join(SCOPES)}")
        groups = [l.in_group for l in self.prunable_layers]
        if scope == "all":
            return groups
        chosen: list[int] = []
        for g in groups:
            partners = {u.in_group for u in self.units if u.out_group == g} | {
                u.out_group for u in self.units if u.in_group == g}
            if not partners.intersection(chosen):
                chosen.append(g)
        return chosen

    def full_channels(self) -> dict[int, int]:
        return {g.id: g.size for g in self.groups.values()}

    def units_for(self, channels: dict[int, int]) -> list[UnitSpec]:
        """Concrete units when group g keeps channels[g] channels (missing groups stay full)."""
        return [u.at(channels) for u in self.units]

    def units_touching(self, group: int) -> list[int]:
        return [i for i, u in enumerate(self.units) if group in (u.in_group, u.out_group)]

    def flops(self, channels: dict[int, int] | None = None) -> int:
        return sum(u.flops() for u in self.units_for(channels or {}))

    def params(self, channels: dict[int, int] | None = None) -> int:
        total = 0
        for u in self.units_for(channels or {}):
            if u.kind in ("conv", "dwconv"):
                total += u.c_out * (u.c_in // u.groups) * u.kernel**2 + 2 * u.c_out
            elif u.kind == "linear":
                total += u.c_in * u.c_out + u.c_out
        return total

    def describe(self) -> str:
        lines = []
        for i, layer in enumerate(self.prunable_layers):
            lines.append(f"{i:3d} {layer.name:40s} {layer.kind:6s} in={layer.c_in:5d} out={layer.c_out:5d} "
                         f"k={layer.kernel} s={layer.stride} hw={layer.h_in}x{layer.w_in}")
        return "\n".join(lines)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def add(self, x: int) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _example_input(model: nn.Module, input_shape: tuple[int, ...] | None) -> torch.Tensor:
    shape = input_shape or getattr(model, "input_shape", None)
    if shape is None:
        raise AmcError("the model has no `input_shape` attribute: pass the input shape (C,H,W) explicitly")
    return torch.zeros((1, *shape))


def trace(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> fx.GraphModule:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise AmcError(f"the model cannot be traced with torch.fx: {str(exc).splitlines()[0]}") from exc
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(_example_input(model, input_shape))
    gm.train(was_training)
    return gm


def build_graph(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> PruningGraph:
    """Analyse `model` (eval semantics) into channel groups, layers and fused units."""
    x = _example_input(model, input_shape)
    gm = trace(model, tuple(x.shape[1:]))
    modules = dict(gm.named_modules())
    uf = _UnionFind()
    sizes: dict[int, int] = {}
    fixed: dict[int, str] = {}
    members: dict[int, list[tuple[str, str]]] = {}
    node_group: dict[fx.Node, int] = {}
    layers: list[Layer] = []
    raw_units: list[tuple[str, UnitSpec, int | None, int | None, fx.Node]] = []
    residual_groups: set[int] = set()

    def new_group(size: int, reason: str | None = None) -> int:
        gid = len(sizes)
        uf.add(gid)
        sizes[gid] = size
        members[gid] = []
        if reason:
            fixed[gid] = reason
        return gid

    def group_of(arg, node: fx.Node) -> int:
        if not isinstance(arg, fx.Node) or arg not in node_group:
            raise AmcError(f"node {node.name!r} ({node.target}) reads a tensor whose channels could not be followed")
        return uf.find(node_group[arg])

    for node in gm.graph.nodes:
        shape = _shape(node)
        if node.op == "placeholder":
            node_group[node] = new_group(shape[1], "network input")
        elif node.op == "get_attr":
            continue
        elif node.op == "call_module":
            mod = modules[node.target]
            src = node.args[0]
            name = str(node.target)
            if isinstance(mod, nn.Conv2d):
                g_in = group_of(src, node)
                in_shape = _shape(src)
                k, s, p = mod.kernel_size[0], mod.stride[0], mod.padding[0] if isinstance(mod.padding, tuple) else 0
                if mod.kernel_size[0] != mod.kernel_size[1] or mod.stride[0] != mod.stride[1]:
                    raise AmcError(f"conv {name!r} has a non-square kernel or stride: not supported")
                if mod.groups == 1:
                    g_out = new_group(mod.out_channels)
                    members[g_in].append((name, "conv_in"))
                    members[g_out].append((name, "conv_out"))
                    node_group[node] = g_out
                    spec = UnitSpec("conv", in_shape[2], in_shape[3], mod.in_channels, mod.out_channels, k, s, p, 1)
                    flops = spec.flops()
                    layers.append(Layer(name, "conv", g_in, g_out, mod.in_channels, mod.out_channels, k, s,
                                        in_shape[2], in_shape[3], flops, mod.weight.numel()))
                    raw_units.append((name, spec, g_in, g_out, node))
                elif mod.groups == mod.in_channels == mod.out_channels:
                    members[g_in].append((name, "dw"))
                    node_group[node] = g_in
                    spec = UnitSpec("dwconv", in_shape[2], in_shape[3], mod.in_channels, mod.out_channels, k, s, p,
                                    mod.groups)
                    raw_units.append((name, spec, g_in, g_in, node))
                else:
                    raise AmcError(f"conv {name!r} uses groups={mod.groups} (not 1 and not depthwise): not supported")
            elif isinstance(mod, nn.Linear):
                g_in = group_of(src, node)
                in_shape = _shape(src)
                if len(in_shape) != 2:
                    raise AmcError(f"linear {name!r} gets a {len(in_shape)}-D input: only (N, features) is supported")
                g_out = new_group(mod.out_features)
                members[g_in].append((name, "linear_in"))
                members[g_out].append((name, "linear_out"))
                node_group[node] = g_out
                spec = UnitSpec("linear", 1, 1, mod.in_features, mod.out_features)
                layers.append(Layer(name, "linear", g_in, g_out, mod.in_features, mod.out_features, 1, 1, 1, 1,
                                    spec.flops(), mod.weight.numel()))
                raw_units.append((name, spec, g_in, g_out, node))
            elif isinstance(mod, nn.BatchNorm2d):
                g = group_of(src, node)
                members[g].append((name, "bn"))
                node_group[node] = g
            elif isinstance(mod, _PASSTHROUGH_MODULES):
                g = group_of(src, node)
                node_group[node] = g
                if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.MaxPool2d)):
                    in_shape = _shape(src)
                    if isinstance(mod, nn.AdaptiveAvgPool2d):
                        spec = UnitSpec("pool", in_shape[2], in_shape[3], in_shape[1], in_shape[1], kernel=0)
                    else:
                        ks = mod.kernel_size if isinstance(mod.kernel_size, int) else mod.kernel_size[0]
                        st = mod.stride if isinstance(mod.stride, int) else mod.stride[0]
                        pd = mod.padding if isinstance(mod.padding, int) else mod.padding[0]
                        spec = UnitSpec("pool", in_shape[2], in_shape[3], in_shape[1], in_shape[1], ks, st, pd)
                    raw_units.append((name, spec, g, g, node))
            else:
                raise AmcError(
                    f"unsupported layer {name!r} ({type(mod).__name__}) at node {node.name!r}: the pruning graph "
                    f"knows Conv2d, Linear, BatchNorm2d, activations, pooling, add and flatten")
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            tensor_args = [a for a in node.all_input_nodes if a in node_group]
            if fn in (operator.add, torch.add, operator.iadd) or fn in ("add", "add_"):
                if len(tensor_args) == 2:
                    a, b = (group_of(t, node) for t in tensor_args)
                    if sizes[a] != sizes[b]:
                        raise AmcError(f"residual add {node.name!r} joins {sizes[a]} and {sizes[b]} channels")
                    g = uf.union(a, b)
                    residual_groups.add(g)
                    node_group[node] = g
                    in_shape = _shape(tensor_args[0])
                    raw_units.append((node.name, UnitSpec("add", in_shape[2], in_shape[3], in_shape[1], in_shape[1]),
                                      g, g, node))
                elif len(tensor_args) == 1:
                    node_group[node] = group_of(tensor_args[0], node)
                else:
                    continue
            elif fn in _PASSTHROUGH_FUNCTIONS or fn in _PASSTHROUGH_METHODS:
                node_group[node] = group_of(node.args[0], node)
            elif fn in (torch.flatten, "flatten", "view", "reshape", torch.reshape):
                src = node.args[0]
                g = group_of(src, node)
                in_shape = _shape(src)
                if len(in_shape) == 4 and in_shape[2] * in_shape[3] != 1:
                    fixed.setdefault(g, f"flattened over a {in_shape[2]}x{in_shape[3]} map at {node.name!r}")
                    node_group[node] = new_group(shape[1], "flattened spatial features")
                else:
                    node_group[node] = g
            elif fn in ("size", "dim") or fn is getattr:
                continue
            elif tensor_args:
                raise AmcError(
                    f"unsupported operation {getattr(fn, '__name__', fn)!r} at node {node.name!r}: the pruning graph "
                    f"cannot follow channels through it")
        elif node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            for o in outs:
                if isinstance(o, fx.Node) and o in node_group:
                    fixed.setdefault(uf.find(node_group[o]), "network output")

    # Merge what the adds tied together; a merged group is fixed (kept whole) by default.
    roots: dict[int, ChannelGroup] = {}
    for gid in sizes:
        r = uf.find(gid)
        grp = roots.setdefault(r, ChannelGroup(r, sizes[r]))
        grp.members.extend(members[gid])
        reason = fixed.get(gid)
        if reason and grp.fixed_reason is None:
            grp.fixed_reason = reason
    for g in residual_groups:
        r = uf.find(g)
        if roots[r].fixed_reason is None:
            roots[r].fixed_reason = "tied by a residual add"

    find = uf.find
    layers = [Layer(l.name, l.kind, find(l.in_group), find(l.out_group), l.c_in, l.c_out, l.kernel, l.stride,
                    l.h_in, l.w_in, l.flops, l.params) for l in layers]
    units = [UnitTemplate(name, _fuse_activation(spec, node, modules), find(gi) if gi is not None else None,
                          find(go) if go is not None else None) for name, spec, gi, go, node in raw_units]
    return PruningGraph(tuple(x.shape[1:]), roots, layers, units)


def require_prunable(graph: PruningGraph) -> list[Layer]:
    layers = graph.prunable_layers
    if not layers:
        raise AmcError("the model has no prunable layers: no conv/linear input channels are free to prune "
                       "(all are tied to the network input, its output or residual adds)")
    return layers


def _fuse_activation(spec: UnitSpec, node: fx.Node, modules: dict[str, nn.Module]) -> UnitSpec:
    """Follow conv -> BN -> activation (each the only user of the previous) to name the fused activation."""
    from dataclasses import replace

    cur = node
    for _ in range(2):
        users = list(cur.users)
        if len(users) != 1:
            return spec
        nxt = users[0]
        if nxt.op == "call_module":
            mod = modules[nxt.target]
            if isinstance(mod, nn.BatchNorm2d):
                cur = nxt
                continue
            act = _ACT_OF_MODULE.get(type(mod))
            if act:
                return replace(spec, act=act)
            return spec
        if nxt.op == "call_function" and nxt.target in _ACT_OF_FUNCTION:
            return replace(spec, act=_ACT_OF_FUNCTION[nxt.target])
        if nxt.op == "call_method" and nxt.target in ("relu", "relu_"):
            return replace(spec, act="relu")
        return spec
    return spec
