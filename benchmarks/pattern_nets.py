"""The pruning graph's pattern networks end to end on a device: groups, table build, validation, search.

    PYTHONPATH=.:tests .venv/bin/python benchmarks/pattern_nets.py [--nets all|a,b] [--device local]
        [--samples 30] [--grid 8] [--episodes 40] [--target 0.5] [--out DIR]

For each network of tests/pattern_nets.py (MobileNet-V3-small-like with SE + hard-swish, ShuffleNet-V2-like
with split/cat/shuffle, DenseNet-like with cat, EfficientNet-B0-like with SE + SiLU, a ResNet with a `mean`
head and a flatten into a linear, a grouped-conv ResNeXt block, a channels-last LayerNorm + MLP block), at
1x28x28 input (Fashion-MNIST shaped, random weights: accuracy is not the point here):

1. prunable / fixed groups from `build_graph`;
2. `build_table` from an empty folder (the default unit and calibration protocol): time and configurations;
3. `validate_table` on `--samples` random pruned variants: share within +-5 % / +-10 %, RMSPE,
   under-prediction share, Spearman;
4. a latency-constrained search to `--target` of the original's measured latency (`--episodes`), then the
   original and the pruned model measured side by side: the measured ratio.

Writes results.json and results.md in `--out` (default runs/pattern-nets-<time>).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pattern_nets import PATTERN_NETS, randomise_bn  # noqa: E402


def one(name: str, args, out: Path) -> dict:
    from amc_mobile.data import load_fashion_mnist
    from amc_mobile.pruning import build_graph
    from amc_mobile.search import SearchConfig, run_search
    from amc_mobile.tables import build_table
    from amc_mobile.tables import load_latency_model
    from amc_mobile.table_validation import validate_table

    torch.manual_seed(0)
    cls = PATTERN_NETS[name]
    try:
        model = randomise_bn(cls(in_ch=1, size=28))
    except TypeError:  # fixed-size nets
        model = randomise_bn(cls(in_ch=1))
    graph = build_graph(model)
    row = {"net": name, "input": list(model.input_shape),
           "prunable_groups": sum(g.prunable for g in graph.groups.values()),
           "fixed_groups": sum(not g.prunable for g in graph.groups.values()), "units": len(graph.units)}
    tables = out / "tables" / name
    t0 = time.perf_counter()
    rep = build_table(model, args.device, graph=graph, grid=args.grid, tables_dir=tables, progress=True)
    row.update(table_build_s=round(time.perf_counter() - t0, 1), configs_measured=rep.measured,
               configs_failed=rep.failed)
    val = validate_table(model, args.device, samples=args.samples, graph=graph, grid=args.grid, tables_dir=tables,
                         out_dir=out / "validate" / name, progress=True)
    m = val.metrics
    row.update({k: m.get(k) for k in ("samples", "within_5pct", "within_10pct", "rmspe_pct", "under_predicted_5pct",
                                      "spearman")})
    s_fit = (m.get("session_calibration") or {}).get("metrics") or {}
    row.update({f"session_{k}": s_fit.get(k) for k in ("within_5pct", "within_10pct", "rmspe_pct", "spearman")})
    # issue 19's re-anchoring: the table's units as ratios to its drift reference, the variants as ratios to the
    # original in the same rounds, the session's fit on the calibration models' ratios
    both = ((m.get("drift_normalised") or {}).get("anchored_units_session_calibration") or {}).get("metrics") or {}
    row.update({f"anchored_{k}": both.get(k) for k in ("within_5pct", "within_10pct", "rmspe_pct", "spearman")})
    row["noise_figure"] = (m.get("noise") or {}).get("figure")
    if args.no_search:
        return row
    t0 = time.perf_counter()
    lat = load_latency_model(model, graph, device_uri=args.device, tables_dir=tables, grid=args.grid)
    cfg = SearchConfig(model=name, device=args.device, cost="latency", target=args.target, episodes=args.episodes,
                       val_images=300, calib_images=200, channel_round=args.grid, out=str(out / "search" / name),
                       checkpoint_every=0, progress=True, seed=0)
    from dataclasses import replace

    from amc_mobile.errors import AmcError

    res = None
    for target in (args.target, 0.7, 0.9):  # a net with little to prune cannot reach 0.5x: say which it reached
        if target < args.target:
            continue
        try:
            cfg = replace(cfg, target=target, out=str(out / "search" / f"{name}-{target}"))
            res = run_search(cfg, model=model, data=load_fashion_mnist(), latency_model=lat)
            break
        except AmcError as exc:
            if "cannot be reached" not in str(exc):
                raise
            row.setdefault("unreachable", []).append(str(exc).split(";")[0])
    if res is None:
        return row
    args_target = cfg.target
    s = res.summary
    measured = s.get("measured", {})
    row.update(search_target=args_target, measured_ratio=measured.get("measured_ratio"),
               original_ms=measured.get("original", {}).get("median_ms"),
               pruned_ms=measured.get("pruned", {}).get("median_ms"),
               search_s=round(time.perf_counter() - t0, 1))
    return row


def pct(x, fmt: str = ".0%") -> str:
    return "–" if x is None else format(x, fmt)


def num(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="all")
    p.add_argument("--device", default="local")
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--out", default=None)
    p.add_argument("--no-search", action="store_true", help="groups, table and validation only")
    args = p.parse_args()
    names = sorted(PATTERN_NETS) if args.nets == "all" else args.nets.split(",")
    out = Path(args.out or f"runs/pattern-nets-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        rows.append(one(name, args, out))
        (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))  # kept as each net finishes
    lines = ["| net | prunable / fixed groups | units | table build | within +-5% / +-10% | RMSPE | under-pred. | "
             "Spearman | session: within +-5% / +-10% | re-anchored, session: within +-5% / +-10%, Spearman | "
             "noise figure | measured ratio at target |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "measured_ratio" not in r:
            r["measured_ratio"], r["search_target"] = None, "unreachable"
        lines.append(f"| {r['net']} | {r['prunable_groups']} / {r['fixed_groups']} | {r['units']} | "
                     f"{r['table_build_s']:.0f} s ({r['configs_measured']} cfgs) | {r['within_5pct']:.0%} / "
                     f"{r['within_10pct']:.0%} | {r['rmspe_pct']:.1f}% | {r['under_predicted_5pct']:.0%} | "
                     f"{r['spearman']:.3f} | {pct(r['session_within_5pct'])} / {pct(r['session_within_10pct'])} | "
                     f"{pct(r['anchored_within_5pct'])} / {pct(r['anchored_within_10pct'])}, "
                     f"{num(r['anchored_spearman'])} | {pct(r['noise_figure'], '.1%')} | "
                     f"{r['measured_ratio']} (target {r['search_target']}) |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
