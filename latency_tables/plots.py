"""Figures: predicted vs measured (validation), and latency over channel counts per layer.

The per-layer figure draws what the table knows: a line (1 axis) or a heatmap (2 axes) of the
interpolated latency over the counts the search can pick, with the measured grid points marked,
next to a FLOPs-proportional line scaled to agree at full width: the steps and cliffs that a FLOPs
budget does not see.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from .predict import LatencyModel


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_plot(predicted: np.ndarray, measured: np.ndarray, path: str | Path, title: str = "",
                 second: np.ndarray | None = None, second_label: str = "") -> Path:
    plt = _plt()
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    lo, hi = min(p.min(), m.min()) * 0.9, max(p.max(), m.max()) * 1.1
    if second is not None:
        lo, hi = min(lo, second.min() * 0.9), max(hi, second.max() * 1.1)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    xs = np.linspace(lo, hi, 50)
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="tab:green", alpha=0.12, label="±10%")
    ax.plot(xs, xs, color="black", lw=1, label="y = x")
    under = p < m * 0.95
    ax.scatter(m[~under], p[~under], s=18, color="tab:blue", label="samples")
    if under.any():
        ax.scatter(m[under], p[under], s=22, color="tab:red", marker="v", label="under-predicted >5%")
    if second is not None:
        ax.scatter(m, second, s=16, facecolors="none", edgecolors="tab:gray", label=second_label or "second")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured latency (ms, median)")
    ax.set_ylabel("predicted latency (ms)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _choices_range(model: LatencyModel, plan) -> list[np.ndarray]:
    return [np.arange(a.choices[0], a.choices[-1] + 1) for a in plan.axes]


def surface_plot(model: LatencyModel, path: str | Path, layers: str | None = None, title: str = "",
                 columns: int = 4) -> Path:
    """One panel per unit template that moves with the channels (optionally those whose name
    matches the regex `layers`)."""
    plt = _plt()
    plans = [(i, p) for i, p in enumerate(model.plans)
             if any(len(a.choices) > 1 for a in p.axes) and (not layers or re.search(layers, p.name))]
    if not plans:
        raise ValueError("no layer to plot: none depends on a pruned group" + (f" and matches {layers!r}"
                                                                              if layers else ""))
    rows = math.ceil(len(plans) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False)
    offsets = model._base
    sizes = model.graph.full_channels()
    full = {g: sizes[g] for g in model.groups}
    for ax, (i, plan) in zip(axes.ravel(), plans):
        pts = model.points[i]
        if len(plan.axes) == 1:
            size = full[plan.axes[0].group]
            cs = _choices_range(model, plan)[0]
            vals = model.lut[offsets[i]:offsets[i] + size + 1][cs]
            ax.plot(cs, vals * 1000, color="tab:blue", lw=1.2, label="table (interpolated)")
            mx = np.array(sorted(k[0] for k in pts if cs[0] <= k[0] <= cs[-1]))
            if mx.size:
                ax.plot(mx, [pts[(int(x),)] * 1000 for x in mx], "o", ms=3, color="tab:orange", label="measured")
            flops = np.array([plan.spec_at((int(c),)).flops() for c in cs], dtype=float)
            if flops[-1] > 0:
                ax.plot(cs, flops / flops[-1] * vals[-1] * 1000, "--", color="gray", lw=1, label="∝ FLOPs")
            ax.set_xlabel(f"{plan.axes[0].role} channels (group {plan.axes[0].group})", fontsize=7)
            ax.set_ylabel("µs", fontsize=7)
        else:
            si, so = (full[a.group] for a in plan.axes)
            ci, co = _choices_range(model, plan)
            grid = model.lut[offsets[i]:offsets[i] + (si + 1) * (so + 1)].reshape(si + 1, so + 1)
            img = ax.imshow(grid[np.ix_(ci, co)] * 1000, origin="lower", aspect="auto", cmap="viridis",
                            extent=(co[0], co[-1], ci[0], ci[-1]))
            fig.colorbar(img, ax=ax, label="µs")
            measured = np.array([k for k in pts if ci[0] <= k[0] <= ci[-1] and co[0] <= k[1] <= co[-1]])
            if measured.size:
                ax.plot(measured[:, 1], measured[:, 0], ".", ms=2, color="white")
            ax.set_xlabel(f"c_out (group {plan.axes[1].group})", fontsize=7)
            ax.set_ylabel(f"c_in (group {plan.axes[0].group})", fontsize=7)
        ax.set_title(f"{plan.name}\n{plan.full_spec.kind}{plan.full_spec.kernel}x{plan.full_spec.kernel} "
                     f"s{plan.full_spec.stride} {plan.full_spec.h}x{plan.full_spec.w}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(plans):]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
