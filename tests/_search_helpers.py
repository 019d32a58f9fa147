"""Shared pieces of the search tests: a tiny CNN with 3x3, 1x1 and linear decision layers (trained for a
few hundred steps and cached in pytest's cache), and a latency model made of real unit-key lookups."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.pruning import PruningGraph

TINY_VERSION = "tinynet-v1-s0-300steps"


class TinyNet(nn.Module):
    """stem 3x3 (input fixed) -> 3x3 conv (decision: stem channels, k x k) -> 1x1 conv (decision) -> pool -> fc (decision)."""

    def __init__(self, c0: int = 24, c1: int = 48, c2: int = 64):
        super().__init__()
        self.input_shape = (1, 28, 28)
        self.stem = nn.Conv2d(1, c0, 3, 2, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(c0)
        self.conv1 = nn.Conv2d(c0, c1, 3, 2, 1, bias=True)  # a bias before BN: reconstruction must handle it
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def fashion():
    from amc_mobile.data import load_fashion_mnist

    try:
        return load_fashion_mnist()
    except AmcError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")


def train_tiny(data, steps: int = 300, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = data.train.images, data.train.labels
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y_all), (64,), generator=gen)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def cached_tiny(request, data) -> TinyNet:
    """The trained TinyNet, from pytest's cache when an earlier session trained it."""
    folder = request.config.cache.mkdir("amc-search-tinynet")
    path = folder / f"{TINY_VERSION}.pt"
    model = TinyNet()
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        except Exception:
            path.unlink()
    model = train_tiny(data)
    # parallel workers may train it at once: each writes its own file, the rename is atomic
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


class TableLatency:
    """A LatencyModel look-alike: a table from UnitSpec.key() to ms, looked up unit by unit.

    The table is filled for every grid configuration of every unit, with a deliberately nonlinear
    latency: a per-unit overhead, FLOPs^0.8, and a penalty for channel counts that are not
    multiples of 16 (SIMD remainder loops). A configuration outside the table is a KeyError,
    like OFA's LUTs."""

    scale, offset = 1.0, 0.0  # no overhead fit (what `cost.predict_mixed` reads of a LatencyModel)

    def __init__(self, graph: PruningGraph, groups: list[int], lbound: float = 0.2, grid: int = 8):
        from amc_mobile.search.env import grid_counts

        self.graph = graph
        self.table: dict[str, float] = {}
        choices = {g: grid_counts(graph.groups[g].size, lbound, 1.0, grid) for g in groups}
        for u in graph.units:
            ins = choices.get(u.in_group, [u.spec.c_in]) if u.in_group is not None else [u.spec.c_in]
            outs = choices.get(u.out_group, [u.spec.c_out]) if u.out_group is not None else [u.spec.c_out]
            for ci, co in itertools.product(ins, outs):
                spec = u.spec.with_channels(ci, co)
                self.table[spec.key()] = self.latency(spec)

    @staticmethod
    def latency(spec) -> float:
        penalty = 1.3 if (spec.c_out % 16 or spec.c_in % 16) else 1.0
        return 0.002 + 1e-5 * penalty * spec.flops() ** 0.8

    def unit_latencies(self, channels):
        return [self.table[spec.key()] for spec in self.graph.units_for(dict(channels or {}))]

    def predict(self, channels=None) -> float:
        return float(sum(self.unit_latencies(channels)))

    @property
    def full_latency_ms(self) -> float:
        return self.predict({})
