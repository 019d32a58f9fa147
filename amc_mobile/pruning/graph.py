"""The channel dependency graph: which channels must be pruned together, and the fused units they feed.

After Torch-Pruning's dependency graph, with few nouns:

- a **channel group** is a set of channels that is only ever pruned as one: a conv's output channels,
  the BN after it, a depthwise conv that passes them through, and the input channels of the
  convs/linears that consume them. Residual adds merge groups.
- a **layer** is a (non-depthwise) conv or linear. AMC's *prunable layers* are the layers whose
  **input** group is prunable: the agent's action for such a layer is the preserve ratio of its
  input channels, which also shrinks the producing conv, any depthwise conv and the BNs between.
- a **unit** is a fused kernel as the runtime executes it (conv+BN+activation, depthwise+BN+act,
  linear, add(+act), pool, squeeze-excite gate, copy for a cat or a shuffle); latency tables are
  keyed by units.

The channels are followed op by op on a torch.fx trace (`channel_flow.py`): concatenations,
splits, channel shuffles, flattens into a linear, grouped convs and squeeze-excite gates included.
An op the flow cannot follow fixes (never prunes) the channels it touches, with the reason; the
rest stays prunable. A group is a set of channels that appear together everywhere (the same
modules slice them), so a unit's channel count is affine in its group's kept count:
`c = base + coef * kept` (coef = H*W for a linear reading a flattened map, the group width for a
grouped conv).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import fx, nn

from amc_mobile.errors import AmcError
from latency_tables.network import UnitTemplate
from latency_tables.units import ACTIVATIONS, UnitSpec

from .channel_flow import ACT_OF_FUNCTION, ACT_OF_METHOD, ACT_OF_MODULE, Flow, UnitRecord, channel_vector, follow

SCOPES = ("all", "decoupled")
# Per-family default scope: where "all" would make the latency table impractically large.
DEFAULT_SCOPE = {"mobilenet_v2": "decoupled"}


def default_scope(family: str | None) -> str:
    """The scope a search and its table use for a model of `family` unless told otherwise."""
    return DEFAULT_SCOPE.get(family or "", "all")


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


@dataclass
class SiteMap:
    """One module dimension that pruning slices: position i holds channel `index[i]` of group `group[i]`."""

    module: str
    role: str
    group: np.ndarray
    index: np.ndarray

    def kept_positions(self, keep: dict[int, torch.Tensor], sizes: dict[int, int]) -> torch.Tensor | None:
        """Positions kept when group g keeps channels keep[g]; None when nothing here is pruned."""
        touched = [g for g in keep if g in self._groups]
        if not touched:
            return None
        mask = np.ones(len(self.group), dtype=bool)
        for g in touched:
            kept = np.zeros(sizes[g], dtype=bool)
            kept[np.asarray(keep[g], dtype=np.int64)] = True
            sel = self.group == g
            mask[sel] = kept[self.index[sel]]
        return torch.from_numpy(np.flatnonzero(mask)).long()

    @property
    def _groups(self) -> set[int]:
        return set(np.unique(self.group).tolist())


@dataclass
class PruningGraph:
    input_shape: tuple[int, ...]
    groups: dict[int, ChannelGroup]
    layers: list[Layer]  # every conv/linear, forward order
    units: list[UnitTemplate]  # every fused unit, forward order
    sites: list[SiteMap] = field(default_factory=list)  # every sliced module dimension, forward order
    unfollowed: list[str] = field(default_factory=list)  # ops the analysis could not follow (their channels fixed)

    def site_positions(self, keep: dict[int, torch.Tensor]) -> list[tuple[SiteMap, torch.Tensor]]:
        """(site, kept positions) of every module dimension that `keep` (group -> kept indices) prunes."""
        sizes = {g: grp.size for g, grp in self.groups.items()}
        out = []
        for s in self.sites:
            pos = s.kept_positions(keep, sizes)
            if pos is not None:
                out.append((s, pos))
        return out

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


def _example_input(model: nn.Module, input_shape: tuple[int, ...] | None) -> torch.Tensor:
    shape = input_shape or getattr(model, "input_shape", None)
    if shape is None:
        raise AmcError("the model has no `input_shape` attribute: pass the input shape (C,H,W) explicitly")
    return torch.zeros((1, *shape))


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise AmcError(f"the model cannot be traced with torch.fx ({type(exc).__name__}: {first[:200]}): "
                       f"data-dependent control flow (an `if` or loop on tensor values) is the usual cause; "
                       f"write it with tensor ops or move it out of forward()") from exc


def build_graph(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> PruningGraph:
    """Analyse `model` (eval semantics) into channel groups, layers and fused units."""
    if getattr(model, "amc_program", False):
        raise AmcError("a torch.export program (.pt2) is a graph of aten ops: there are no layers to slice; pass "
                       "the FILE.py:FACTORY that builds the model (with --weights) to prune it (bench measures "
                       "the .pt2 as it is)")
    x = _example_input(model, input_shape)
    gm = trace(model)
    was_training = model.training
    gm.eval()
    try:
        flow = follow(gm, x)
    except AmcError:
        raise
    except Exception as exc:
        raise AmcError(f"the model does not run on a {tuple(x.shape)} input: {type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:200]}") from exc
    finally:
        model.train(was_training)
    return _assemble(flow, gm, tuple(x.shape[1:]))


def _assemble(flow: Flow, gm: fx.GraphModule, input_shape: tuple[int, ...]) -> PruningGraph:
    fused, specs = _fuse_activations(flow, gm)
    for rec in _standalone_activations(gm, fused):
        flow.units.append(rec)
        specs.append(rec.spec)
    n_atoms = len(flow.events)
    uf = flow.uf
    root = np.array([uf.find(a) for a in range(n_atoms)], dtype=np.int64)
    events = np.asarray(flow.events, dtype=np.int64)
    # where each root appears: the sliced module dimensions and the units' two sides
    places: list[np.ndarray] = [root[s.atoms.numpy()] for s in flow.sites]
    unit_in = [root[u.in_atoms.numpy()] if u.in_atoms is not None else None for u in flow.units]
    unit_out = [root[u.out_atoms.numpy()] if u.out_atoms is not None else None for u in flow.units]
    places += [p for p in unit_in + unit_out if p is not None]
    signature: dict[int, list[tuple[int, int]]] = {}
    for i, p in enumerate(places):
        r, counts = np.unique(p, return_counts=True)
        for rr, cc in zip(r.tolist(), counts.tolist()):
            signature.setdefault(rr, []).append((i, cc))
    by_sig: dict[tuple, list[int]] = {}
    for r in sorted(signature):  # a root is its smallest atom: producer order, channel order
        by_sig.setdefault(tuple(signature[r]), []).append(r)
    # group ids: the producing event of the group's first channels (stable for the built-in families)
    first_event = {}
    for a in range(n_atoms):
        first_event.setdefault(int(root[a]), int(events[a]))
    used: set[int] = set()
    pending = []
    gid_of_root: dict[int, int] = {}
    raw_groups: dict[int, list[int]] = {}
    for roots in sorted(by_sig.values(), key=lambda rs: rs[0]):
        gid = min(first_event[r] for r in roots)
        if gid in used:
            pending.append(roots)
            continue
        used.add(gid)
        raw_groups[gid] = roots
    nxt = max(used, default=-1) + 1
    for roots in pending:
        raw_groups[nxt] = roots
        nxt += 1
    index_of_root: dict[int, int] = {}
    for gid, roots in raw_groups.items():
        for i, r in enumerate(roots):
            gid_of_root[r] = gid
            index_of_root[r] = i
    reason_of_root: dict[int, tuple[int, str]] = {}
    for a, why in flow.reasons.items():
        r = int(root[a])
        cand = (int(events[a]), why)
        if r not in reason_of_root or cand < reason_of_root[r]:
            reason_of_root[r] = cand
    residual_roots = {int(root[a]) for a in flow.residual}
    groups: dict[int, ChannelGroup] = {}
    for gid in sorted(raw_groups):
        roots = raw_groups[gid]
        reasons = sorted(reason_of_root[r] for r in roots if r in reason_of_root)
        why = reasons[0][1] if reasons else ("tied by a residual add" if residual_roots & set(roots) else None)
        groups[gid] = ChannelGroup(gid, len(roots), why)

    to_gid = np.vectorize(lambda r: gid_of_root[int(r)], otypes=[np.int64])
    to_idx = np.vectorize(lambda r: index_of_root[int(r)], otypes=[np.int64])
    sites = []
    for s, p in zip(flow.sites, places):
        sm = SiteMap(s.module, s.role, to_gid(p), to_idx(p))
        sites.append(sm)
        for g in dict.fromkeys(sm.group.tolist()):
            groups[g].members.append((s.module, s.role))

    # a unit follows at most one prunable group per side (its latency is a 1-D or 2-D surface)
    def side_groups(p):
        return list(dict.fromkeys(to_gid(p).tolist())) if p is not None and len(p) else []

    for u, pin, pout in zip(flow.units, unit_in, unit_out):
        for p in (pin, pout):
            prunable = [g for g in side_groups(p) if groups[g].prunable]
            for g in prunable[1:]:
                groups[g].fixed_reason = (f"shares the channels of {u.name!r} with group {prunable[0]} "
                                          f"(a unit follows one pruned group per side)")

    def follow_side(p) -> tuple[int | None, int, int]:
        gs = side_groups(p)
        if not gs:
            return None, 1, 0
        prunable = [g for g in gs if groups[g].prunable]
        g = prunable[0] if prunable else gs[0]
        coef = int(np.count_nonzero(to_gid(p) == g)) // groups[g].size
        return g, max(1, coef), groups[g].size

    templates: list[UnitTemplate] = []
    order: list[int] = []
    for u, rec in enumerate(flow.units):
        gi, ci, si = follow_side(unit_in[u])
        go, co, so = follow_side(unit_out[u])
        spec = specs[u]
        templates.append(UnitTemplate(rec.name, spec, gi, go, ci, co, spec.c_in - ci * si if gi is not None else 0,
                                      spec.c_out - co * so if go is not None else 0))
        order.append(u)
    node_index = {n: i for i, n in enumerate(gm.graph.nodes)}
    units = [templates[u] for u in sorted(order, key=lambda u: (node_index[flow.units[u].node], u))]

    layers = []
    for rec in flow.layers:
        t = templates[rec.unit]
        in_group = t.in_group if t.in_group is not None else _any_group(unit_in[rec.unit], to_gid)
        out_group = t.out_group if t.out_group is not None else _any_group(unit_out[rec.unit], to_gid)
        layers.append(Layer(rec.name, rec.kind, in_group, out_group, t.spec.c_in, t.spec.c_out, rec.kernel,
                            rec.stride, rec.h_in, rec.w_in, t.spec.flops(), rec.params))
    return PruningGraph(input_shape, groups, layers, units, sites, list(dict.fromkeys(flow.unfollowed)))


def _any_group(p, to_gid) -> int:
    return int(to_gid(p)[0])


def _act_name(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return ACT_OF_MODULE.get(type(modules[node.target]))
    if node.op == "call_function":
        return ACT_OF_FUNCTION.get(node.target)
    if node.op == "call_method":
        return ACT_OF_METHOD.get(node.target)
    return None


_FUSING_KINDS = ("conv", "dwconv", "linear", "add")


def _fuse_activations(flow: Flow, gm: fx.GraphModule) -> tuple[set[fx.Node], list[UnitSpec]]:
    """Follow conv -> BN -> activation (each the only user of the previous) to name the fused activation."""
    modules = dict(gm.named_modules())
    fused: set[fx.Node] = set()
    specs = []
    for rec in flow.units:
        spec = rec.spec
        if spec.kind in _FUSING_KINDS:
            cur, bn_seen = rec.node, spec.kind == "add"
            for _ in range(4):
                users = list(cur.users)
                if len(users) != 1:
                    break
                nxt = users[0]
                mod = modules.get(nxt.target) if nxt.op == "call_module" else None
                if isinstance(mod, nn.BatchNorm2d) and not bn_seen:
                    cur, bn_seen = nxt, True
                    continue
                if isinstance(mod, (nn.Identity, nn.Dropout)):  # gone in the exported program
                    cur = nxt
                    continue
                act = _act_name(nxt, modules)
                if act in ACTIVATIONS:
                    spec = replace(spec, act=act)
                    fused.add(nxt)
                break
        specs.append(spec)
    return fused, specs


def _standalone_activations(gm: fx.GraphModule, fused: set[fx.Node]) -> list[UnitRecord]:
    """Activations that no conv, linear or add absorbs run as kernels of their own: one `act` unit each."""
    modules = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        act = _act_name(node, modules)
        ids = node.meta.get("amc_ids")
        if act is None or act not in ACTIVATIONS or node in fused or ids is None or ids.dim() not in (2, 4):
            continue
        vec = channel_vector(ids)
        if vec is None:
            continue
        h, w = (ids.shape[2], ids.shape[3]) if ids.dim() == 4 else (1, 1)
        name = str(node.target) if node.op == "call_module" else node.name
        out.append(UnitRecord(name, UnitSpec("act", h, w, len(vec), len(vec), act=act), vec, vec, node))
    return out


def require_prunable(graph: PruningGraph) -> list[Layer]:
    layers = graph.prunable_layers
    if not layers:
        from collections import Counter

        why = Counter((g.fixed_reason or "consumed by no conv or linear").split(" at ")[0].split(":")[0]
                      for g in graph.groups.values())
        summary = "; ".join(f"{n}x {r}" for r, n in why.most_common(4))
        raise AmcError(f"the model has no prunable layers: every channel group is fixed ({summary}); "
                       f"`amc-mobile inspect MODEL` lists each with its reason")
    return layers
