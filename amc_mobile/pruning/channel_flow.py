"""Follow every channel of a traced model through its ops.

Each tensor of the trace carries an `ids` tensor of its own shape (batch 1) whose every element names
the *atom* it belongs to: a set of channels that is kept or dropped as one. A conv's or linear's
outputs are new atoms; ops that keep channels pass the ids through; data movement (view, flatten,
cat, split, slicing, transpose, permute, ...) is replayed on the ids themselves, so a channel
shuffle, a concatenation or a flatten into a linear is followed exactly, whatever its shape.
Element-wise ops between two tensors tie their atoms position by position (a residual add, a
squeeze-excite gate); a grouped conv ties the channels of each of its groups into one atom.

Where the flow cannot be followed (an op never seen, a reduction or normalisation over channels, a
parameter tensor combined with activations), the atoms involved are *fixed* (never pruned) with the
reason, and the flow goes on with fresh fixed atoms: the analysis degrades, it never stops.

What it records, for the graph to turn into groups, layers and fused units:
- sites: where a module's weight is sliced along a channel dimension (module, role, atom per index);
- units: the fused kernels the runtime executes, with the atoms of their input and output channels;
- fixed reasons per atom, the atoms tied by residual adds, and the ops it could not follow.

Handlers are looked up in one table keyed by module type, function or method name: a new op is one
entry.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from latency_tables.units import REDUCTIONS, UnitSpec

from device.union_find import UnionFind

# activation name (as latency units know it) of the modules / functions a conv, linear or add fuses
ACT_OF_MODULE = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
                 nn.SiLU: "silu", nn.GELU: "gelu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
ACT_OF_FUNCTION = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish",
                   F.hardsigmoid: "hardsigmoid", F.silu: "silu", F.gelu: "gelu", torch.sigmoid: "sigmoid",
                   F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh"}
ACT_OF_METHOD = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
                 "tanh_": "tanh"}


@dataclass
class Site:
    """A module dimension that pruning slices: index i of it belongs to atom `atoms[i]`."""

    module: str
    role: str  # conv_in, conv_out, dw, gconv_in, gconv_out, bn, linear_in, linear_out
    atoms: torch.Tensor  # 1-D int64


@dataclass
class UnitRecord:
    name: str
    spec: UnitSpec  # at full width
    in_atoms: torch.Tensor | None  # the atoms of the unit's input channels (c_in of them)
    out_atoms: torch.Tensor | None  # of its output channels (c_out of them)
    node: fx.Node


@dataclass
class LayerRecord:
    """A conv (groups=1) or linear: AMC's layer, described for the agent's state."""

    name: str
    kind: str
    unit: int  # index into units
    kernel: int
    stride: int
    h_in: int
    w_in: int
    params: int


@dataclass
class Flow:
    """The result of following the channels: atoms and what uses them."""

    uf: UnionFind
    events: list[int]  # per atom: the creation event (a counter of producing ops, in forward order)
    reasons: dict[int, str]  # atom -> why it is fixed (first reason wins)
    residual: set[int]  # atoms tied by a residual add
    sites: list[Site]
    units: list[UnitRecord]
    layers: list[LayerRecord]
    unfollowed: list[str]  # one line per op the flow could not follow


# ----------------------------------------------------------------------------------- helpers


def channel_vector(ids: torch.Tensor) -> torch.Tensor | None:
    """The atoms along the channel dimension: ids[0] for (N, F); for (N, C..., H, W) the channels when
    every channel is constant over its H x W map (None when it is not)."""
    if ids.dim() == 2:
        return ids[0]
    if ids.dim() < 2:
        return None
    lead = ids[0]
    first = lead[..., :1, :1]
    if not bool((lead == first).all()):
        return None
    return first.reshape(-1)


def feature_vector(ids: torch.Tensor) -> torch.Tensor | None:
    """The atoms along the last dimension when they are the same for every leading index (a linear's input)."""
    if ids.dim() < 1:
        return None
    rows = ids.reshape(-1, ids.shape[-1])
    if not bool((rows == rows[:1]).all()):
        return None
    return rows[0]


def _varies(t: torch.Tensor, dim: int) -> bool:
    return t.shape[dim] > 1 and not bool((t == t.narrow(dim, 0, 1)).all())


def _hw(shape) -> tuple[int, int]:
    return (int(shape[-2]), int(shape[-1])) if len(shape) >= 3 else (1, 1)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


# --------------------------------------------------------------------------------- the tracker


class ChannelFlow:
    """Walks a traced GraphModule once (running it on the example input) and fills a `Flow`."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.flow = Flow(UnionFind(), [], {}, set(), [], [], [], [])
        self.ids: dict[fx.Node, Any] = {}
        self.event = 0

    # ---- atoms
    def fresh(self, n: int, reason: str | None = None) -> torch.Tensor:
        start = len(self.flow.events)
        self.flow.events.extend([self.event] * n)
        self.event += 1
        if reason:
            for a in range(start, start + n):
                self.flow.reasons.setdefault(a, reason)
        return torch.arange(start, start + n, dtype=torch.int64)

    def fresh_like(self, value: torch.Tensor, reason: str) -> torch.Tensor:
        """Fixed atoms for a tensor whose channels have no single source: one per channel (dim 1)."""
        if value.dim() < 2:
            return self.fresh(1, reason).reshape([1] * value.dim()).expand(value.shape)
        shape = [1] * value.dim()
        shape[1] = value.shape[1]
        return self.fresh(value.shape[1], reason).reshape(shape).expand(value.shape)

    def fix(self, ids, reason: str) -> None:
        for t in _tensors(ids):
            for a in torch.unique(t).tolist():
                self.flow.reasons.setdefault(a, reason)

    def tie(self, a: torch.Tensor, b: torch.Tensor, residual: bool) -> None:
        pairs = torch.unique(torch.stack([a.reshape(-1), b.reshape(-1)], dim=1), dim=0).tolist()
        uf = self.flow.uf
        for x, y in pairs:
            if x != y and uf.find(x) != uf.find(y):
                uf.union(x, y)
                if residual:
                    self.flow.residual.update((x, y))

    def broadcast(self, vec: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        shape = [1] * value.dim()
        shape[1] = vec.numel()
        return vec.reshape(shape).expand(value.shape)

    def vector_or_fixed(self, ids: torch.Tensor, node: fx.Node, what: str, by_features: bool = False) -> torch.Tensor:
        vec = feature_vector(ids) if by_features else channel_vector(ids)
        if vec is None:
            reason = f"{what} at {node.name!r} reads channels mixed with spatial positions"
            self.fix(ids, reason)
            self.flow.unfollowed.append(reason)
            n = ids.shape[-1] if by_features else (ids.shape[1] if ids.dim() > 1 else 1)
            vec = self.fresh(int(n), reason)
        return vec

    # ---- records
    def site(self, module: str, role: str, atoms: torch.Tensor) -> None:
        self.flow.sites.append(Site(module, role, atoms.clone()))

    def unit(self, name: str, spec: UnitSpec, in_atoms, out_atoms, node: fx.Node) -> int:
        self.flow.units.append(UnitRecord(name, spec, in_atoms, out_atoms, node))
        return len(self.flow.units) - 1

    def unfollowed(self, node: fx.Node, inputs: list[torch.Tensor], value) -> Any:
        what = f"{node.op} {_name(node.target)!s}"
        if node.op == "call_module":
            what = f"{type(self.modules[node.target]).__name__} {node.target!r}"
        reason = f"{what} at node {node.name!r}: the pruning graph cannot follow channels through it"
        self.fix(inputs, reason)
        if inputs:
            self.flow.unfollowed.append(reason)
        return self._fresh_tree(value, reason)

    def _fresh_tree(self, value, reason: str):
        if isinstance(value, torch.Tensor):
            return self.fresh_like(value, reason) if value.dim() else None
        if isinstance(value, (tuple, list)):
            return type(value)(self._fresh_tree(v, reason) for v in value)
        return None

    # ---- the walk
    def run(self, example: torch.Tensor) -> Flow:
        tracker = self

        class _Interp(fx.Interpreter):
            def run_node(self, n):
                value = super().run_node(n)
                tracker.visit(n, value, self.env)
                return value

        with torch.no_grad():
            _Interp(self.gm).run(example)
        return self.flow

    def visit(self, node: fx.Node, value, env: dict) -> None:
        if node.op == "placeholder":
            self.ids[node] = self.fresh_like(value, "network input") if isinstance(value, torch.Tensor) else None
            return
        if node.op == "get_attr":
            if isinstance(value, torch.Tensor):
                reason = f"combined with the tensor attribute {node.target!r}"
                self.ids[node] = self.fresh(value.numel(), reason).reshape(value.shape) if value.numel() else None
            return
        if node.op == "output":
            self.fix([self.ids.get(n) for n in node.all_input_nodes if self.ids.get(n) is not None], "network output")
            return
        if not _tensors(value):  # sizes, shapes, flags: no channels to follow
            self.ids[node] = None
            return
        inputs = [self.ids[n] for n in node.all_input_nodes if isinstance(self.ids.get(n), torch.Tensor)
                  or isinstance(self.ids.get(n), (tuple, list))]
        if node.op == "call_module":
            mod = self.modules[node.target]
            handler = _lookup_module(type(mod))
        else:
            handler = _HANDLERS.get(node.target)
        if handler is None:
            self.ids[node] = self.unfollowed(node, _tensors(inputs), value)
            return
        self.ids[node] = handler(self, node, value, env)
        if handler is _same and isinstance(self.ids[node], torch.Tensor):
            node.meta["amc_ids"] = self.ids[node]  # a standalone activation becomes a unit of its own

    # ---- argument access
    def data(self, arg, env: dict):
        """ids for tensor nodes, the real value for anything else (sizes, shapes, scalars)."""
        return fx.node.map_arg(arg, lambda n: self.ids[n] if self.ids.get(n) is not None else env[n])

    def real(self, arg, env: dict):
        return fx.node.map_arg(arg, lambda n: env[n])


# ------------------------------------------------------------------------------------ handlers

Handler = Callable[[ChannelFlow, fx.Node, Any, dict], Any]


def _skip(flow: ChannelFlow, node, value, env):
    return None


def _same(flow: ChannelFlow, node, value, env):
    """Element-wise ops that keep channels: the output's ids are the (first) input's."""
    src = node.args[0] if node.args else next(iter(node.kwargs.values()))
    ids = flow.ids.get(src)
    if ids is None or not isinstance(value, torch.Tensor):
        return None
    return ids.expand(value.shape) if tuple(ids.shape) != tuple(value.shape) else ids


def _move(flow: ChannelFlow, node, value, env):
    """Data movement: replay the op on the ids (exact for any view, cat, split, slice, permutation)."""
    args = flow.data(node.args, env)
    kwargs = flow.data(node.kwargs, env)
    try:
        if node.op == "call_method":
            out = getattr(_contiguous(args[0]), node.target)(*args[1:], **kwargs)
        elif node.op == "call_module":
            out = flow.modules[node.target](_contiguous(args[0]))
        elif node.target in (torch.cat, torch.concat, torch.stack):
            seq = [_contiguous(a) if isinstance(a, torch.Tensor) else a for a in args[0]]
            if not all(isinstance(a, torch.Tensor) and a.dtype == torch.int64 for a in seq):
                return flow.unfollowed(node, _tensors(seq), value)
            out = node.target(seq, *args[1:], **kwargs)
        else:
            first = args[0]
            if not (isinstance(first, torch.Tensor) and first.dtype == torch.int64) and not isinstance(first, tuple):
                return flow.unfollowed(node, [i for i in _tensors(args) if i.dtype == torch.int64], value)
            out = node.target(_contiguous(first), *args[1:], **kwargs)
    except Exception:  # an index or shape that only makes sense on the real tensor
        return flow.unfollowed(node, [i for i in _tensors(args) if i.dtype == torch.int64], value)
    src = args[0] if isinstance(args[0], torch.Tensor) else None
    if src is not None and src.dtype == torch.int64:
        why = _layout_dependence(node, src, out)
        if why:
            flow.fix(src, f"{why} at {node.name!r}: that layout moves when channels are pruned")
    _maybe_copy_unit(flow, node, out, value)
    return out


_SLICING = {"chunk", "split", "narrow", "getitem", "unbind", "tensor_split"}
_RESHAPING = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}


def _layout_dependence(node, src: torch.Tensor, out) -> str | None:
    """Why the op's result would change meaning if channels of `src` were pruned: a split or slice along a
    channel dimension (its split point is fixed), or a reshape that splits one (a channel shuffle's view).
    Permutes, concatenations and flattens are safe: every channel keeps its place in the order."""
    name = _name(node.target)
    varying = [d for d in range(src.dim()) if _varies(src, d)]
    if not varying:
        return None
    if name in _SLICING:
        outs = [o for o in _tensors(out)]
        for o in outs:
            if o.dim() != src.dim():
                return f"{name} across channels" if o.dim() < src.dim() else None
            if any(o.shape[d] != src.shape[d] for d in varying):
                return f"{name} along channels"
        return None
    if name in _RESHAPING and isinstance(out, torch.Tensor):
        for in_dims, out_dims in _reshape_blocks(tuple(src.shape), tuple(out.shape)):
            if any(d in varying for d in in_dims) and len([d for d in out_dims if out.shape[d] > 1]) > 1:
                return f"{name} splitting a channel dimension"
    return None


def _reshape_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dims of `a` and `b` with equal products (how a reshape regroups dims)."""
    ia = [i for i, n in enumerate(a) if n > 1]
    ib = [i for i, n in enumerate(b) if n > 1]
    blocks, i, j = [], 0, 0
    while i < len(ia) and j < len(ib):
        da, db = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(ia):
                pa *= a[ia[i]]
                da.append(ia[i])
                i += 1
            elif pb < pa and j < len(ib):
                pb *= b[ib[j]]
                db.append(ib[j])
                j += 1
            else:
                break
        blocks.append((da, db))
    return blocks


def _contiguous(x):
    return x.contiguous() if isinstance(x, torch.Tensor) else x


_COPY_FUNCTIONS = {torch.cat, torch.concat, torch.transpose, torch.permute}
_COPY_METHODS = {"transpose", "permute"}


def _maybe_copy_unit(flow: ChannelFlow, node, out, value) -> None:
    """Concatenation and transposes move every element: one `copy` unit each (a split or a slice of
    channels is a strided view the next kernel reads)."""
    is_copy = (node.op == "call_function" and node.target in _COPY_FUNCTIONS) or (
        node.op == "call_method" and node.target in _COPY_METHODS)
    if not is_copy or not isinstance(out, torch.Tensor) or out.dim() < 3:
        return
    src = out
    vec = channel_vector(out)
    if vec is None and node.args and isinstance(node.args[0], fx.Node):  # e.g. NCHW -> NHWC: the input's channels
        src = flow.ids.get(node.args[0])
        vec = channel_vector(src) if isinstance(src, torch.Tensor) and src.dim() >= 3 else None
    if vec is None:
        return
    h, w = _hw(src.shape)
    flow.unit(node.name, UnitSpec("copy", h, w, vec.numel(), vec.numel()), vec, vec, node)


def _binary(flow: ChannelFlow, node, value, env):
    tensors = [a for a in node.args[:2] if isinstance(a, fx.Node) and flow.ids.get(a) is not None]
    if not isinstance(value, torch.Tensor):
        return None
    if len(tensors) < 2:
        return _same_as(flow, tensors[0], value) if tensors else None
    a, b = (flow.ids[t] for t in tensors)
    try:
        A, B = torch.broadcast_tensors(a, b)
    except RuntimeError:
        return flow.unfollowed(node, [a, b], value)
    a_al = a.reshape([1] * (A.dim() - a.dim()) + list(a.shape))
    b_al = b.reshape([1] * (B.dim() - b.dim()) + list(b.shape))
    a_bc = any(a_al.shape[d] == 1 and _varies(B, d) for d in range(A.dim()))
    b_bc = any(b_al.shape[d] == 1 and _varies(A, d) for d in range(A.dim()))
    residual = any(k in _name(node.target) for k in ("add", "sub"))
    if a_bc and b_bc:
        return flow.unfollowed(node, [a, b], value)
    if a_bc:
        flow.fix(a, f"broadcast across channels at {node.name!r}")
        out = B
    elif b_bc:
        flow.fix(b, f"broadcast across channels at {node.name!r}")
        out = A
    else:
        flow.tie(A, B, residual)
        out = A
    _binary_unit(flow, node, value, a, b, out, residual, a_bc or b_bc)
    return out


def _same_as(flow: ChannelFlow, src: fx.Node, value: torch.Tensor):
    ids = flow.ids[src]
    return ids.expand(value.shape) if tuple(ids.shape) != tuple(value.shape) else ids


def _binary_unit(flow: ChannelFlow, node, value, a, b, out, residual: bool, across: bool) -> None:
    if value.dim() < 2 or across:
        return
    vec = channel_vector(out)
    if vec is None:
        return
    h, w = _hw(value.shape) if value.dim() >= 3 else (1, 1)
    c = vec.numel()
    if tuple(a.shape) == tuple(b.shape):
        kind = "add" if residual else "mul"
    elif value.dim() == 4 and min(a.shape[2] * a.shape[3], b.shape[2] * b.shape[3]) == 1 and h * w > 1:
        kind = "add" if residual else "gate"  # a per-channel [N, C, 1, 1] operand: squeeze-excite's gate
    else:
        return
    flow.unit(node.name, UnitSpec(kind, h, w, c, c), vec, vec, node)


def _conv(flow: ChannelFlow, node, value, env):
    mod: nn.Conv2d = flow.modules[node.target]
    name = str(node.target)
    ids = flow.ids[node.args[0]]
    vec = flow.vector_or_fixed(ids, node, f"conv {name!r}")
    x = env[node.args[0]]
    k, s = mod.kernel_size, mod.stride
    pad = mod.padding
    if isinstance(pad, str):
        pad = tuple(d * (kk - 1) // 2 for d, kk in zip(mod.dilation, k)) if pad == "same" else (0, 0)
    square = k[0] == k[1] and s[0] == s[1] and pad[0] == pad[1] and mod.dilation == (1, 1) \
        and mod.padding_mode == "zeros"
    g = mod.groups
    cin_g, cout_g = mod.in_channels // g, mod.out_channels // g
    h, w = _hw(x.shape)
    if g == 1:
        out = flow.fresh(mod.out_channels)
        flow.site(name, "conv_in", vec)
        flow.site(name, "conv_out", out)
    else:
        blocks = vec.reshape(g, cin_g)
        uf = flow.flow.uf
        for row in blocks.tolist():
            for a in row[1:]:
                if uf.find(a) != uf.find(row[0]):
                    uf.union(row[0], a)
        out = blocks[:, :1].expand(g, cout_g).reshape(-1)
        if cin_g == 1 and cout_g == 1:
            flow.site(name, "dw", vec)
        else:
            flow.site(name, "gconv_in", vec)
            flow.site(name, "gconv_out", out)
    if not square:
        reason = f"conv {name!r} has a non-square kernel, stride, padding or a dilation: no latency unit for it"
        flow.flow.unfollowed.append(reason)
        flow.fix([vec, out], reason)
    else:
        dw = cin_g == 1 and cout_g == 1 and g > 1
        spec = UnitSpec("dwconv" if dw else "conv", h, w, mod.in_channels, mod.out_channels, k[0], s[0], pad[0], g)
        u = flow.unit(name, spec, vec, out, node)
        if g == 1:
            flow.flow.layers.append(LayerRecord(name, "conv", u, k[0], s[0], h, w, mod.weight.numel()))
    return flow.broadcast(out, value)


def _linear(flow: ChannelFlow, node, value, env):
    mod: nn.Linear = flow.modules[node.target]
    name = str(node.target)
    ids = flow.ids[node.args[0]]
    vec = flow.vector_or_fixed(ids, node, f"linear {name!r}", by_features=True)
    out = flow.fresh(mod.out_features)
    flow.site(name, "linear_in", vec)
    flow.site(name, "linear_out", out)
    rows = max(1, int(value.numel() // max(1, mod.out_features)))
    spec = UnitSpec("linear", 1, 1, mod.in_features, mod.out_features, batch=rows)
    u = flow.unit(name, spec, vec, out, node)
    flow.flow.layers.append(LayerRecord(name, "linear", u, 1, 1, 1, 1, mod.weight.numel()))
    shape = [1] * value.dim()
    shape[-1] = mod.out_features
    return out.reshape(shape).expand(value.shape)


def _batchnorm(flow: ChannelFlow, node, value, env):
    ids = flow.ids[node.args[0]]
    vec = channel_vector(ids)
    if vec is None:
        flow.fix(ids, f"batch norm {node.target!r} over channels mixed with positions")
        return ids
    flow.site(str(node.target), "bn", vec)
    src = node.args[0]
    folded = (src.op == "call_module" and isinstance(flow.modules.get(src.target), nn.Conv2d) and len(src.users) == 1)
    if not folded and ids.dim() == 4:  # a BN the runtime cannot fold into a conv runs as a kernel of its own
        h, w = _hw(ids.shape)
        flow.unit(str(node.target), UnitSpec("bn", h, w, vec.numel(), vec.numel()), vec, vec, node)
    return ids


def _normalise_together(flow: ChannelFlow, node, value, env):
    """LayerNorm / GroupNorm / softmax: every output depends on all the channels normalised together, so
    pruning one changes the others; those channels are fixed, the ids pass through."""
    ids = flow.ids[node.args[0]]
    what = type(flow.modules[node.target]).__name__ if node.op == "call_module" else _name(node.target)
    flow.fix(ids, f"normalised together by {what} at {node.name!r} (pruning one channel changes the others)")
    return ids


def _layernorm(flow: ChannelFlow, node, value, env):
    """A LayerNorm over the last dimension (channels-last MLP blocks, ConvNeXt): its channels are fixed like
    any normalisation's, and it is a unit of its own, so that the table measures it at its channel count
    rather than leaving it to the calibration's offset."""
    ids = _normalise_together(flow, node, value, env)
    mod: nn.LayerNorm = flow.modules[node.target]
    vec = feature_vector(ids)
    if vec is None or len(mod.normalized_shape) != 1 or not isinstance(value, torch.Tensor) or value.dim() < 2:
        return ids
    c = vec.numel()
    rows = value.numel() // c
    h, w = (value.shape[1], value.shape[2]) if value.dim() == 4 else (1, rows)
    flow.unit(str(node.target), UnitSpec("layernorm", h, w, c, c, batch=rows // (h * w)), vec, vec, node)
    return ids


def _spatial(flow: ChannelFlow, node, value, env):
    """Per-channel spatial ops (pooling, padding, resizing): each output channel is its input channel."""
    src = node.args[0]
    ids = flow.ids[src]
    x = env[src]
    if not isinstance(value, torch.Tensor) or value.dim() != x.dim() or value.shape[1] != x.shape[1]:
        return flow.unfollowed(node, [ids], value)
    vec = flow.vector_or_fixed(ids, node, _name(node.target))
    spec = _pool_spec(flow, node, x, value)
    if spec is not None:
        flow.unit(str(node.target) if node.op == "call_module" else node.name, spec, vec, vec, node)
    return flow.broadcast(vec, value)


def _pool_spec(flow: ChannelFlow, node, x: torch.Tensor, y: torch.Tensor) -> UnitSpec | None:
    if x.dim() != 4:
        return None
    h, w = x.shape[2], x.shape[3]
    c = x.shape[1]
    mod = flow.modules.get(node.target) if node.op == "call_module" else None
    fn = node.target
    ho, wo = y.shape[2], y.shape[3]
    if isinstance(mod, nn.AdaptiveAvgPool2d) or fn is F.adaptive_avg_pool2d:
        if ho == wo == 1:
            return UnitSpec("pool", h, w, c, c, kernel=0)
        if h % ho == 0 and w % wo == 0 and h // ho == w // wo:
            return UnitSpec("avgpool", h, w, c, c, h // ho, h // ho)
        return None
    if isinstance(mod, nn.AdaptiveMaxPool2d) or fn is F.adaptive_max_pool2d:
        if h % ho == 0 and w % wo == 0 and h // ho == w // wo:
            return UnitSpec("pool", h, w, c, c, h // ho, h // ho)
        return None
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        k, s, p = (v if isinstance(v, int) else v[0] for v in (mod.kernel_size, mod.stride or mod.kernel_size,
                                                                mod.padding))
        return UnitSpec("pool" if isinstance(mod, nn.MaxPool2d) else "avgpool", h, w, c, c, k, s, p)
    if fn in (F.max_pool2d, F.avg_pool2d):
        args = list(node.args) + [None] * 4
        kw = node.kwargs
        k = kw.get("kernel_size", args[1])
        s = kw.get("stride", args[2]) or k
        p = kw.get("padding", args[3] if args[3] is not None else 0)
        k, s, p = (v if isinstance(v, int) else v[0] for v in (k, s, p))
        return UnitSpec("pool" if fn is F.max_pool2d else "avgpool", h, w, c, c, k, s, p)
    return None


def _reduce(flow: ChannelFlow, node, value, env):
    """mean / sum / amax / ... over some dims: followed when every reduced dim holds one atom per slice
    (a global pool over H, W); a reduction across channels fixes them."""
    src = node.args[0]
    ids = flow.ids[src]
    x = env[src]
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if not isinstance(value, torch.Tensor):  # e.g. max(dim) returns (values, indices)
        value = value[0] if isinstance(value, (tuple, list)) and value else None
        if value is None:
            return flow.unfollowed(node, [ids], value)
    if dims is None:
        return flow.unfollowed(node, [ids], value)
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(d % x.dim() for d in dims)
    if any(_varies(ids, d) for d in dims):
        reason = f"{_name(node.target)} across channels at {node.name!r}"
        flow.fix(ids, reason)
        return flow._fresh_tree(value, reason)
    out = ids
    for d in reversed(dims):
        out = out.narrow(d, 0, 1)
        if not keep:
            out = out.squeeze(d)
    if x.dim() == 4 and dims == [2, 3] and _name(node.target) in REDUCTIONS:
        vec = channel_vector(ids)
        if vec is not None:
            # measured as written: the runtime does not run a mean without keepdim as the global pool it equals
            spec = UnitSpec(_name(node.target), x.shape[2], x.shape[3], vec.numel(), vec.numel(), kernel=int(bool(keep)))
            flow.unit(node.name, spec, vec, vec, node)
    return out.expand(value.shape) if tuple(out.shape) != tuple(value.shape) else out


_SAME_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                 nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
                 nn.AlphaDropout)
_SPATIAL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Upsample,
                    nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ConstantPad2d)
_MOVE_MODULES = (nn.Flatten, nn.Unflatten)

_MODULE_HANDLERS: dict[type, Handler] = {nn.Conv2d: _conv, nn.Linear: _linear, nn.BatchNorm2d: _batchnorm,
                                         nn.BatchNorm1d: _batchnorm, nn.LayerNorm: _layernorm,
                                         nn.GroupNorm: _normalise_together, nn.Softmax: _normalise_together,
                                         nn.InstanceNorm2d: _normalise_together}
_MODULE_HANDLERS.update({t: _same for t in _SAME_MODULES})
_MODULE_HANDLERS.update({t: _spatial for t in _SPATIAL_MODULES})
_MODULE_HANDLERS.update({t: _move for t in _MOVE_MODULES})


def _lookup_module(t: type) -> Handler | None:
    for base in t.__mro__:
        if base in _MODULE_HANDLERS:
            return _MODULE_HANDLERS[base]
    return None


_SAME_FUNCTIONS = [F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu,
                   torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.hardtanh, F.elu, F.mish,
                   F.softplus, torch.clamp, torch.clip, F.dropout, F.dropout2d, torch.neg, operator.neg,
                   torch.abs, torch.exp, torch.square, torch.sqrt, torch.rsqrt]
_SAME_METHODS = ["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
                 "contiguous", "clone", "detach", "float", "to", "type_as", "neg", "abs", "exp", "square", "sqrt",
                 "hardtanh_", "requires_grad_"]
_MOVE_FUNCTIONS = [torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack, torch.chunk, torch.split,
                   torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.narrow, operator.getitem,
                   torch.unflatten, torch.movedim, torch.t]
_MOVE_METHODS = ["view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand",
                 "expand_as", "chunk", "split", "narrow", "unflatten", "movedim", "t", "view_as", "reshape_as"]
_BINARY = [operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
           operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.multiply, torch.subtract]
_BINARY_METHODS = ["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"]
_SPATIAL_FUNCTIONS = [F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.interpolate,
                      F.pad]
_REDUCE_FUNCTIONS = [torch.mean, torch.sum, torch.amax, torch.amin]
_REDUCE_METHODS = ["mean", "sum", "amax", "amin"]
_NORMALISE_FUNCTIONS = [F.layer_norm, F.group_norm, F.softmax, torch.softmax, F.log_softmax, F.normalize]
_NORMALISE_METHODS = ["softmax", "log_softmax"]
_SKIP_METHODS = ["size", "dim", "numel", "type", "get_device"]

_HANDLERS: dict[Any, Handler] = {}
for _keys, _h in ((_SAME_FUNCTIONS, _same), (_SAME_METHODS, _same), (_MOVE_FUNCTIONS, _move),
                  (_MOVE_METHODS, _move), (_BINARY, _binary), (_BINARY_METHODS, _binary),
                  (_SPATIAL_FUNCTIONS, _spatial), (_REDUCE_FUNCTIONS, _reduce), (_REDUCE_METHODS, _reduce),
                  (_NORMALISE_FUNCTIONS, _normalise_together), (_NORMALISE_METHODS, _normalise_together),
                  (_SKIP_METHODS, _skip), ([getattr], _skip)):
    for _k in _keys:
        _HANDLERS[_k] = _h


def follow(gm: fx.GraphModule, example: torch.Tensor) -> Flow:
    """Run `gm` (eval) on `example` and follow its channels."""
    return ChannelFlow(gm).run(example)


__all__ = ["Flow", "Site", "UnitRecord", "LayerRecord", "follow", "channel_vector", "feature_vector",
           "ACT_OF_MODULE", "ACT_OF_FUNCTION", "ACT_OF_METHOD"]
