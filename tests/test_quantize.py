"""Per-layer int8 quantization (device/quantize.py): policies, calibration checks, which ops follow which
layer, and real lowering: the .pte runs in ExecuTorch and in et_bench; layers XNNPACK cannot run in
int8 stay fp32 with the partitioner's reason."""

import json

import pytest
import torch
from torch import nn

from amc_mobile.errors import AmcError
from device import Candidate, MeasureConfig
from device.lowering import lower_to_pte
from device.quantize import (MIN_CALIBRATION_IMAGES, QuantPolicy, _export, check_calibration, node_precisions,
                             quantize_model)


class Block(nn.Module):
    """conv-bn-relu, conv-bn, a residual add, relu: the add sits between two layers."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Tiny(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block = Block(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block(torch.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def _tiny():
    torch.manual_seed(0)
    m = Tiny().eval()
    for bn in (m.bn, m.block.bn1, m.block.bn2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return m


def _images(n=16):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_policy_parse_and_bad_policies(tmp_path):
    assert QuantPolicy.parse("int8") == QuantPolicy("int8")
    assert QuantPolicy.parse("fp32").all_fp32
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"default": "int8", "layers": {"fc": "fp32"}}))
    p = QuantPolicy.parse(str(f))
    assert p.precision_of("fc") == "fp32" and p.precision_of("stem") == "int8" and p.label() == "int8+1xfp32"
    assert QuantPolicy.from_dict(p.to_dict()) == p
    with pytest.raises(AmcError, match="'int4' for 'fc' is not one of fp32, int8"):
        QuantPolicy(layers={"fc": "int4"})
    with pytest.raises(AmcError, match="expected int8, fp32 or a policy .json"):
        QuantPolicy.parse("int16")
    f.write_text(json.dumps({"default": "int8", "layer": {}}))
    with pytest.raises(AmcError, match=r"unknown key\(s\) \['layer'\]"):
        QuantPolicy.parse(str(f))
    f.write_text("[1]")
    with pytest.raises(AmcError, match="p.json"):
        QuantPolicy.parse(str(f))
    with pytest.raises(AmcError, match="missing.json"):
        QuantPolicy.parse(str(tmp_path / "missing.json"))


def test_calibration_set_checks():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(AmcError, match="calibration set is empty"):
        check_calibration(torch.zeros(0, 1, 8, 8), x)
    with pytest.raises(AmcError, match="calibration set is empty"):
        check_calibration(None, x)
    with pytest.raises(AmcError, match=f"has 3 image\\(s\\): at least {MIN_CALIBRATION_IMAGES}"):
        check_calibration(torch.zeros(3, 1, 8, 8), x)
    with pytest.raises(AmcError, match=r"shape \(3, 8, 8\); the model takes \(1, 8, 8\)"):
        check_calibration(torch.zeros(16, 3, 8, 8), x)
    bad = torch.zeros(16, 1, 8, 8)
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(AmcError, match="NaN"):
        check_calibration(bad, x)
    # the error reaches quantize_model's callers before any export work
    with pytest.raises(AmcError, match="has 2 image"):
        quantize_model(_tiny(), x, torch.zeros(2, 1, 8, 8), QuantPolicy())


def test_policy_naming_a_layer_the_model_lacks_is_an_error():
    with pytest.raises(AmcError, match=r"does not have: block\.conv3 \(its conv/linear layers: stem, block\.conv1"):
        quantize_model(_tiny(), torch.zeros(1, 1, 8, 8), _images(), QuantPolicy("fp32", {"block.conv3": "int8"}))


def test_cli_bad_calibration_and_policy_are_one_line_errors(tmp_path, capsys):
    from amc_mobile.cli import main

    for argv, msg in ((["quantize", "resnet20", "--out", str(tmp_path), "--calib-images", "0"], "calibration set is empty"),
                      (["quantize", "resnet20", "--out", str(tmp_path), "--policy", "int4"], "expected int8, fp32"),
                      (["bench", "-m", "resnet20", "--quantize", "int8", "--calib-images", "3"], "has 3 image(s)")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_ops_follow_the_layers_that_feed_them():
    m = _tiny()
    gm, batched = _export(m, torch.zeros(1, 1, 8, 8))
    assert batched  # calibration runs in batches
    prec = node_precisions(gm, QuantPolicy("int8", {"block.conv2": "fp32"}))
    by_op = {}
    for node in gm.graph.nodes:
        if node.name in prec:
            by_op.setdefault(str(node.target).split(".", 1)[1], []).append(prec[node.name])
    # conv2d: stem, block.conv1 int8, block.conv2 fp32; its BN follows it; the add joins int8 (the stem's
    # relu) and fp32 (block.conv2's BN): int8, block.conv2's output quantized on the edge
    assert by_op["conv2d.default"] == ["int8", "int8", "fp32"]
    assert by_op["batch_norm.default"] == ["int8", "int8", "fp32"] or \
        by_op.get("_native_batch_norm_legit_no_training.default") == ["int8", "int8", "fp32"]
    assert by_op["add.Tensor"] == ["int8"]
    assert by_op["linear.default"] == ["int8"]
    prec = node_precisions(gm, QuantPolicy("fp32", {"block.conv1": "int8"}))
    assert [prec[n.name] for n in gm.graph.nodes if str(n.target) == "aten.add.Tensor"] == ["fp32"]


@pytest.mark.slow
def test_mixed_policy_lowers_runs_and_matches(tmp_path, et_bench):
    """int8 where asked, fp32 elsewhere; the .pte computes what the quantized module computes (ExecuTorch's
    own runtime) and runs in our runner; the int8 model stays close to the fp32 one."""
    from executorch.runtime import Runtime

    from device.local import LocalDevice

    m = _tiny()
    x = _images(1)
    qm = quantize_model(m, x, _images(32), QuantPolicy("int8", {"block.conv2": "fp32"}))
    got = {l.layer: l.actual for l in qm.layers}
    assert got == {"stem": "int8", "block.conv1": "int8", "block.conv2": "fp32", "fc": "int8"}
    assert not qm.fallbacks and qm.calibration_images == 32
    pte = tmp_path / "q.pte"
    assert lower_to_pte([Candidate("q", qm.module, x), Candidate("f", m, x)], pte, shared=False) == {}
    program = Runtime.get().load_program(pte)
    with torch.no_grad():
        want_q, want_f = qm.module(x), m(x)
    torch.testing.assert_close(program.load_method("q").execute([x])[0], want_q, rtol=0.05, atol=0.05)
    # int8 vs fp32: the same function up to quantization error (a bug, e.g. a lost BN, breaks this)
    assert torch.nn.functional.cosine_similarity(want_q.flatten(), want_f.flatten(), dim=0) > 0.98
    res = LocalDevice().measure_pte(pte, ["q", "f"], MeasureConfig(warmup=1, iterations=3))
    assert [r.ok for r in res] == [True, True]


class WithGroupedTransposed(nn.Module):
    """A grouped transposed conv: the XNNPACK quantizer skips it (and XNNPACK would refuse its per-channel
    int8 form)."""

    input_shape = (4, 6, 6)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)

    def forward(self, x):
        return self.up(torch.relu(self.conv(x)))


@pytest.mark.slow
def test_layer_xnnpack_cannot_run_in_int8_stays_fp32_with_the_reason(tmp_path, et_bench):
    from device.local import LocalDevice

    torch.manual_seed(0)
    m = WithGroupedTransposed().eval()
    x = torch.randn(1, 4, 6, 6)
    qm = quantize_model(m, x, torch.randn(16, 4, 6, 6), QuantPolicy("int8"))
    layers = {l.layer: l for l in qm.layers}
    assert layers["conv"].actual == "int8"
    up = layers["up"]
    assert (up.requested, up.actual) == ("int8", "fp32")
    assert up.reason == ("the XNNPACK quantizer leaves this aten.conv_transpose2d unquantized "
                         "(none of its int8 patterns takes it)")
    assert qm.fallbacks == [up]
    res = LocalDevice().measure([Candidate("q", qm.module, x)], MeasureConfig(warmup=1, iterations=3))
    assert res[0].ok, res[0].error


def test_unit_dtypes_follow_the_policy_and_int8_units_build_quantized():
    from amc_mobile.models import build_model
    from amc_mobile.precision import unit_dtypes, units_at
    from amc_mobile.pruning.graph import build_graph
    from device.quantize import QuantizedModule
    from latency_tables.units import UnitSpec

    model = build_model("resnet20").eval()
    graph = build_graph(model)
    names = [u.name for u in graph.units]
    policy = QuantPolicy("int8", {"blocks.0.conv2.conv": "fp32"})
    dtypes = dict(zip(names, unit_dtypes(model, graph, policy)))
    assert dtypes["blocks.0.conv1.conv"] == "int8" and dtypes["blocks.0.conv2.conv"] == "fp32"
    assert dtypes["add"] == "int8"  # fed by the fp32 conv and the int8 stem: int8, q on the fp32 edge
    other = dict(zip(names, unit_dtypes(model, graph, QuantPolicy("fp32", {"blocks.0.conv1.conv": "int8"}))))
    assert other["blocks.0.conv1.conv"] == "int8" and other["add"] == "fp32"  # fed by fp32 only
    specs = units_at(graph, list(dtypes.values()))
    assert specs[1].key().endswith("-int8-b1") and specs[2].key().endswith("-fp32-b1")
    with pytest.raises(AmcError, match="unknown unit dtype 'fp16'"):
        UnitSpec("conv", 4, 4, 8, 8, 3, dtype="fp16")
    module, x = UnitSpec("conv", 6, 6, 4, 8, 3, padding=1, act="relu", dtype="int8_fp32io").build()
    assert isinstance(module, QuantizedModule)
    assert any("quantize_per_tensor" in str(n.target) for n in module.graph_module.graph.nodes)
    fp32, _ = UnitSpec("conv", 6, 6, 4, 8, 3, padding=1, act="relu").build()
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(module(x).flatten(), fp32(x).flatten(), dim=0) > 0.98
    # as it runs inside an int8 region: int8 in, int8 out (its IO quantize/dequantize stripped)
    module, x = UnitSpec("conv", 6, 6, 4, 8, 3, padding=1, act="relu", dtype="int8").build()
    with torch.no_grad():
        assert x.dtype == torch.int8 and module(x).dtype == torch.int8


@pytest.mark.slow
def test_int8_units_measure_in_one_batch_like_fp32_ones(et_bench):
    from device.local import LocalDevice
    from latency_tables.units import UnitSpec

    specs = [UnitSpec("conv", 8, 8, 8, 16, 3, padding=1, act="relu", dtype=d) for d in ("fp32", "int8")]
    specs.append(UnitSpec("add", 8, 8, 16, 16, dtype="int8"))
    cands = [Candidate(f"u{i}", *s.build()) for i, s in enumerate(specs)]
    res = LocalDevice().measure(cands, MeasureConfig(warmup=1, iterations=3))
    assert [r.ok for r in res] == [True, True, True], [r.error for r in res]


@pytest.mark.slow
def test_table_build_int8_units_are_measured_and_keyed_by_dtype(tmp_path, et_bench, capsys):
    """int8 rows go through the same batched, resumable build as fp32 ones (one multi-method .pte per batch)."""
    import csv

    from amc_mobile.cli import main

    net = tmp_path / "net.py"
    net.write_text("from torch import nn\n"
                   "class Net(nn.Module):\n"
                   "    input_shape = (1, 8, 8)\n"
                   "    def __init__(self):\n"
                   "        super().__init__()\n"
                   "        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())\n"
                   "        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())\n"
                   "        self.fc = nn.Linear(8, 4)\n"
                   "    def forward(self, x):\n"
                   "        return self.fc(self.b(self.a(x)).mean((2, 3)))\n"
                   "def build():\n"
                   "    return Net()\n")
    table = tmp_path / "table"
    argv = ["table", "build", "-m", f"{net}:build", "--dtype", "int8", "--table-dir", str(table), "--grid", "4",
            "--max-configs", "3", "--iterations", "3", "--warmup", "1", "--quiet", "--workers", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    with open(table / "units.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["dtype"] == "int8" and "-int8-" in r["key"] for r in rows), rows
    assert all(float(r["median_ms"]) > 0 for r in rows)


@pytest.mark.slow
def test_python_measure_of_a_quantized_model(et_bench):
    from amc_mobile import measure

    stats = measure(_tiny(), quantize="int8", calibration=(_images(16), None),
                    config=MeasureConfig(warmup=1, iterations=3))
    assert stats.ok and stats.n == 3
    with pytest.raises(AmcError, match="calibration set is empty"):
        measure(_tiny(), quantize="int8", calibration=torch.zeros(0, 1, 8, 8))


def test_precision_env_wall_keeps_every_policy_within_the_budget():
    """The action wall on a cost where each fp32 layer adds its weight: whatever the agent asks, the finished
    policy is within the budget; a budget below all-int8 is refused before any episode."""
    import numpy as np

    from amc_mobile.search.precision_search import PrecisionEnv, search_precision

    layers = ["a", "b", "c", "d"]
    extra = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}

    def cost(choice):
        return 1.0 + sum(extra[n] for n, p in choice.items() if p == "fp32")

    scores = []

    def score(choice):  # more fp32 layers -> more accurate: the agent wants fp32 everywhere
        scores.append(dict(choice))
        return 0.5 + 0.1 * sum(p == "fp32" for p in choice.values())

    env = PrecisionEnv(layers, np.eye(4), cost, 6.0, score)
    s = env.reset()
    for _ in layers:  # ask for fp32 every time
        s, done, ep = env.step(1.0)
    assert ep.precisions == ["fp32", "fp32", "int8", "int8"] and ep.predicted_ms == 4.0  # a+b fit, c would not
    best = search_precision(env, episodes=6, warmup=3, seed=0)
    assert all(cost(c) <= 6.0 for c in scores) and best.predicted_ms <= 6.0
    assert best.accuracy == max(0.5 + 0.1 * sum(p == "fp32" for p in c.values()) for c in scores)
    with pytest.raises(AmcError, match="below the all-int8 prediction 1.000 ms"):
        PrecisionEnv(layers, np.eye(4), cost, 0.5, score)


@pytest.mark.slow
def test_precision_search_end_to_end(tmp_path, et_bench, capsys):
    import csv

    from amc_mobile.cli import main

    net = tmp_path / "net.py"
    net.write_text("from torch import nn\n"
                   "class Net(nn.Module):\n"
                   "    input_shape = (1, 28, 28)\n"
                   "    def __init__(self):\n"
                   "        super().__init__()\n"
                   "        self.a = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())\n"
                   "        self.b = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())\n"
                   "        self.fc = nn.Linear(64, 10)\n"
                   "    def forward(self, x):\n"
                   "        return self.fc(self.b(self.a(x)).mean((2, 3)))\n"
                   "def build():\n"
                   "    return Net()\n")
    out = tmp_path / "ps"
    argv = ["precision-search", f"{net}:build", "--out", str(out), "--target", "0.8", "--episodes", "3",
            "--warmup-episodes", "2", "--val-images", "20", "--calib-images", "16", "--iterations", "5",
            "--warmup", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["predicted_ms"] <= result["budget_ms"]
    assert set(result) >= {"measured_ms", "fp32_measured_ms", "top1", "int8_layers", "measured_over_budget"}
    policy = QuantPolicy.parse(str(out / "policy.json"))
    assert set(policy.layers) == {"a.0", "b.0", "fc"}
    with open(out / "episodes.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    rows = (out / "unit_costs.csv").read_text().splitlines()
    assert rows[0] == "key,median_ms" and any("-int8-" in r for r in rows)
    assert any(r.startswith("model-fp32,") for r in rows) and any(r.startswith("model-int8,") for r in rows)
    assert any(r.startswith("quantize") for r in rows) and any(r.startswith("dequantize") for r in rows)
