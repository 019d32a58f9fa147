"""Connected components of an fx graph: how a batch of independent units is told apart after
ExecuTorch has put them in one graph (device/shared_lowering.py, device/merged_preprocess.py)."""

from __future__ import annotations

import torch


def connected_components(graph: torch.fx.Graph) -> dict[torch.fx.Node, torch.fx.Node]:
    """Each node's connected component (a representative node), ignoring the output node that
    joins all branches: union-find over the graph's edges."""
    parent: dict[torch.fx.Node, torch.fx.Node] = {n: n for n in graph.nodes}

    def find(node):
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for node in graph.nodes:
        if node.op == "output":
            continue
        for src in node.all_input_nodes:
            a, b = find(node), find(src)
            if a is not b:
                parent[a] = b
    return {n: find(n) for n in graph.nodes}
