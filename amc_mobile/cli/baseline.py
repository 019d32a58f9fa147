"""`amc-mobile baseline uniform|random|amc-flops`: the comparisons for an AMC latency search.

Same flags as `amc-mobile search` (made from SearchConfig); each baseline writes a run folder with the
same files as a search: config.json, episodes.csv, best_policy.json, pruned/, summary.json (with the
table-predicted and the MEASURED latency).
"""

from __future__ import annotations

import argparse
import json

_HELP = {
    "uniform": "one preserve ratio for every layer (bisection on the predicted latency to meet the target, then "
               "measured; re-adjusted until the measured latency is within 3% of the target)",
    "random": "--episodes policies of U[0,1] actions through the same env (action wall, rounding, reconstruction, "
              "scoring); best by validation accuracy",
    "amc-flops": "the AMC search with a FLOPs budget (--target = FLOPs ratio, the paper's setting), then measured "
                 "on the device",
}


def register(sub) -> None:
    from amc_mobile.cli.search import _add_fields
    from amc_mobile.search.baselines import METHODS
    from amc_mobile.search.config import DDPGConfig, SearchConfig

    p = sub.add_parser(
        "baseline", help="uniform width, random search or FLOPs-budget AMC, measured like a latency search",
        description="Baselines for the latency-budget AMC search. "
        + " ".join(f"{m}: {h}." for m, h in _HELP.items())
        + " Run folders default to runs/baseline-<method>-<timestamp>/.")
    p.add_argument("method", choices=METHODS, help="which baseline")
    u = p.add_argument_group("uniform only")
    u.add_argument("--latency-stat", choices=("median", "p10"), default="median",
                   help="statistic of the measured latency ratio (p10 is steadier on a loaded machine; default median)")
    u.add_argument("--tolerance", type=float, default=0.03, help="measured ratio within this of the target (0.03)")
    u.add_argument("--max-adjust", type=int, default=4, help="re-measurements to reach the tolerance (default 4)")
    _add_fields(p, SearchConfig, skip=("agent", "resume"))
    _add_fields(p.add_argument_group("DDPG agent (amc-flops only; AMC's defaults)"), DDPGConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from amc_mobile.errors import AmcError
    from amc_mobile.search.baselines import run_baseline
    from amc_mobile.search.config import DDPGConfig, SearchConfig

    given = {f.name: getattr(args, f.name) for f in fields(SearchConfig) if hasattr(args, f.name) and f.name != "agent"}
    agent = {f.name: getattr(args, f.name) for f in fields(DDPGConfig) if hasattr(args, f.name)}
    if args.method != "amc-flops" and agent:
        raise AmcError(f"the DDPG flags ({', '.join('--' + a.replace('_', '-') for a in agent)}) only apply to amc-flops")
    if args.method == "amc-flops" and given.get("cost", "flops") != "flops":
        raise AmcError("amc-flops is the search with a FLOPs budget: drop --cost (or use `amc-mobile search`)")
    cfg = SearchConfig(**given, agent=DDPGConfig(**agent))
    if args.tolerance <= 0 or args.max_adjust < 0:
        raise AmcError("--tolerance must be positive and --max-adjust >= 0")
    if args.method == "uniform":
        from amc_mobile.search.baselines import run_uniform

        result = run_uniform(cfg, tolerance=args.tolerance, max_adjust=args.max_adjust,
                             stat=f"{args.latency_stat}_ms")
    else:
        result = run_baseline(args.method, cfg)
    best, s = result.best, result.summary
    print(f"run folder: {result.run_dir}")
    extra = f" (uniform ratio {s['uniform_ratio']:.4f})" if "uniform_ratio" in s else ""
    print(f"{args.method}: episode {best['episode']}{extra}, {best['metric']} {best['accuracy']:.4f} on "
          f"{s['setup']['val_images']} val images (original {s['setup']['original_accuracy']:.4f}); predicted "
          f"{best['cost']:.4g} {best['cost_unit']} = {best['cost_ratio']:.1%} of {best['full_cost']:.4g}")
    pol = s.get("policy", {})
    line = f"kept MACs {pol.get('kept_mmac', float('nan')):.2f} M ({pol.get('mmac_ratio', float('nan')):.1%})"
    if "predicted_ms" in pol:
        line += f", table-predicted {pol['predicted_ms']:.3f} ms ({pol['predicted_ratio']:.1%})"
    print(line)
    m = s.get("measured")
    if m and "speedup" in m:
        print(f"measured on {cfg.device}: original {m['original']['median_ms']:.3f} ms, pruned "
              f"{m['pruned']['median_ms']:.3f} ms ({m['measured_ratio']:.1%}, {m['speedup']:.2f}x faster)")
        if "equal_latency" in s:
            print(f"within {s['tolerance']:.0%} of the target {s['target_ratio']:.1%}: {s['equal_latency']} "
                  f"after {len(s['adjust'])} measurement(s)")
    elif m:
        print(f"measurement on {cfg.device} failed: {json.dumps(m.get('error') or m)[:300]}")
    return 0
