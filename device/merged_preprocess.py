"""Run XNNPACK's delegate passes once for all the partitions of a method, not once per partition.

XNNPACK's `preprocess` runs 17 graph passes over each partition before serialising it; most retrace
the whole graph through fake tensors, so each costs a few milliseconds however small the graph is.
When a batch of units is lowered as one program (device/shared_lowering.py), every unit is its own
partition and those passes were ~30% of the lowering (measured: 77 ms of 253 ms per unit). Here,
while `merged_passes()` is active, XNNPACK's `preprocess_multimethod` merges a method's partitions
into one program (a disjoint union: their nodes keep their names, which are already unique), runs
the passes over it once, splits the result back into one program per partition, and serialises each
with XNNPACK's own `preprocess`, passes skipped. Passes that only act on ops the merged graph does
not hold (attention, cat, 1-d convolutions, quantisation, ...: `_ONLY_WITH_OPS`) are left out.
XNNPACK's passes are local to a connected component (fusions, constant folding, layout copies
around inputs and outputs), and constant data is keyed by content, so the blobs are byte for byte
what per-partition preprocessing makes (tests/test_merged_preprocess.py). Measured
(benchmarks/lowering_speed.py, 32 units): 0.186 -> 0.134 s of lowering per unit.

Anything unexpected (a partition with its own compile specs, a component that does not map back to
exactly one partition, an exception) falls back to XNNPACK's per-partition preprocessing for that
method.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch

from .graph_components import connected_components


def _outputs(program) -> list:
    return list(program.graph.output_node().args[0])


def _merge(programs: Sequence, verifier):
    """One ExportedProgram holding every program's graph side by side: parameter placeholders first,
    then user inputs, then the computations, one output tuple. None if their names collide."""
    from torch.export import ExportedProgram
    from torch.export.graph_signature import ExportGraphSignature, InputKind

    graph = torch.fx.Graph()
    envs: list[dict] = [{} for _ in programs]
    specs = [{s.arg.name: s for s in p.graph_signature.input_specs if hasattr(s.arg, "name")} for p in programs]
    names: set[str] = set()
    input_specs, output_specs, outputs = [], [], []
    state_dict, constants = {}, {}
    for user_pass in (False, True):  # params/buffers/constants, then user inputs: signature order
        for p, env, by_name in zip(programs, envs, specs):
            for node in p.graph.nodes:
                if node.op != "placeholder":
                    continue
                spec = by_name.get(node.name)
                if spec is None:
                    return None
                if (spec.kind == InputKind.USER_INPUT) != user_pass:
                    continue
                if node.name in names:
                    return None
                names.add(node.name)
                env[node] = graph.node_copy(node)
                input_specs.append(spec)
    for p, env in zip(programs, envs):
        for node in p.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.name in names:
                return None
            names.add(node.name)
            env[node] = graph.node_copy(node, lambda n, env=env: env[n])
        outputs.extend(env[o] for o in _outputs(p))
        output_specs.extend(p.graph_signature.output_specs)
        state_dict.update(p.state_dict)
        constants.update(p.constants)
    graph.output(tuple(outputs))
    root = torch.nn.Module()
    for p in programs:  # get_attr targets (rare in edge programs, whose constants are lifted)
        for node in p.graph.nodes:
            if node.op == "get_attr":
                setattr(root, node.target, getattr(p.graph_module, node.target))
    gm = torch.fx.GraphModule(root, graph)
    return ExportedProgram(root=gm, graph=gm.graph,
                           graph_signature=ExportGraphSignature(input_specs=input_specs, output_specs=output_specs),
                           state_dict=state_dict, range_constraints={}, module_call_graph=[],
                           example_inputs=None, constants=constants, verifiers=[verifier])


def _split(merged, programs: Sequence, verifier) -> list | None:
    """The transformed merged program cut back into one program per original partition, or None
    unless every node belongs to exactly one partition's component."""
    from torch.export import ExportedProgram
    from torch.export.graph_signature import ExportGraphSignature, InputKind

    graph = merged.graph
    component = connected_components(graph)
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    specs = {s.arg.name: s for s in merged.graph_signature.input_specs if hasattr(s.arg, "name")}
    owner: dict[torch.fx.Node, int] = {}  # component representative -> partition index
    for i, p in enumerate(programs):
        for name in p.graph_signature.user_inputs:
            node = placeholders.get(name)
            if node is None or owner.setdefault(component[node], i) != i:
                return None
    if len(set(owner.values())) != len(programs):
        return None
    out_args = list(graph.output_node().args[0])
    counts = [len(_outputs(p)) for p in programs]
    out_specs = list(merged.graph_signature.output_specs)
    if len(out_args) != sum(counts) or len(out_specs) != len(out_args):
        return None
    members: list[list[torch.fx.Node]] = [[] for _ in programs]
    for node in graph.nodes:
        if node.op == "output":
            continue
        i = owner.get(component[node])
        if i is None:
            if node.op == "placeholder" and not node.users and specs.get(node.name) is not None \
                    and specs[node.name].kind != InputKind.USER_INPUT:
                continue  # a weight the passes folded away (BN into conv): nobody reads it
            return None
        members[i].append(node)
    parts, start = [], 0
    for i, p in enumerate(programs):
        outs, o_specs = out_args[start:start + counts[i]], out_specs[start:start + counts[i]]
        start += counts[i]
        if any(not isinstance(o, torch.fx.Node) or owner.get(component[o]) != i for o in outs):
            return None
        g = torch.fx.Graph()
        env: dict = {}
        for node in members[i]:
            env[node] = g.node_copy(node, lambda n: env[n])
        g.output([env[o] for o in outs])
        gm = torch.fx.GraphModule(merged.graph_module, g)
        i_specs = [specs[n.name] for n in members[i] if n.op == "placeholder"]
        parts.append(ExportedProgram(root=gm, graph=gm.graph,
                                     graph_signature=ExportGraphSignature(input_specs=i_specs, output_specs=o_specs),
                                     state_dict=merged.state_dict, range_constraints={},
                                     module_call_graph=p.module_call_graph, example_inputs=p.example_inputs,
                                     constants=merged.constants, verifiers=[verifier]))
    return parts


