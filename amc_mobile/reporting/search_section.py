"""The report section of a `search` run (the AMC agent's and the baselines' alike): the best policy,
the reward curve, the episodes and the search summary, read from the files `amc_mobile.search` writes.
"""

from __future__ import annotations

from pathlib import Path

from amc_mobile.pruning.slicing import SPEC_FILE, WEIGHTS_FILE
from amc_mobile.search.run_folder import BEST_FILE, LOG_FILE, SUMMARY_FILE
from amc_mobile.search.plots import REWARD_PNG

from .folder import (MAX_ROWS, df_table, dump_json, flatten, is_fingerprint, kv_table, py_value, read_csv, read_json,
                     run_files)
from .render import Code, Heading, Image, Para, Report, Table, fmt_value, rel

REWARD_CURVE_PNG = "report_reward_curve.png"  # drawn here from the episodes when the search drew no reward plot


_POLICY_KEYS = ("ratios", "preserve_ratios", "policy", "actions", "channels", "group_channels", "precisions")
_REWARD_KEYS = ("reward", "best_reward", "return")


def section_search(report: Report, manifest: dict) -> None:
    """Best policy, reward curve, episode summary: whatever the search left in the folder."""
    import pandas as pd

    run_dir = report.run_dir
    added = False
    best_json = run_dir / BEST_FILE
    if best_json.is_file():
        data = read_json(best_json)
        report.used.add(best_json)
        report.add(Heading("Best policy"))
        added = True
        if isinstance(data, Exception):
            report.add(Para(str(data), "error"))
        elif isinstance(data, dict):
            scalars = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
            if scalars:
                report.add(kv_table(scalars, f"{rel(report, best_json)}"))
            layers = data.get("layers")
            if isinstance(layers, dict) and layers and all(isinstance(v, dict) for v in layers.values()):
                cols = list(dict.fromkeys(k for v in layers.values() for k in v))
                report.add(Table(["layer"] + cols, [[name] + [v.get(c) for c in cols] for name, v in layers.items()],
                                 "per decision layer: channels kept of size, preserve ratio"))
            for key in _POLICY_KEYS:
                val = data.get(key)
                if isinstance(layers, dict) and layers and key in ("preserve_ratios", "channels", "actions"):
                    continue  # the layer table shows them
                if isinstance(val, list) and val:
                    report.add(Table(["layer", key], [[i, v] for i, v in enumerate(val)], f"{key} per decision layer"))
                elif isinstance(val, dict) and val:
                    report.add(Table(["layer/group", key], [[k, v] for k, v in val.items()], f"{key}"))
            rest = {k: v for k, v in data.items()
                    if isinstance(v, (dict, list)) and k not in _POLICY_KEYS and k != "layers"}
            if rest:
                report.add(Code(dump_json(rest)))
        else:
            report.add(Code(dump_json(data)))
    # the search's own plot, else the one an earlier report drew from the episodes
    reward_png = next((p for p in (run_dir / REWARD_PNG, run_dir / REWARD_CURVE_PNG) if p.is_file()), None)
    episodes = run_dir / LOG_FILE if (run_dir / LOG_FILE).is_file() else None
    if reward_png is not None:
        report.add(Heading("Reward curve"), Image(reward_png, rel(report, reward_png)))
        report.used.add(reward_png)
    if episodes is not None:
        df = read_csv(episodes)
        if isinstance(df, str):
            report.add(Para(df, "error"))
        else:
            report.used.add(episodes)
            col = next((c for c in df.columns if str(c).lower() in _REWARD_KEYS), None)
            if col is None:
                col = next((c for c in df.columns if "reward" in str(c).lower()), None)
            report.add(Heading("Episodes"))
            rewards = pd.to_numeric(df[col], errors="coerce") if col is not None else None
            if rewards is not None and rewards.notna().any():
                best = df.loc[rewards.idxmax()]
                report.add(Para(f"{len(df)} episodes; best {col} {fmt_value(float(rewards.max()))} "
                                f"(row {int(rewards.idxmax())})."))
                report.add(kv_table({k: py_value(v) for k, v in best.items()}, "the best episode"))
                if reward_png is None:
                    png = _reward_curve(report.run_dir, df, col)
                    if png is not None:
                        report.add(Image(png, f"{col} per episode (drawn by the report from {episodes.name})"))
                        report.used.add(png)
            else:
                report.add(Para(f"{len(df)} rows."))
            report.add(df_table(df.tail(MAX_ROWS) if len(df) > MAX_ROWS else df,
                                caption=rel(report, episodes) + (" (last rows)" if len(df) > MAX_ROWS else "")))
    summary = run_dir / SUMMARY_FILE
    if summary.exists():
        data = read_json(summary)
        report.used.add(summary)
        report.add(Heading("Search summary"))
        if isinstance(data, Exception):
            report.add(Para(str(data), "error"))
        elif isinstance(data, dict):
            measured = data.get("measured")
            if isinstance(measured, dict) and measured.get("speedup") is not None:
                fp = measured.get("fingerprint") if is_fingerprint(measured.get("fingerprint")) else {}
                where = f" on {fp.get('hardware')} ({fp.get('backend')})" if fp else ""
                report.add(Para(f"The pruned model measured {float(measured['speedup']):.2f}\u00d7 faster than the "
                                f"original{where}."))
            flat = {k: v for k, v in flatten({k: v for k, v in data.items() if k not in ("best", "setup")}).items()
                    if not isinstance(v, list) or len(v) <= 8}
            if flat:
                report.add(kv_table(flat, f"{SUMMARY_FILE} (the best policy is above)"))
            if isinstance(data.get("setup"), dict):
                report.add(Heading("Setup", 3), Code(dump_json(data["setup"])))
        else:
            report.add(Code(dump_json(data)))
    pruned = [p for p in run_files(run_dir, (".json",)) if p.name == SPEC_FILE]
    for p in pruned:
        report.used.add(p)
        folder = p.parent
        report.add(Para(f"Pruned model: {rel(report, folder)}/ ({SPEC_FILE} + {WEIGHTS_FILE}). Compare it on your "
                        f"devices: amc-mobile compare ORIGINAL {folder} --devices local cuda:0 adb:SERIAL", "note"))
    quantized_section(report, run_dir)
    if not added and reward_png is None and episodes is None:
        report.add(Para("No best-policy, reward-curve or episode file found; all files follow below.", "note"))


