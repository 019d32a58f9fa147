"""The comparison's charts: speedup per device and model, latency per device with p10..p90 whiskers."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from .table import CompareResult


def _wrap(text: str, width: int = 110) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def plot_speedup(result: CompareResult, path: Path) -> Path:
    """Grouped bars: speedup per device (groups) per model (bars), a y=1 line, x-labels on bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result.rows()
    models = result.models[1:] or result.models[:1]
    devices = [d.uri for d in result.devices]
    n_m, n_d = len(models), len(devices)
    width = 0.8 / n_m
    fig_w = max(6.0, 1.6 + n_d * (0.9 + 0.55 * n_m))
    notes = [f"{d.uri}: {d.error}" for d in result.devices if d.error]
    fig, ax = plt.subplots(figsize=(fig_w, 4.6 + 0.22 * sum(len(_wrap(n).splitlines()) for n in notes)))
    colors = plt.get_cmap("tab10").colors
    ymax = 1.0
    x = np.arange(n_d)
    for j, m in enumerate(models):
        heights = []
        for uri in devices:
            r = next(r for r in rows if r["model"] == m.label and r["device"] == uri)
            heights.append(r["speedup"])
        pos = x - 0.4 + width * (j + 0.5)
        label = m.label + (f" ({m.macs / result.original.macs:.0%} MACs)" if m.macs and result.original.macs else "")
        h = np.array([0.0 if math.isnan(v) else v for v in heights])
        bars = ax.bar(pos, h, width * 0.92, label=label, color=colors[j % len(colors)])
        for b, v, d in zip(bars, heights, result.devices):
            if math.isnan(v):
                if not d.error:  # a whole skipped device gets one label below, not one per bar
                    ax.text(b.get_x() + b.get_width() / 2, 0.03, "n/a", ha="center", va="bottom", fontsize=8,
                            color="0.4", rotation=90)
            else:
                ymax = max(ymax, v)
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}\u00d7", ha="center", va="bottom", fontsize=9)
    ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
    for i, d in enumerate(result.devices):
        if d.error:
            ax.text(i, 0.5, d.error.split(":")[0] + "\n(see note below)", ha="center", va="center", fontsize=9,
                    color="firebrick")
    ax.text(ax.get_xlim()[1] if n_d else 0, 1.0, f" {result.original.label} = 1\u00d7", va="bottom", ha="right",
            fontsize=8, color="0.3")
    ticks = []
    for d in result.devices:
        t = d.uri
        if d.fingerprint is not None:
            t += "\n" + textwrap.shorten(d.fingerprint.hardware, 28, placeholder="...")
        if d.error:
            t += "\n(" + d.error.split(":")[0] + ")"
        ticks.append(t)
    ax.set_xticks(x, ticks, fontsize=9)
    ax.set_ylim(0, ymax * 1.18)
    ax.set_ylabel(f"speedup over {result.original.label} (median latency)")
    ax.set_title("Measured speedup per device")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    if notes:
        fig.text(0.01, 0.01, "\n".join(_wrap(n) for n in notes), fontsize=7.5, color="firebrick",
                 va="bottom", ha="left")
        n_lines = sum(len(_wrap(n).splitlines()) for n in notes)
        fig.tight_layout(rect=(0, min(0.45, 0.035 * n_lines + 0.02), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(result: CompareResult, path: Path) -> Path | None:
    """One panel per device that measured something: median latency per model, p10..p90 whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows()
    devices = [d for d in result.devices if d.ran]
    if not devices:
        return None
    labels = [m.label for m in result.models]
    fig, axes = plt.subplots(1, len(devices), figsize=(max(5.0, 4.2 * len(devices)), 0.9 + 0.45 * len(labels) + 1),
                             squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, d in zip(axes[0], devices):
        vals, lo, hi = [], [], []
        for lbl in labels:
            r = next(r for r in rows if r["model"] == lbl and r["device"] == d.uri)
            med = 0.0 if math.isnan(r["median_ms"]) else r["median_ms"]
            vals.append(med)
            lo.append(0.0 if math.isnan(r["p10_ms"]) else max(0.0, med - r["p10_ms"]))
            hi.append(0.0 if math.isnan(r["p90_ms"]) else max(0.0, r["p90_ms"] - med))
        ys = list(range(len(labels)))
        ax.barh(ys, vals, xerr=[lo, hi], color=[colors[(i - 1) % len(colors)] if i else "0.55"
                                                 for i in range(len(labels))], capsize=3)
        for y, v, h in zip(ys, vals, hi):
            ax.text(v + h, y, f"  {v:.3g} ms" if v else "  n/a", va="center", fontsize=8)
        ax.set_yticks(ys, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("latency, ms (median; whiskers p10..p90)")
        title = d.uri if d.fingerprint is None else f"{d.uri}: {textwrap.shorten(d.fingerprint.hardware, 30)}"
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, max([v + h for v, h in zip(vals, hi)] + [1e-3]) * 1.25)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