# XNNPACK passes that act only on graphs holding certain ops, and the op-name fragments that let
# them act (read from their sources in executorch 1.4.1, the only version they are left out on).
# Over a graph without any of them the pass only retraces it (a few ms per pass per batch, for
# nothing). Passes not named here always run.
_PASSES_READ_IN = "1.4.1"
_ONLY_WITH_OPS = {
    "ConvertToSDPAPass": ("softmax", "matmul", "bmm"),  # SDPA patterns
    "ConvertToUpsampleBilinear2d": ("index", "upsample"),  # bilinear interpolation patterns
    "DecomposeConcatenate": ("aten.cat",),
    "Conv1dUnsqueezePass": ("conv1d",),  # a 1-d convolution: named so by _passes_for
    "PReLUReshapePass": ("prelu",),
    "RemoveGetItemPass": ("max_pool2d_with_indices", "aten.max."),
    "PropagateCustomMetaPass": ("quantize",),
    "InsertPadQDQPass": ("constant_pad_nd",),
    "DimOrderOpsRevertPass": ("dim_order",),
}


def _passes_for(graph: torch.fx.Graph, passes: Sequence[type]) -> list[type]:
    """`passes` minus those that cannot act on `graph` (see _ONLY_WITH_OPS)."""
    if _executorch_version() != _PASSES_READ_IN:
        return list(passes)
    ops = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        # edge graphs name every convolution alike; a 1-d one is told by its 1-element stride
        ops.add("conv1d" if "convolution" in name and len(node.args) > 3 and len(node.args[3]) == 1 else name)
    kept = []
    for p in passes:
        needs = _ONLY_WITH_OPS.get(p.__name__)
        if needs is None or any(n in op for op in ops for n in needs):
            kept.append(p)
    return kept


@functools.lru_cache(maxsize=None)
def _executorch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("executorch")
    except PackageNotFoundError:
        return ""


class _PassesAlreadyRun:
    """Stands in for XNNPACKPassManager inside `preprocess` for programs whose passes already ran."""

    def __init__(self, exported_program, passes=None):
        self.exported_program = exported_program

    def transform(self):
        return self.exported_program


def _preprocess_merged(backend, programs: list, specs: list) -> list | None:
    """PreprocessResults for one method's partitions through one pass run, or None to fall back."""
    import executorch.backends.xnnpack.xnnpack_preprocess as xp
    from executorch.backends.xnnpack._passes import XNNPACKPassManager
    from executorch.exir.verification.verifier import EXIREdgeDialectVerifier

    if len(programs) < 2 or any(spec for spec in specs):  # compile specs can select other passes
        return None
    verifier = EXIREdgeDialectVerifier(edge_compile_config=xp.get_xnnpack_edge_compile_config(), class_only=True)
    merged = _merge(programs, verifier)
    if merged is None:
        return None
    passes = _passes_for(merged.graph, XNNPACKPassManager(merged).passes)
    transformed = XNNPACKPassManager(merged, passes=passes).transform()
    parts = _split(transformed, programs, verifier)
    if parts is None:
        return None
    original, xp.XNNPACKPassManager = xp.XNNPACKPassManager, _PassesAlreadyRun
    try:
        return [backend.preprocess(part, spec) for part, spec in zip(parts, specs)]
    finally:
        xp.XNNPACKPassManager = original


@contextlib.contextmanager
def merged_passes():
    """While active, XNNPACK preprocesses each method's partitions with one run of its passes."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    own = XnnpackBackend.__dict__.get("preprocess_multimethod")  # None: BackendDetails' loop
    inherited = XnnpackBackend.preprocess_multimethod

    def preprocess_multimethod(cls, edge_programs, compile_specs):
        results = {}
        for method, programs in edge_programs.items():
            try:
                merged = _preprocess_merged(cls, list(programs), list(compile_specs[method]))
            except Exception:  # noqa: BLE001 - XNNPACK's own path decides what is an error
                merged = None
            results[method] = merged if merged is not None else \
                inherited.__func__(cls, {method: programs}, {method: compile_specs[method]})[method]
        return results

    XnnpackBackend.preprocess_multimethod = classmethod(preprocess_multimethod)
    try:
        yield
    finally:
        if own is None:
            del XnnpackBackend.preprocess_multimethod
        else:
            XnnpackBackend.preprocess_multimethod = own
