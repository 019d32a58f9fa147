"""Channel selection and least-squares reconstruction, cached so that an episode costs little.

AMC keeps the input channels with the largest weight magnitude, then refits the consuming layer's
weights so that, on features of the ORIGINAL model, the pruned layer reproduces the original
layer's output (pre-BN) as well as possible:

    min_W || X[:, kept] W - Y ||^2     X: original input features, Y: original output, at sampled points

Because X and Y come from the original model, the solution for (layer, kept count) is the same in
every episode. So:

- `collect_layer_stats` runs ONE forward pass over the calibration images with hooks on every
  consumer of the decision groups, samples `points` random output positions per image (AMC: 10),
  gathers the matching input patches (k x k convs: im2col of just those points) and accumulates the
  normal equations  G = X^T X,  B = X^T Y  in float64. Memory is G's (C*k*k)^2, independent of the
  number of images.
- `Reconstructor.weight(layer, kept)` solves  G[kept, kept] W = B[kept]  with torch.linalg.lstsq
  (same minimiser as the lstsq on X itself) and caches the result.
- `PrunedModelBuilder.build(channels)` makes the pruned model from the original by slicing and
  swapping in cached weights, without deep-copying any tensor.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from amc_mobile.pruning.graph import PruningGraph
from amc_mobile.pruning.slicing import apply_keep, checked_keep, input_channel_importance, top_channels

from .config import SearchWarning

CONSUMER_ROLES = ("conv_in", "linear_in")  # the layers reconstruction refits (grouped convs are sliced only)


class ChannelSelector:
    """AMC's criterion, cached: group -> importance, (group, kept) -> kept indices (ascending)."""

    def __init__(self, model: nn.Module, graph: PruningGraph):
        self.model = model
        self.graph = graph
        self._scores: dict[int, torch.Tensor] = {}
        self._idx: dict[tuple[int, int], torch.Tensor] = {}

    def scores(self, group: int) -> torch.Tensor:
        if group not in self._scores:
            self._scores[group] = input_channel_importance(self.model, self.graph, group)
        return self._scores[group]

    def indices(self, group: int, kept: int) -> torch.Tensor:
        key = (group, int(kept))
        if key not in self._idx:
            self._idx[key] = top_channels(self.scores(group), kept)
        return self._idx[key]


@dataclass
class LayerStats:
    """Normal equations of one consumer layer, accumulated over the calibration points."""

    name: str
    group: int  # its input channel group
    kind: str  # "conv" or "linear"
    kernel: int  # k (1 for linear)
    gram: torch.Tensor  # (C*k*k, C*k*k) float64: X^T X
    xty: torch.Tensor  # (C*k*k, C_out) float64: X^T Y
    rows: int = 0

    @property
    def columns(self) -> int:
        return self.gram.shape[0]


def _consumers(graph: PruningGraph, groups: list[int]) -> list[tuple[str, int]]:
    """(layer, the first of `groups` it reads) for every conv/linear reading one of `groups`, forward order."""
    wanted = set(groups)
    out = []
    for site in graph.sites:
        if site.role in CONSUMER_ROLES:
            hit = [g for g in dict.fromkeys(site.group.tolist()) if g in wanted]
            if hit:
                out.append((site.module, hit[0]))
    return out


