"""Channel pruning: the dependency graph, channel selection, reconstruction and physical slicing."""

from .graph import ChannelGroup, Layer, PruningGraph, UnitTemplate, build_graph, require_prunable
from .slicing import (input_channel_importance, load_pruned, prune_by_counts, prune_model, save_pruned,
                      top_channels)

__all__ = [
    "ChannelGroup", "Layer", "PruningGraph", "UnitTemplate", "build_graph", "require_prunable",
    "input_channel_importance", "load_pruned", "prune_by_counts", "prune_model", "save_pruned", "top_channels",
]