def quantized_section(report: Report, run_dir: Path) -> None:
    """A joint search's (or precision-search's) quantized result and the fine-tuned one: precision per layer,
    sizes, top-1 of the .pte, from the quantization.json each folder holds."""
    from amc_mobile.quantization import QUANTIZED_DIR, REPORT_NAME, is_quantized_folder
    from amc_mobile.search.finetune import QUANTIZED_FINETUNED_DIR

    for name in (QUANTIZED_DIR, QUANTIZED_FINETUNED_DIR):
        folder = run_dir / name
        if not is_quantized_folder(folder):
            continue
        data = read_json(folder / REPORT_NAME)
        report.used.add(folder / REPORT_NAME)
        report.add(Heading(f"Quantized result: {name}/"))
        if not isinstance(data, dict):
            report.add(Para(str(data), "error"))
            continue
        layers = [l for l in data.get("layers") or [] if isinstance(l, dict)]
        int8 = sum(1 for l in layers if l.get("actual") == "int8")
        facts = {"int8 layers": f"{int8}/{len(layers)}", "weights MB": data.get("weights_mb"),
                 "all-fp32 weights MB": data.get("fp32_weights_mb"), ".pte MB": data.get("pte_mb"),
                 "calibration images": data.get("calibration_images")}
        acc = data.get("accuracy")
        if isinstance(acc, dict):
            facts.update({"top-1 fp32 (PyTorch)": acc.get("fp32_torch"), "top-1 of the .pte": acc.get("quantized_pte"),
                          "validation images": acc.get("images")})
        if isinstance(data.get("top1_torch"), dict):
            facts.update({f"top-1 {k} (quantized, PyTorch)": v for k, v in data["top1_torch"].items()})
        report.add(kv_table({k: v for k, v in facts.items() if v is not None}, rel(report, folder / REPORT_NAME)))
        if layers:
            report.add(Table(["layer", "asked", "got", "why not"],
                             [[l.get("layer"), l.get("requested"), l.get("actual"), l.get("reason") or ""]
                              for l in layers], "precision per conv/linear layer"))
        report.add(Para(f"Measure it: amc-mobile compare ORIGINAL {rel(report, folder)} --devices local adb:SERIAL "
                        f"(a cuda: device skips int8 with the reason)", "note"))


def _reward_curve(run_dir: Path, df, col: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        import pandas as pd

        scatter = {"accuracy", "cost_ratio"} <= set(df.columns)
        fig, axes = plt.subplots(1, 2 if scatter else 1, figsize=(11 if scatter else 7, 3.6), squeeze=False)
        ax = axes[0][0]
        y = pd.to_numeric(df[col], errors="coerce")
        ax.plot(range(len(y)), y, lw=1, alpha=0.6, label=col)
        ax.plot(range(len(y)), y.cummax(), lw=1.5, label="best so far")
        ax.set_xlabel("episode")
        ax.set_ylabel(col)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if scatter:
            ax2 = axes[0][1]
            acc = pd.to_numeric(df["accuracy"], errors="coerce")
            cost = pd.to_numeric(df["cost_ratio"], errors="coerce")
            sc = ax2.scatter(cost, acc, c=range(len(df)), cmap="viridis", s=12)
            ax2.set_xlabel("cost ratio (of the original)")
            ax2.set_ylabel("accuracy")
            ax2.grid(alpha=0.3)
            fig.colorbar(sc, ax=ax2, label="episode")
        fig.tight_layout()
        path = run_dir / REWARD_CURVE_PNG
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    except Exception:
        return None