def _conv_points(mod: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, points: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Input patches (rows, C*k*k) and outputs (rows, C_out) at `points` random output positions per image.

    Only the sampled patches are read (zero padding by masking, not by padding the whole map: at 224x224
    a padded copy of every consumer's input cost more than the forward pass). The positions are drawn on
    the CPU, so they are the same whatever device the features live on."""
    b, c, h, w = x.shape
    _, c_out, ho, wo = y.shape
    k, s, p = mod.kernel_size[0], mod.stride[0], mod.padding[0]
    n = min(points, ho * wo)
    pos = torch.rand(b, ho * wo, generator=gen).argsort(dim=1)[:, :n].to(x.device)  # (b, n) without replacement
    oy, ox = pos // wo, pos % wo
    d = torch.arange(k, device=x.device)
    rows = (oy * s - p)[:, :, None, None] + d[None, None, :, None]  # (b, n, k, 1)
    cols = (ox * s - p)[:, :, None, None] + d[None, None, None, :]  # (b, n, 1, k)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    xh = x.permute(0, 2, 3, 1)  # (b, H, W, C): a view, contiguous when x is channels-last
    patches = xh[bi, rows.clamp(0, h - 1), cols.clamp(0, w - 1)]  # (b, n, k, k, C)
    if p:
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # (b, n, k, k)
        patches = patches * inside[..., None]
    X = patches.permute(0, 1, 4, 2, 3).reshape(b * n, c * k * k)  # conv weight order: (C, kh, kw)
    Y = y.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None], oy, ox].reshape(b * n, c_out)
    if mod.bias is not None:
        Y = Y - mod.bias.detach()
    return X, Y


# Calibration images per forward pass, by pixels: 100 images of 32x32 as before, 16 at 224x224 (a batch
# of 100 there held ~1.6 GB of MobileNet-V2 activations).
CALIB_BATCH_PIXELS = 16 * 224 * 224


def calibration_batch(images: torch.Tensor, cap: int = 100) -> int:
    pixels = int(images[0].numel() // images.shape[1]) if images.dim() == 4 and len(images) else 1
    return max(1, min(cap, CALIB_BATCH_PIXELS // max(pixels, 1)))


@torch.no_grad()
def collect_layer_stats(model: nn.Module, graph: PruningGraph, groups: list[int], images: torch.Tensor,
                        points: int = 10, seed: int = 0, batch_size: int | None = None,
                        max_mb: float = 1024.0, compute: torch.device | str = "cpu") -> dict[str, LayerStats]:
    """One pass over `images`: the normal equations of every consumer of `groups` (see module doc).

    Layers are taken in forward order until their Gram matrices would exceed `max_mb` in total; the
    rest are left out with a warning (they are pruned by plain slicing). The pass runs on `compute`
    through a channels-last copy of `model` (the same features, about twice as fast on a CPU); the
    normal equations come back on the CPU. `batch_size` None: by pixels (`calibration_batch`).
    """
    from amc_mobile.compute import copy_to

    compute = torch.device(compute)
    batch_size = batch_size or calibration_batch(images)
    modules = dict(model.named_modules())
    stats: dict[str, LayerStats] = {}
    budget = max_mb * 2**20
    skipped = []
    for name, g in _consumers(graph, groups):
        mod = modules[name]
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1 or mod.dilation != (1, 1) or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                skipped.append(f"{name} (groups/dilation/padding mode not supported)")
                continue
            kind, k, c_out = "conv", mod.kernel_size[0], mod.out_channels
            cols = mod.in_channels * k * k
        elif isinstance(mod, nn.Linear):
            kind, k, c_out, cols = "linear", 1, mod.out_features, mod.in_features
        else:
            skipped.append(f"{name} ({type(mod).__name__})")
            continue
        need = (cols * cols + cols * c_out) * 8
        if need > budget:
            skipped.append(f"{name} ({need / 2**20:.0f} MB of normal equations over the {max_mb:.0f} MB budget)")
            continue
        budget -= need
        stats[name] = LayerStats(name, g, kind, k, torch.zeros(cols, cols, dtype=torch.float64, device=compute),
                                 torch.zeros(cols, c_out, dtype=torch.float64, device=compute))
    if skipped:
        warnings.warn(f"no reconstruction (plain slicing) for: {'; '.join(skipped)}", SearchWarning, stacklevel=2)

    gen = torch.Generator().manual_seed(seed)

    def hook(name: str):
        def fn(mod, inputs, output):
            x = inputs[0].detach()
            if stats[name].kind == "conv":
                X, Y = _conv_points(mod, x, output.detach(), points, gen)
            else:
                X = x.reshape(-1, x.shape[-1])  # every leading index is a row (channels-last MLPs: N*H*W rows)
                Y = (output.detach() - (mod.bias.detach() if mod.bias is not None else 0)).reshape(-1, output.shape[-1])
            X, Y = X.double(), Y.double()
            st = stats[name]
            st.gram.addmm_(X.T, X)
            st.xty.addmm_(X.T, Y)
            st.rows += X.shape[0]

        return fn

    from .score import channels_last_copy

    # a structural copy (the original's tensors are never written, nor moved), in eval mode
    net = shallow_copy(model).eval()
    nhwc = images.dim() == 4
    if nhwc:
        net = channels_last_copy(net)
    net = copy_to(net, compute)
    copies = dict(net.named_modules())
    handles = [copies[name].register_forward_hook(hook(name)) for name in stats]
    try:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)
            net(x.to(compute))
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        st.gram, st.xty = st.gram.cpu(), st.xty.cpu()
    # Fewer sampled rows than columns: the normal equations are singular, every solve of that layer takes the
    # slow rank-revealing path (seconds per kept count at ResNet-18's 4,608 columns) and fits noise.
    # (Convs only: a linear layer gets one row per image, and its solves stay cheap.)
    short = [st for st in stats.values() if st.kind == "conv" and st.rows < st.columns]
    if short:
        need = max(-(-st.columns // max(st.rows // max(len(images), 1), 1)) for st in short)
        warnings.warn(f"reconstruction is under-determined for {len(short)} layer(s) ({short[0].name}: "
                      f"{short[0].rows} sampled rows for {short[0].columns} columns): raise --calib-images to at "
                      f"least {need} (or --calib-points)", SearchWarning, stacklevel=2)
    return stats


class Reconstructor:
    """(layer, kept count) -> least-squares weights of that layer for its kept input channels, cached."""

    def __init__(self, stats: dict[str, LayerStats], selector: ChannelSelector, modules: dict[str, nn.Module]):
        self.stats = stats
        self.selector = selector
        self._shapes = {name: tuple(modules[name].weight.shape) for name in stats}
        self._cache: dict[tuple[str, int], torch.Tensor | None] = {}
        self._warned: set[str] = set()
        self.solves = 0

    def __contains__(self, name: str) -> bool:
        return name in self.stats

    def weight(self, name: str, kept: int | torch.Tensor) -> torch.Tensor | None:
        """Weights (C_out, kept, k, k) [conv] or (C_out, kept) [linear], float32, from the original features;
        None when the solve was not finite (the caller keeps the plainly sliced weights).

        `kept`: the kept input positions, or a count of the layer's group (when the layer reads that group
        alone, channel for channel)."""
        if isinstance(kept, torch.Tensor):
            idx = kept.long()
            key = (name, idx.numpy().tobytes())
        else:
            key = (name, int(kept))
            idx = None
        if key not in self._cache:
            if idx is None:
                idx = self.selector.indices(self.stats[name].group, int(kept))
            self._cache[key] = self._solve(name, idx)
        return self._cache[key]

    def _solve(self, name: str, idx: torch.Tensor) -> torch.Tensor | None:
        st = self.stats[name]
        kk = st.kernel * st.kernel
        cols = (idx[:, None] * kk + torch.arange(kk)[None, :]).reshape(-1)
        g = st.gram.index_select(0, cols).index_select(1, cols)
        b = st.xty.index_select(0, cols)
        if not (torch.isfinite(g).all() and torch.isfinite(b).all()):
            self._warn(name, "its calibration features are not finite (NaN/inf in the original model's activations)")
            return None
        # QR with pivoting, rank-revealing: the Grams of untrained nets (dead channels) and of too few sampled
        # rows are singular. (A Cholesky path, also one factorisation per layer, was measured in session 7: no
        # gain on the 224x224 models, whose Grams are singular or ill-conditioned, and a risk of other answers
        # on ill-conditioned ones; see docs/BENCHMARKS.md.)
        try:
            sol = torch.linalg.lstsq(g, b, driver="gelsy").solution  # (kept*k*k, C_out)
        except RuntimeError as exc:
            self._warn(name, f"lstsq failed ({str(exc).splitlines()[0][:120]})")
            return None
        self.solves += 1
        c_out = b.shape[1]
        w = sol.T.reshape((c_out, len(idx), st.kernel, st.kernel) if st.kind == "conv" else (c_out, len(idx)))
        if not torch.isfinite(w).all():
            self._warn(name, "the least-squares solution is not finite")
            return None
        return w.float().contiguous()

    def _warn(self, name: str, why: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"no reconstruction for {name} (plain slicing): {why}", SearchWarning, stacklevel=2)


def shallow_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model` that shares every parameter and buffer tensor with it."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


class PrunedModelBuilder:
    """Pruned models from the original: magnitude-selected channels plus cached reconstructed weights.

    The original model is never modified: slicing assigns new tensors to a structural copy.
    """

    def __init__(self, model: nn.Module, graph: PruningGraph, reconstructor: Reconstructor | None = None,
                 selector: ChannelSelector | None = None):
        self.model = model.eval()
        self.graph = graph
        self.selector = selector or (reconstructor.selector if reconstructor else ChannelSelector(model, graph))
        self.reconstructor = reconstructor
        self._plan: tuple[list[tuple[str, str]], list[str]] | None = None

    def keep(self, channels: dict[int, int]) -> dict[int, torch.Tensor]:
        """Kept channel indices of every group pruned below full width."""
        return {g: self.selector.indices(g, c) for g, c in channels.items() if c < self.graph.groups[g].size}

    @torch.no_grad()
    def build(self, channels: dict[int, int], fast: bool = False) -> nn.Module:
        """The pruned model. `fast`: fold every BN into its conv and make activations in-place (same
        outputs, ~1.5x faster on CPU; for scoring only: it is no longer what `save_pruned` describes)."""
        keep = checked_keep(self.graph, self.keep(channels))
        pruned = shallow_copy(self.model)
        modules = dict(pruned.named_modules())
        positions = apply_keep(modules, self.graph, keep)
        if self.reconstructor is not None:
            out_pos = {site.module: pos for site, pos in positions if site.role in ("conv_out", "linear_out")}
            for site, pos in positions:
                if site.role not in CONSUMER_ROLES or site.module not in self.reconstructor:
                    continue
                w = self.reconstructor.weight(site.module, pos)
                if w is None:
                    continue
                if site.module in out_pos:
                    w = w.index_select(0, out_pos[site.module])
                modules[site.module].weight = nn.Parameter(w)
        if fast:
            pairs, inplace = self.fast_plan
            fold_batchnorms(pruned, pairs)
            modules = dict(pruned.named_modules())
            for name in inplace:
                modules[name].inplace = True
        return pruned.eval()

    @property
    def fast_plan(self) -> tuple[list[tuple[str, str]], list[str]]:
        """(conv, bn) pairs to fold and activation modules that may run in-place, found once."""
        if self._plan is None:
            self._plan = fast_plan(self.model)
        return self._plan


_INPLACE_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish)


def fast_plan(model: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """From a torch.fx trace: (conv, bn) module names where the BN reads only that conv's output and
    nothing else reads the conv's output; and activation modules whose input has no other reader
    (so they may overwrite it)."""
    from torch import fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # not traceable: nothing to speed up (the graph analysis would have failed first anyway)
        return [], []
    mods = dict(gm.named_modules())
    pairs, inplace = [], []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = mods.get(node.target)
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node):
            continue
        if (isinstance(mod, nn.BatchNorm2d) and src.op == "call_module"
                and isinstance(mods.get(src.target), nn.Conv2d) and len(src.users) == 1):
            pairs.append((str(src.target), str(node.target)))
        elif isinstance(mod, _INPLACE_ACTS) and len(src.users) == 1 and src.op != "placeholder":
            inplace.append(str(node.target))
    return pairs, inplace


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names whose BN can be folded into the conv (see `fast_plan`)."""
    return fast_plan(model)[0]


@torch.no_grad()
def fold_batchnorms(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """Fold eval-mode BNs into their convs (new tensors: shared ones are never written) and drop the BNs."""
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter(bias)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, nn.Identity())
    return model
