"""Connected components of an fx graph: how a batch of independent units is told apart after
ExecuTorch has put them in one graph (device/shared_lowering.py, device/merged_preprocess.py)."""

from __future__ import annotations

import torch

from .union_find import UnionFind


def connected_components(graph: torch.fx.Graph) -> dict[torch.fx.Node, torch.fx.Node]:
    """Each node's connected component (a representative node), ignoring the output node that
    joins all branches: union-find over the graph's edges."""
    uf = UnionFind()
    for node in graph.nodes:
        if node.op == "output":
            continue
        for src in node.all_input_nodes:
            uf.union(node, src)
    return {n: uf.find(n) for n in graph.nodes}
