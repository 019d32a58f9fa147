"""Physical pruning: slice convs, depthwise convs, BNs and linears down to the kept channels.

The result is a smaller dense module. It is saved as a state_dict plus a JSON architecture spec
(the base model's config and the kept channel count of each group), and `load_pruned` rebuilds
it from those two files without the search code: build the base model, shrink every layer to the
shapes in the state_dict, load the weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amc_mobile.errors import AmcError
from amc_mobile.files import read_json

from .graph import PruningGraph

SPEC_FILE = "architecture.json"
WEIGHTS_FILE = "model.pt"


CONSUMER_ROLES = ("conv_in", "linear_in", "gconv_in")
PRODUCER_ROLES = ("conv_out", "linear_out", "gconv_out")


def _per_position_magnitude(module: nn.Module, role: str) -> torch.Tensor:
    """|W| summed over everything but the sliced dimension, one value per position of that dimension."""
    w = module.weight.detach().abs().float()
    if role in ("conv_in", "linear_in"):
        return w.sum(dim=tuple(d for d in range(w.dim()) if d != 1))
    if role == "gconv_in":  # position p of the input feeds only its own group's outputs
        g = module.groups
        cout_g, cin_g = w.shape[0] // g, w.shape[1]
        per = w.reshape(g, cout_g, cin_g, -1).sum(dim=(1, 3))  # (g, cin_g)
        return per.reshape(-1)
    return w.sum(dim=tuple(range(1, w.dim())))  # producers: per output channel


def input_channel_importance(model: nn.Module, graph: PruningGraph, group: int) -> torch.Tensor:
    """AMC's criterion: |W| of the consuming layers summed over output channels and kernel, per channel
    (for a group no layer consumes, the producing layers' output-channel magnitudes)."""
    modules = dict(model.named_modules())
    score = torch.zeros(graph.groups[group].size)
    for roles in (CONSUMER_ROLES, PRODUCER_ROLES):
        for site in graph.sites:
            if site.role not in roles:
                continue
            sel = np.flatnonzero(site.group == group)
            if not len(sel):
                continue
            mag = _per_position_magnitude(modules[site.module], site.role)
            score.index_add_(0, torch.from_numpy(site.index[sel]), mag[torch.from_numpy(sel)])
        if bool(score.any()):
            break
    return score


def top_channels(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores, in ascending channel order (stable slicing)."""
    keep = max(1, min(int(keep), score.numel()))
    return torch.sort(torch.topk(score, keep).indices).values


def _slice_param(param: nn.Parameter | None, idx: torch.Tensor, dim: int) -> nn.Parameter | None:
    if param is None:
        return None
    return nn.Parameter(param.detach().index_select(dim, idx).clone(), requires_grad=param.requires_grad)


def _apply(module: nn.Module, role: str, idx: torch.Tensor) -> None:
    n = int(idx.numel())
    if role == "conv_out":
        module.weight = _slice_param(module.weight, idx, 0)
        module.bias = _slice_param(module.bias, idx, 0)
        module.out_channels = n
    elif role == "conv_in":
        module.weight = _slice_param(module.weight, idx, 1)
        module.in_channels = n
    elif role == "dw":
        module.weight = _slice_param(module.weight, idx, 0)
        module.bias = _slice_param(module.bias, idx, 0)
        module.in_channels = module.out_channels = module.groups = n
    elif role == "bn":
        module.weight = _slice_param(module.weight, idx, 0)
        module.bias = _slice_param(module.bias, idx, 0)
        module.running_mean = module.running_mean.index_select(0, idx).clone()
        module.running_var = module.running_var.index_select(0, idx).clone()
        module.num_features = n
    elif role == "gconv_in":  # whole groups go: the per-group width (weight dim 1) stays
        module.in_channels = n
        module.groups = n // module.weight.shape[1]
    elif role == "gconv_out":
        module.weight = _slice_param(module.weight, idx, 0)
        module.bias = _slice_param(module.bias, idx, 0)
        module.out_channels = n
    elif role == "linear_in":
        module.weight = _slice_param(module.weight, idx, 1)
        module.in_features = n
    elif role == "linear_out":
        module.weight = _slice_param(module.weight, idx, 0)
        module.bias = _slice_param(module.bias, idx, 0)
        module.out_features = n
    else:
        raise ValueError(f"unknown member role {role!r}")


def checked_keep(graph: PruningGraph, keep: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The groups `keep` really prunes (fewer than all channels), refused when one may not be pruned."""
    out = {}
    for gid, idx in keep.items():
        group = graph.groups[gid]
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.numel() == group.size:
            continue
        if not group.prunable:
            raise AmcError(f"channel group {gid} may not be pruned: {group.fixed_reason}")
        if idx.numel() < 1:
            raise AmcError(f"channel group {gid} would keep no channel: a layer needs at least one")
        out[gid] = idx
    return out


def apply_keep(modules: dict[str, nn.Module], graph: PruningGraph, keep: dict[int, torch.Tensor]) -> list:
    """Slice every module dimension that `keep` prunes; returns the (site, kept positions) pairs."""
    positions = graph.site_positions(keep)
    for site, pos in positions:
        _apply(modules[site.module], site.role, pos)
    return positions


def prune_model(model: nn.Module, graph: PruningGraph, keep: dict[int, torch.Tensor]) -> nn.Module:
    """A pruned copy of `model`: group g keeps channels `keep[g]` (indices). The original is untouched."""
    keep = checked_keep(graph, keep)
    pruned = copy.deepcopy(model)
    apply_keep(dict(pruned.named_modules()), graph, keep)
    return pruned


def prune_by_counts(model: nn.Module, graph: PruningGraph, channels: dict[int, int]) -> nn.Module:
    """Prune each group to `channels[g]` channels, choosing them by AMC's weight-magnitude criterion."""
    keep = {g: top_channels(input_channel_importance(model, graph, g), c)
            for g, c in channels.items() if c < graph.groups[g].size}
    return prune_model(model, graph, keep)


def save_pruned(model: nn.Module, out_dir: Path, base_config: dict, channels: dict[int, int] | None = None,
                extra: dict | None = None) -> Path:
    """Write `model.pt` (state_dict) and `architecture.json` (base config + module shapes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = {name: _shape_of(m) for name, m in model.named_modules() if _shape_of(m)}
    spec = {
        "format": "amc-mobile-pruned/1",
        "base_model": base_config,
        "input_shape": list(getattr(model, "input_shape", ())),
        "modules": shapes,
        "group_channels": {str(k): int(v) for k, v in (channels or {}).items()},
        **(extra or {}),
    }
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)
    (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return out_dir


def _shape_of(m: nn.Module) -> dict | None:
    if isinstance(m, nn.Conv2d):
        return {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.BatchNorm2d):
        return {"features": m.num_features}
    if isinstance(m, nn.Linear):
        return {"in": m.in_features, "out": m.out_features}
    return None


def _shrink(m: nn.Module, shape: dict) -> None:
    if isinstance(m, nn.Conv2d):
        m.in_channels, m.out_channels, m.groups = shape["in"], shape["out"], shape["groups"]
        kh, kw = m.kernel_size
        m.weight = nn.Parameter(torch.empty(shape["out"], shape["in"] // shape["groups"], kh, kw))
        if m.bias is not None:
            m.bias = nn.Parameter(torch.empty(shape["out"]))
    elif isinstance(m, nn.BatchNorm2d):
        n = shape["features"]
        m.num_features = n
        m.weight, m.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))
        m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)
    elif isinstance(m, nn.Linear):
        m.in_features, m.out_features = shape["in"], shape["out"]
        m.weight = nn.Parameter(torch.empty(shape["out"], shape["in"]))
        if m.bias is not None:
            m.bias = nn.Parameter(torch.empty(shape["out"]))


def load_pruned(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild a pruned model from its folder (or its architecture.json); returns (model, spec)."""
    from amc_mobile.models import build_model  # the model families; no search code needed

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    spec_path, weights_path = folder / SPEC_FILE, folder / WEIGHTS_FILE
    if not spec_path.exists() or not weights_path.exists():
        raise AmcError(f"{folder} is not a pruned model: expected {SPEC_FILE} and {WEIGHTS_FILE} in it")
    spec = read_json(spec_path, dict, "save the pruned model again")
    try:
        base = dict(spec["base_model"])
        shapes = dict(spec["modules"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AmcError(f"{spec_path} is not a valid architecture spec: {exc}") from exc
    if "factory" in base:  # a user model: rebuild it, then prune it to the recorded group sizes
        from amc_mobile.model_io import rebuild_reference

        from .graph import build_graph

        model = rebuild_reference(base)
        graph = build_graph(model)
        try:
            channels = {int(g): int(c) for g, c in spec.get("group_channels", {}).items()}
            model = prune_model(model, graph, {g: torch.arange(c) for g, c in channels.items()})
        except (ValueError, KeyError, AmcError) as exc:
            raise AmcError(f"{spec_path}: its channel groups do not fit {base['factory']}: {exc}") from exc
    else:
        try:
            model = build_model(**base)  # a registry family
        except (ValueError, TypeError, KeyError) as exc:
            raise AmcError(f"{spec_path}: cannot rebuild its base model ({exc})") from None
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        if name not in modules:
            raise AmcError(f"{spec_path}: module {name!r} does not exist in {base.get('name') or base.get('factory')}")
        try:
            _shrink(modules[name], shape)
        except (KeyError, TypeError, ValueError, RuntimeError, ZeroDivisionError) as exc:
            raise AmcError(f"{spec_path}: bad shape for module {name!r}: {shape!r} ({type(exc).__name__}: {exc})") \
                from None
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AmcError(f"{weights_path} cannot be read as a state_dict: {str(exc).splitlines()[0]}") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:2] or [str(exc)[:200]]
        raise AmcError(f"{weights_path} does not match {SPEC_FILE}: {first[0]}") from exc
    if spec.get("input_shape") and not getattr(model, "input_shape", None):  # given by --input-shape at search time
        model.input_shape = tuple(int(v) for v in spec["input_shape"])
    return model.eval(), spec
