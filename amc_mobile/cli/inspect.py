"""`amc-mobile inspect MODEL`: what the pruning graph sees in a model, before any table or search.

Prints the prunable channel groups (their layers and sizes), the fixed ones with the reason, the
search's decision layers, the fused units with their latency-table keys, and the ops the analysis
could not follow (their channels stay whole; the rest is still searched)."""

from __future__ import annotations

import argparse

from amc_mobile.cli.common import dump_json
from amc_mobile.cli.model_options import MODEL_HELP, add_model_options, model_options
from amc_mobile.errors import AmcError


def register(sub) -> None:
    from amc_mobile.models import DEFAULT_MODEL

    p = sub.add_parser("inspect", help="show the prunable groups, fixed ones with reasons, and fused units of a model",
                       description="Analyse MODEL into channel groups and fused units, as the search and the "
                                   "latency tables see it.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: %(default)s)")
    add_model_options(p)
    p.add_argument("--scope", choices=("all", "decoupled"), default=None,
                   help="channel scope of the decision layers (default: the model family's)")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from amc_mobile.model_io import load_model
    from amc_mobile.pruning.graph import build_graph
    from amc_mobile.pruning.graph import default_scope

    loaded = load_model(args.model, options=model_options(args))
    if loaded.module is None:
        raise AmcError(f"{args.model} is a compiled .pte: inspect needs the model's layers")
    module = loaded.module
    graph = build_graph(module)
    family = getattr(module, "amc_config", {}).get("name", "")
    scope = args.scope or default_scope(family)
    decision = graph.decision_layers(scope)
    report = analysis(graph, scope)
    if args.json:
        print(dump_json(report))
        return 0
    print(render(report))
    if not decision:
        raise AmcError("nothing to prune: every channel group is fixed (see the reasons above)")
    return 0


def analysis(graph, scope: str) -> dict:
    decision = {l.in_group: l.name for l in graph.decision_layers(scope)}
    groups = []
    for g in graph.groups.values():
        modules = list(dict.fromkeys(m for m, _ in g.members))
        groups.append({"group": g.id, "channels": g.size, "prunable": g.prunable, "reason": g.fixed_reason,
                       "decided_at": decision.get(g.id), "modules": modules})
    def count(group, base, coef, full):
        if group is None or not graph.groups[group].prunable:
            return str(full)
        return f"{f'{base}+' if base else ''}{f'{coef}*' if coef != 1 else ''}g{group}"

    units = [{"unit": u.name, "key": u.spec.key(), "in_group": u.in_group, "out_group": u.out_group,
              "c_in": count(u.in_group, u.in_base, u.in_coef, u.spec.c_in),
              "c_out": count(u.out_group, u.out_base, u.out_coef, u.spec.c_out)} for u in graph.units]
    return {"input_shape": list(graph.input_shape), "scope": scope, "groups": groups, "units": units,
            "decision_layers": [{"layer": name, "group": g} for g, name in decision.items()],
            "unfollowed": graph.unfollowed,
            "macs": graph.flops(), "params": graph.params()}


def render(rep: dict) -> str:
    lines = [f"input {tuple(rep['input_shape'])}: {rep['macs'] / 1e6:.2f} MMAC, {rep['params'] / 1e6:.3f} M params "
             f"in convs and linears"]
    prunable = [g for g in rep["groups"] if g["prunable"]]
    fixed = [g for g in rep["groups"] if not g["prunable"]]
    lines.append(f"\nprunable channel groups ({len(prunable)}; decided in scope {rep['scope']!r} at "
                 f"{len(rep['decision_layers'])} layers):")
    for g in prunable:
        at = f"decided at {g['decided_at']}" if g["decided_at"] else "outside the scope (stays full)"
        lines.append(f"  g{g['group']:<4d} {g['channels']:5d} ch  {at}; {_modules(g['modules'])}")
    lines.append(f"\nfixed channel groups ({len(fixed)}):")
    for g in fixed:
        lines.append(f"  g{g['group']:<4d} {g['channels']:5d} ch  {g['reason']}; {_modules(g['modules'])}")
    lines.append(f"\nfused units ({len(rep['units'])}), as the latency table keys them:")
    for u in rep["units"]:
        lines.append(f"  {u['unit']:32s} {u['key']:58s} c_in={u['c_in']} c_out={u['c_out']}")
    if rep["unfollowed"]:
        lines.append("\nops the analysis could not follow (their channels are fixed):")
        lines.extend(f"  {w}" for w in rep["unfollowed"])
    return "\n".join(lines)


def _modules(names: list[str], limit: int = 4) -> str:
    more = f" +{len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
