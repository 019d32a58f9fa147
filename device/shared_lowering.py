"""Lower a whole batch of candidates through ExecuTorch once, then give each its own method.

Lowering one program per method pays ExecuTorch's fixed costs once per method: three
`run_decompositions` (each re-registering ~560 composite ops) and the edge passes, ~0.35 s of CPU
for a small unit, most of a table build's time. Here the batch's modules become the branches of one
module (`_Branches`: input i -> module i -> output i), exported and lowered once with a partitioner
that cuts XNNPACK's partitions at branch boundaries, so each branch becomes exactly one delegate.
Each delegate then becomes its own method (a graph holding nothing but the delegate call): the
`.pte` has the same methods, running the same XNNPACK blobs, as lowering them one by one
(tests/test_shared_lowering.py compares outputs bit for bit), for about half the CPU
(benchmarks/lowering_speed.py). XNNPACK would still run its delegate passes once per unit;
device/merged_preprocess.py makes that once per chunk (0.186 -> 0.134 s per unit).

Only when every branch comes out as a single delegate fed by its own input is the result used;
otherwise (an op XNNPACK does not take, modules sharing parameters, anything unusual)
`lower_shared` returns None and the caller lowers the candidates one program per method.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Sequence

import torch
from torch import nn

from .base import Candidate
from .graph_components import connected_components
from .merged_preprocess import merged_passes


class _Branches(nn.Module):
    """Branch i maps input i to output i; no branch sees another's tensors."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(modules)  # named children: ExecuTorch's BN fusion needs them

    def forward(self, *inputs):
        return tuple(branch(x) for branch, x in zip(self.branches, inputs))


