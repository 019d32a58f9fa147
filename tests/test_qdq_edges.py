"""The q/dq boundary as units (issue 15 item 2): int8 units that take and return int8, the quantize and
dequantize on each fp32<->int8 edge as units of their own, one q/dq per edge a policy creates (counted
against what PT2E actually inserted), and the one prediction that sums them."""

import random

import numpy as np
import pytest
import torch

from amc_mobile.errors import AmcError
from amc_mobile.models import build_model
from amc_mobile.precision import PrecisionMap, mixed_units, predict_mixed
from amc_mobile.pruning.graph import build_graph
from device.quantize import QuantPolicy, quantize_model
from latency_tables.units import UnitSpec


def _name(n):
    return str(n.target) if n.op == "call_function" else n.op


def _is_q(n):
    return n.op == "call_function" and "quantize_per_tensor" in _name(n) and "dequantize" not in _name(n)


def _is_dq(n):
    return n.op == "call_function" and "dequantize_per" in _name(n)


def _is_layer(n):
    return n.op == "call_function" and any(k in _name(n) for k in ("conv", "linear"))


def graph_boundaries(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """(quantize, dequantize) nodes on fp32<->int8 boundaries of a converted PT2E graph, found without the
    precision rule: a conv/linear is int8 when its weight is dequantized; another op when it reads only
    dequantized or int8 values and its result reaches a quantize before any conv/linear; a boundary quantize
    reads an fp32 value, a boundary dequantize feeds an fp32 op or the output."""
    memo = {}

    def int8(n):
        if n not in memo:
            if n.op != "call_function" or _is_q(n) or _is_dq(n):
                memo[n] = False
            elif _is_layer(n):
                memo[n] = isinstance(n.args[1], torch.fx.Node) and _is_dq(n.args[1])
            elif not all(_is_dq(a) or int8(a) for a in n.all_input_nodes if a.op != "get_attr"):
                memo[n] = False  # fed by an fp32 value
            else:
                found, stack = False, [n]
                while stack and not found:
                    for u in stack.pop().users:
                        if _is_q(u):
                            found = True
                        elif u.op == "call_function" and not _is_dq(u) and not _is_layer(u):
                            stack.append(u)
                memo[n] = found
        return memo[n]

    quants = sum(1 for n in gm.graph.nodes if _is_q(n) and not int8(n.args[0]))
    dequants = sum(1 for n in gm.graph.nodes if _is_dq(n) and "per_channel" not in _name(n)
                   and isinstance(n.args[0], torch.fx.Node) and n.args[0].op != "get_attr"
                   and any(u.op == "output" or (u.op == "call_function" and not int8(u)) for u in n.users))
    return quants, dequants


def _split(active):
    return sum(1 for i in active if i % 2 == 0), sum(1 for i in active if i % 2 == 1)


@pytest.mark.slow
def test_one_qdq_per_edge_as_pt2e_inserts_them():
    """The edges a policy pays are the q/dq PT2E puts in the graph: none inside an all-int8 model (only the
    input's quantize and the output's dequantize), none in fp32, and the same count for random mixes."""
    model = build_model("resnet20").eval()
    graph = build_graph(model)
    pmap = PrecisionMap(model, graph)
    x = torch.randn(1, *model.input_shape)
    calib = torch.randn(8, *model.input_shape, generator=torch.Generator().manual_seed(0))
    assert pmap.active_edges(QuantPolicy("fp32")) == []
    all8 = pmap.active_edges(QuantPolicy("int8"))
    assert [pmap.edge_units[i].name for i in all8] == ["quantize:input->stem.conv", "dequantize:classifier->output"]
    rng = random.Random(3)
    # a block's input into an fp32 conv and its int8 add; a mix with values read by two fp32 and two int8 ops
    policies = [QuantPolicy("int8", {"blocks.0.conv2.conv": "fp32"}),
                QuantPolicy("fp32", {n: rng.choice(["fp32", "int8"]) for n in pmap.layers})]
    for policy in policies:
        qm = quantize_model(model, x, calib, policy, check_delegation=False)
        assert _split(pmap.active_edges(policy)) == graph_boundaries(qm.module.graph_module), policy.label()
    # an int8 conv between two fp32 neighbours: its input quantized, its output dequantized, one each
    one = QuantPolicy("fp32", {"blocks.3.conv1.conv": "int8"})
    names = [pmap.edge_units[i].name for i in pmap.active_edges(one)]
    assert names == ["quantize:blocks_2_relu->blocks.3.conv1.conv", "dequantize:blocks_3_conv1_act->blocks.3.conv2.conv"]


def test_edge_units_follow_the_channels_and_keys_round_trip():
    model = build_model("resnet20").eval()
    graph = build_graph(model)
    pmap = PrecisionMap(model, graph)
    policy = QuantPolicy("fp32", {"blocks.3.conv1.conv": "int8"})
    (q, dq) = pmap.edge_specs(policy)
    assert q.key() == "quantize1x1-s1-p0-g1-in16-out16-hw28x28-none-int8-b1"  # the stride-2 conv's input
    assert dq.key() == "dequantize1x1-s1-p0-g1-in32-out32-hw14x14-none-int8-b1"
    group = next(u for u in graph.units if u.name == "blocks.3.conv1.conv").out_group
    pruned = pmap.edge_specs(policy, {group: 8})
    assert (pruned[0].c_in, pruned[1].c_in) == (16, 8)  # the input group stays full, the output is pruned
    for spec in (q, dq, UnitSpec("conv", 8, 8, 4, 8, 3, padding=1, dtype="int8_fp32io")):
        assert UnitSpec.from_dict(spec.to_dict()) == spec
    # the prediction is the sum over exactly these units
    units = mixed_units(pmap, graph, policy)
    ms = {s.key(): 1.0 for s in units}
    assert predict_mixed(ms, pmap, graph, policy, scale=2.0, offset=0.5) == 2.0 * len(units) + 0.5
    assert sum(s.kind in ("quantize", "dequantize") for s in units) == 2


def test_bad_unit_and_policy_inputs_are_one_line_errors():
    for kw, msg in [(dict(kind="quantize", dtype="fp32"), "its dtype is int8, not 'fp32'"),
                    (dict(kind="mean", dtype="int8"), "a mean unit has no int8 form"),
                    (dict(kind="conv", dtype="fp16"), "unknown unit dtype 'fp16'"),
                    (dict(kind="dequant", dtype="int8"), "unknown unit kind 'dequant'")]:
        with pytest.raises(AmcError, match=msg) as e:
            UnitSpec(h=4, w=4, c_in=8, c_out=8, **kw)
        assert "\n" not in str(e.value)
    model = build_model("resnet20").eval()
    graph = build_graph(model)
    pmap = PrecisionMap(model, graph)
    n = len(graph.units)
    for dtypes, msg in [(["fp32"] * (n - 1), f"{n - 1} unit dtypes for a model of {n} units"),
                        (["fp16"] * n, "unknown unit dtype 'fp16'")]:
        with pytest.raises(AmcError, match=msg):
            pmap.policy_of(dtypes)
    odd = ["fp32"] * n
    odd[[u.name for u in graph.units].index("add")] = "int8"  # an add fed by fp32 convs only is fp32
    with pytest.raises(AmcError, match="unit 'add' cannot be int8"):
        pmap.policy_of(odd)
    dtypes = pmap.unit_dtypes(QuantPolicy("int8", {"stem.conv": "fp32"}))
    assert pmap.policy_of(dtypes).precision_of("stem.conv") == "fp32"
    with pytest.raises(AmcError, match="no measurement of unit conv3x3-.*-int8-b1"):
        predict_mixed({s.key(): 1.0 for s in mixed_units(pmap, graph, QuantPolicy("fp32"))}, pmap, graph,
                      QuantPolicy("int8"))


@pytest.mark.slow
def test_int8_io_and_edge_units_lower_and_run(et_bench):
    """int8 units take and return int8 (their IO q/dq stripped), edge units convert; all run fully delegated
    in one multi-method .pte on the real runner."""
    from device import Candidate, MeasureConfig
    from device.local import LocalDevice

    specs = [UnitSpec("conv", 8, 8, 8, 16, 3, padding=1, act="relu", dtype="int8"),
             UnitSpec("conv", 8, 8, 8, 16, 3, padding=1, act="relu", dtype="int8_fp32io"),
             UnitSpec("add", 8, 8, 16, 16, act="relu", dtype="int8"), UnitSpec("pool", 8, 8, 16, 16, 0, dtype="int8"),
             UnitSpec("quantize", 8, 8, 16, 16, dtype="int8"), UnitSpec("dequantize", 8, 8, 16, 16, dtype="int8")]
    built = [s.build() for s in specs]
    io = [(x.dtype, m(x).dtype) for m, x in built]
    assert io == [(torch.int8, torch.int8), (torch.float32, torch.float32), (torch.int8, torch.int8),
                  (torch.int8, torch.int8), (torch.float32, torch.int8), (torch.int8, torch.float32)]
    with torch.no_grad():  # the int8-IO conv computes what the fp32-IO one does, in int8 units
        m8, x8 = built[0]
        assert np.isfinite(m8(x8).float().numpy()).all() and m8(x8).abs().max() > 0
    res = LocalDevice().measure([Candidate(f"u{i}", m, x) for i, (m, x) in enumerate(built)],
                                MeasureConfig(warmup=1, iterations=3))
    assert [r.ok for r in res] == [True] * len(specs), [r.error for r in res]


NET = ("from torch import nn\n"
       "class Net(nn.Module):\n"
       "    input_shape = (1, 8, 8)\n"
       "    def __init__(self):\n"
       "        super().__init__()\n"
       "        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())\n"
       "        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())\n"
       "        self.pool = nn.AdaptiveAvgPool2d(1)\n"
       "        self.fc = nn.Linear(16, 4)\n"
       "    def forward(self, x):\n"
       "        return self.fc(self.pool(self.b(self.a(x))).flatten(1))\n"
       "def build():\n"
       "    return Net()\n")


@pytest.mark.slow
def test_table_validate_mixed_from_fp32_and_int8_rows(tmp_path, et_bench, capsys):
    """`table build` + `table build --dtype int8` (int8 units and every edge's q/dq) are what
    `table validate --dtype mixed` predicts from; without the int8 rows it is a one-line error."""
    from amc_mobile.cli import main

    net = tmp_path / "net.py"
    net.write_text(NET)
    table, model = tmp_path / "table", f"{net}:build"
    fast = ["--grid", "4", "--no-refine", "--iterations", "3", "--warmup", "1", "--quiet", "--workers", "1"]
    assert main(["table", "build", "-m", model, "--table-dir", str(table), "--no-calibrate", *fast]) == 0
    capsys.readouterr()
    assert main(["table", "validate", "-m", model, "--dtype", "mixed", "--table-dir", str(table), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "table build --dtype int8" in err and "-int8-b1" in err, err
    assert main(["table", "build", "-m", model, "--dtype", "int8", "--table-dir", str(table), *fast]) == 0
    keys = (table / "units.csv").read_text()
    assert "\nquantize1x1-" in keys and "\ndequantize1x1-" in keys and "-int8_fp32io-" not in keys
    from amc_mobile.mixed_tables import validate_mixed
    from device import MeasureConfig

    res = validate_mixed(model, "local", samples=2, passes=1, table_dir=table, out_dir=tmp_path / "v", progress=False,
                         config=MeasureConfig(warmup=1, iterations=3), calibration_count=1)
    session = res.metrics["session"]
    assert session["fit"]["int8"] and session["metrics"]["samples"] == 2 and "table" not in res.metrics
    rows = (res.out_dir / "samples.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("index,seed,pass,channels,policy,int8_units,edges")
    assert "within ±10%" in res.summary()
    # the joint search's entry point: a predictor for (channels, per-unit dtypes), recalibrated now
    from amc_mobile.mixed_tables import load_mixed_latency_model, recalibrate_mixed

    predictor, target, store = load_mixed_latency_model(model, "local", table_dir=table)
    fit = recalibrate_mixed(predictor, target, "local", passes=1, config=MeasureConfig(warmup=1, iterations=3),
                            store=store, count=1)
    assert fit["int8"] and fit["points"] == 2
    dtypes = predictor.pmap.unit_dtypes(QuantPolicy("int8", {"a.0": "fp32"}))
    group = target.graph.layers[1].in_group
    assert predictor.predict({group: 4}, dtypes) > 0
    with pytest.raises(AmcError, match="unit dtypes for a model of"):
        predictor.predict({}, ["int8"])
