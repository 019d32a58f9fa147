"""Latency tables for models: a model reference becomes a `latency_tables.network.Target` (the
network's units, the search's scope, and this package's pruning), which the tables build, load,
recalibrate and validate against. The tables themselves never import models or pruning; these
functions take what users name a model by (a registry name, a folder, FILE.py:FACTORY or a module)."""

from __future__ import annotations

import os

from torch import nn

from device import Device
from latency_tables.build import build_table as _build_table
from latency_tables.build import build_tables as _build_tables
from latency_tables.build import ensure_table as _ensure_table
from latency_tables.loading import load_latency_model as _load_latency_model
from latency_tables.network import Target
from latency_tables.predict import LatencyModel

from .errors import AmcError
from .pruning.graph import SCOPES, PruningGraph, build_graph, default_scope
from .pruning.slicing import prune_by_counts

__all__ = ["resolve_target", "default_scope", "build_table", "build_tables", "ensure_table", "load_latency_model",
           "Target"]


def resolve_target(model, graph: PruningGraph | None = None, scope: str | None = None, options=None) -> Target:
    """`model`: a registry name, a pruned-model/checkpoint folder, FILE.py:FACTORY (str or Path), an
    nn.Module or a Target (returned as it is); `options`: amc_mobile.model_io.ModelOptions for a reference."""
    if isinstance(model, Target):
        return model
    if isinstance(model, nn.Module):
        module = model
        label = getattr(model, "amc_config", {}).get("name") or getattr(model, "amc_label", None) \
            or type(model).__name__
    else:
        from .model_io import load_model

        loaded = load_model(str(model), options=options)
        if loaded.module is None:
            raise AmcError(f"{model} is a compiled .pte: a latency table needs the model's layers "
                           f"(pass a registry name or a pruned-model folder)")
        module, label = loaded.module, str(model)
    module = module.eval()
    family = getattr(module, "amc_config", {}).get("name", "")
    if graph is None:
        graph = build_graph(module)
    scope = scope or default_scope(family)
    if scope not in SCOPES:
        raise AmcError(f"unknown channel scope {scope!r}: expected one of {', '.join(SCOPES)}")
    pruning_graph = graph
    return Target(label, module, graph, scope, lambda channels: prune_by_counts(module, pruning_graph, channels),
                  default_scope(family))


def build_table(model, device="local", *, graph: PruningGraph | None = None, scope: str | None = None,
                options=None, **build_kw):
    """`latency_tables.build.build_table` for a model reference; see there for the options."""
    return _build_table(resolve_target(model, graph, scope, options), device, **build_kw)


def build_tables(model, devices, *, graph: PruningGraph | None = None, scope: str | None = None, options=None,
                 **build_kw):
    """`latency_tables.build.build_tables` (one table per fingerprint) for a model reference."""
    return _build_tables(resolve_target(model, graph, scope, options), devices, **build_kw)


def ensure_table(model, graph: PruningGraph | None = None, scope: str | None = None,
                 device_uri: str | Device = "local",
                 tables_dir: str | os.PathLike | None = None, **kw) -> LatencyModel:
    """Build whatever the table for (model, scope, device) still lacks, then load it."""
    return _ensure_table(resolve_target(model, graph, scope), device_uri, tables_dir=tables_dir, **kw)


def load_latency_model(model, graph: PruningGraph | None = None, scope: str | None = None, **kw) -> LatencyModel:
    """`latency_tables.loading.load_latency_model` for a model reference (registry name, folder or module)."""
    return _load_latency_model(resolve_target(model, graph, scope), **kw)