def _per_branch_partitioner():
    """XnnpackPartitioner whose partitions never span two branches (it merges disjoint subgraphs
    into one partition when it can; one delegate per branch is what lets a branch be a method)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from torch.fx.passes.infra.partitioner import Partition

    class PerBranchXnnpackPartitioner(XnnpackPartitioner):
        def generate_partitions(self, ep):
            component = connected_components(ep.graph_module.graph)
            split = []
            for partition in super().generate_partitions(ep):
                groups: dict[torch.fx.Node, list] = {}
                for node in partition.nodes:
                    groups.setdefault(component[node], []).append(node)
                split.extend(Partition(id=len(split) + i, nodes=nodes) for i, nodes in enumerate(groups.values()))
            return split

    return PerBranchXnnpackPartitioner()


def _branch_delegates(edge_program, n_branches: int) -> list[tuple] | None:
    """(input placeholder, delegate call, output getitem) per branch, in branch order; None unless
    every branch is exactly `input i -> executorch_call_delegate -> getitem -> output i`."""
    gm = edge_program.graph_module
    user_inputs = list(edge_program.graph_signature.user_inputs)
    outputs = list(gm.graph.output_node().args[0])
    if len(user_inputs) != n_branches or len(outputs) != n_branches:
        return None
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    component = connected_components(gm.graph)
    members: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "output":
            members.setdefault(component[node], set()).add(node)
    found = []
    for name, out in zip(user_inputs, outputs):
        x = placeholders.get(name)
        if x is None or not isinstance(out, torch.fx.Node) or out.target is not operator.getitem:
            return None
        call = out.args[0]
        if call.target is not torch.ops.higher_order.executorch_call_delegate:
            return None
        attr, *args = call.args
        if args != [x] or attr.op != "get_attr" or members[component[x]] != {x, attr, call, out}:
            return None
        found.append((x, call, out))
    return found


def _method_program(lowered: nn.Module, x, call, out, example: torch.Tensor):
    """The ExportedProgram `torch.export` would make of `lambda x: lowered(x)[0]`, built directly:
    exporting a wrapper per method costs ~30 ms and produces the same `.pte` bytes."""
    from torch.export import ExportedProgram
    from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
    from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec,
                                              TensorArgument)
    from torch.utils import _pytree as pytree

    graph = torch.fx.Graph()
    new_x = graph.placeholder("x")
    new_x.meta.update({k: x.meta[k] for k in ("val", "tensor_meta") if k in x.meta})
    new_attr = graph.get_attr("lowered_module_0")
    new_call = graph.call_function(call.target, (new_attr, new_x))
    new_call.meta["val"] = call.meta["val"]
    new_out = graph.call_function(operator.getitem, (new_call, out.args[1]))
    new_out.meta["val"] = out.meta["val"]
    graph.output((new_out,))
    root = nn.Module()
    root.lowered_module_0 = lowered
    gm = torch.fx.GraphModule(root, graph)
    signature = ExportGraphSignature(
        input_specs=[InputSpec(InputKind.USER_INPUT, TensorArgument(new_x.name), None)],
        output_specs=[OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(new_out.name), None)],
    )
    call_graph = [ModuleCallEntry("", ModuleCallSignature(
        inputs=[], outputs=[], in_spec=pytree.tree_flatten(((example,), {}))[1],
        out_spec=pytree.tree_flatten((example,))[1], forward_arg_names=["x"]))]
    return ExportedProgram(root=gm, graph=gm.graph, graph_signature=signature, state_dict={}, range_constraints={},
                           module_call_graph=call_graph, constants={})


# Lowering a combined program costs more than linearly in its size (measured: per method, 16-48
# units cost about the same, 64 at once ~15% more, two whole MobileNet-V2s ~40% more than lowered
# apart). So only small candidates are combined, at most CHUNK per lowering, and the methods of all
# chunks go into one `.pte`.
MAX_LEAF_MODULES = 8  # a fused unit has 1-3 (conv, BN, activation); a whole model has dozens
CHUNK = 32


def _leaf_modules(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if next(m.children(), None) is None)


def worth_sharing(candidates: Sequence[Candidate]) -> bool:
    """Several candidates, each a small unit: the case where one lowering for many methods pays."""
    return len(candidates) > 1 and all(_leaf_modules(c.module) <= MAX_LEAF_MODULES for c in candidates)


def _chunk_methods(candidates: Sequence[Candidate], merge_passes: bool = True) -> dict | None:
    """{name: method program} for one chunk lowered as one program, or None (see lower_shared)."""
    from executorch.exir import to_edge_transform_and_lower

    branches = _Branches([c.module.eval() for c in candidates]).eval()
    inputs = tuple(c.example_input for c in candidates)
    with torch.no_grad():
        program = torch.export.export(branches, inputs, strict=False)
    with merged_passes() if merge_passes else contextlib.nullcontext():
        edge = to_edge_transform_and_lower(program, partitioner=[_per_branch_partitioner()])
    lowered_program = edge.exported_program()
    found = _branch_delegates(lowered_program, len(candidates))
    if found is None:
        return None
    gm = lowered_program.graph_module
    return {
        c.name: _method_program(getattr(gm, call.args[0].target), x, call, out, c.example_input)
        for c, (x, call, out) in zip(candidates, found)
    }


def lower_shared(candidates: Sequence[Candidate], chunk: int = CHUNK, merge_passes: bool = True) -> bytes | None:
    """The `.pte` bytes with one method per candidate (named after it), or None when a chunk does
    not lower as one delegate per candidate (the caller then lowers them one by one).
    `merge_passes`: XNNPACK's delegate passes run once per chunk (device/merged_preprocess.py),
    not once per candidate; the bytes are the same either way.
    Exceptions from export or lowering propagate: the caller's fallback finds the culprit."""
    from executorch.exir import EdgeCompileConfig, EdgeProgramManager

    methods: dict = {}
    for start in range(0, len(candidates), max(1, chunk)):
        part = _chunk_methods(candidates[start:start + chunk], merge_passes)
        if part is None:
            return None
        methods.update(part)
    # The methods are already what the edge dialect would make of them (a delegate call and a
    # getitem): skip to_edge's decompositions, the per-method cost this module exists to avoid.
    manager = EdgeProgramManager(methods, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return manager.to_executorch().buffer
