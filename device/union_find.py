"""A union-find (disjoint sets) over hashable items: the one used for fx graph components and for
the channels the pruning graph ties together."""

from __future__ import annotations

from typing import Hashable


class UnionFind:
    """Items join on first use; `union` keeps the smaller root when items are ordered (stable ids)."""

    def __init__(self) -> None:
        self.parent: dict[Hashable, Hashable] = {}

    def find(self, x: Hashable) -> Hashable:
        parent = self.parent
        root = parent.setdefault(x, x)
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: Hashable, b: Hashable) -> Hashable:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        try:
            keep, drop = (ra, rb) if ra <= rb else (rb, ra)
        except TypeError:  # unordered items (fx nodes): any root will do
            keep, drop = rb, ra
        self.parent[drop] = keep
        return keep
