"""Issue 15, items 3-5: size budgets (exact), the joint search (one agent, preserve ratio and precision per
layer, interleaved), fine-tuning a quantized policy, and quantized results in compare and the report.

The walls are tested on look-alike latency tables (any policy the agent asks for stays within both
budgets); the end-to-end joint search quantizes every episode for real (PT2E) and lowers and measures the
picked model quantized on `local`; compare runs the quantized program on `local` and on a PyTorch device,
which skips it with the reason."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from amc_mobile.cli import main
from amc_mobile.errors import AmcError
from amc_mobile.precision import PrecisionMap, units_at
from amc_mobile.pruning import build_graph
from amc_mobile.search.cost import MixedLatencyCost, SizeCost, model_size_mb, predict_mixed, unit_bytes
from device.quantize import QuantPolicy

from _search_helpers import TableLatency, TinyNet, cached_tiny, fashion


class Int8Table(TableLatency):
    """The look-alike table at int8: every unit 0.4x its fp32 time plus a 1 us quantize/dequantize pair."""

    @staticmethod
    def latency(spec) -> float:
        return 0.001 + 0.4 * TableLatency.latency(spec)


def _tables(graph, scale: float = 1.0):
    groups = graph.decision_groups("all")
    fp32, int8 = TableLatency(graph, groups), Int8Table(graph, groups)
    for t in (fp32, int8):
        t.table = {k: v * scale for k, v in t.table.items()}
    return fp32, int8


# -- sizes: exact -------------------------------------------------------------------------------------


def test_model_size_counts_weights_at_their_precision_and_the_closed_form_is_exact():
    torch.manual_seed(0)
    model = TinyNet().eval()
    graph = build_graph(model)
    # fp32: every conv/linear weight and one bias per output channel (BN folded), 4 bytes each
    by_hand = sum(m.weight.numel() + m.weight.shape[0] for m in (model.stem, model.conv1, model.conv2, model.fc)) * 4
    assert model_size_mb(graph.units_for({})) == pytest.approx(by_hand / 1e6, abs=0)
    int8 = units_at(graph, ["int8"] * len(graph.units))
    w = sum(m.weight.numel() for m in (model.stem, model.conv1, model.conv2, model.fc))
    ch = sum(m.weight.shape[0] for m in (model.stem, model.conv1, model.conv2, model.fc))
    assert model_size_mb(int8) == pytest.approx((w + 8 * ch) / 1e6, abs=0)  # 1-byte weights, fp32 scale + bias
    assert unit_bytes(replace(graph.units[0].spec, kind="add")) == 0
    groups = graph.decision_groups("all")
    channels = {g: max(1, graph.groups[g].size // 3) for g in groups}
    for d in ("fp32", "int8"):
        closed = SizeCost(graph, d).predict(channels)
        assert closed == pytest.approx(model_size_mb(units_at(graph, [d] * len(graph.units), channels)), rel=1e-12)


def test_precision_env_size_wall_and_both_walls():
    from amc_mobile.search.precision_search import PrecisionEnv

    layers = ["a", "b", "c"]
    mb = {"a": 1.0, "b": 2.0, "c": 4.0}

    def size(choice):  # fp32 layers 4x their int8 size
        return sum(mb[n] * (4 if p == "fp32" else 1) for n, p in choice.items())

    def cost(choice):
        return 1.0 + sum(1.0 for p in choice.values() if p == "fp32")

    score = lambda choice: 0.5
    env = PrecisionEnv(layers, np.eye(3), None, None, score, size, 16.0)  # size alone: int8 is 7 MB
    env.reset()
    for _ in layers:
        _, done, ep = env.step(1.0)  # the agent asks fp32 everywhere
    assert ep.precisions == ["fp32", "fp32", "int8"] and ep.size_mb == 16.0 and np.isnan(ep.predicted_ms)
    env = PrecisionEnv(layers, np.eye(3), cost, 2.0, score, size, 16.0)  # both: latency allows one fp32 layer
    env.reset()
    for _ in layers:
        _, done, ep = env.step(1.0)
    assert ep.precisions == ["fp32", "int8", "int8"] and ep.predicted_ms == 2.0 and ep.size_mb == 10.0
    with pytest.raises(AmcError, match="size budget 6.0000 MB is below the all-int8 size 7.0000 MB"):
        PrecisionEnv(layers, np.eye(3), None, None, score, size, 6.0)
    with pytest.raises(AmcError, match="give a latency budget, a size budget"):
        PrecisionEnv(layers, np.eye(3), None, None, score)


def test_bad_budgets_are_one_line_errors(capsys, tmp_path):
    for argv, msg in [
        (["precision-search", "resnet20", "--out", str(tmp_path / "x"), "--size-mb", "-1"], "--size-mb must be positive"),
        (["search", "--model", "tinynet", "--size-mb", "1", "--out", str(tmp_path / "y")], "--size-mb is a budget of "
                                                                                         "the joint search"),
        (["search", "--model", "tinynet", "--precision", "joint", "--cost", "flops", "--out", str(tmp_path / "z")],
         "--precision joint searches under a latency budget"),
        (["search", "--model", "tinynet", "--precision", "joint", "--size-mb", "0", "--out", str(tmp_path / "w")],
         "--size-mb must be positive"),
        (["finetune", str(tmp_path), "--quant-calib-images", "2"], "--quant-calib-images must be at least 8"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


# -- the joint env ------------------------------------------------------------------------------------


def _joint_env(model, budget_frac: float, size_frac: float | None, score=None):
    from amc_mobile.search.env import JointEnv, Score
    from amc_mobile.search.precision_search import haq_states, policy_of

    graph = build_graph(model)
    layers = graph.decision_layers("all")
    fp32, int8 = _tables(graph)
    pmap = PrecisionMap(model, graph)
    sizes = SizeCost(graph, "fp32"), SizeCost(graph, "int8")

    def unit_dtypes(prec):
        return pmap.unit_dtypes(policy_of(pmap.layers, [prec[n] for n in pmap.layers]))

    def size(channels, dtypes):
        return float(np.where(np.array(dtypes) == "int8", sizes[1].unit_costs(channels),
                              sizes[0].unit_costs(channels)).sum())

    mixed = MixedLatencyCost(fp32, int8, ["fp32"] * len(graph.units))
    full_size = size({}, ["fp32"] * len(graph.units))
    env = JointEnv(graph, layers, mixed, budget_frac * mixed.full_cost, score or (lambda ch, pr: Score(0.5, 1.0)),
                   pmap.layers, unit_dtypes, haq_states(model, pmap.layers), size,
                   None if size_frac is None else size_frac * full_size)
    return env, mixed, size, unit_dtypes, full_size


def test_joint_env_interleaves_and_every_policy_is_within_both_budgets():
    torch.manual_seed(0)
    model = TinyNet().eval()
    env, mixed, size, unit_dtypes, full_size = _joint_env(model, 0.45, 0.3)
    kinds = [k for k, _ in env.steps]
    # stem (no ratio: its input is the image), conv1, conv2 and fc each after their ratio step
    assert kinds == ["precision", "ratio", "precision", "ratio", "precision", "ratio", "precision"]
    assert env.n_layers == 7 and env.reset().shape == (env.state_dim,)
    rng = np.random.default_rng(0)
    for actions in [np.ones(7), np.zeros(7), *rng.random((20, 7))]:
        env.reset()
        for a in actions:
            s, done, ep = env.step(float(a))
        assert done and ep.precisions is not None and set(ep.precisions) == {"stem", "conv1", "conv2", "fc"}
        dtypes = unit_dtypes(ep.precisions)
        assert predict_mixed(mixed.fp32, mixed.int8, ep.channels, dtypes) <= env.budget * (1 + 1e-9)
        assert size(ep.channels, dtypes) <= 0.3 * full_size * (1 + 1e-9)
        assert ep.cost == pytest.approx(predict_mixed(mixed.fp32, mixed.int8, ep.channels, dtypes))
    env.reset()
    for _ in range(7):  # asking for everything: the wall gives what fits, some layer stays fp32 or wide
        _, _, ep = env.step(1.0)
    assert "fp32" in ep.precisions.values() or max(ep.ratios) > 0.2
    with pytest.raises(AmcError, match="every layer int8 as well"):
        _joint_env(model, 0.01, None)
    with pytest.raises(AmcError, match="size budget .* cannot be reached"):
        _joint_env(model, 1.0, 0.01)


# -- end to end: search, fine-tune, compare, report ---------------------------------------------------


@pytest.fixture(scope="module")
def joint_run(request, tmp_path_factory):
    from amc_mobile.search import SearchConfig, run_search

    from pathlib import Path

    from amc_mobile.model_io import load_factory

    data = fashion()
    # the cached TinyNet's weights in a FILE.py:FACTORY model: a pruned folder records how to rebuild it
    model = load_factory(f"{Path(__file__).parent / '_search_helpers.py'}:TinyNet")
    model.load_state_dict(cached_tiny(request, data).state_dict())
    model.eval()
    data = replace(data, train=data.train.subset(400), val=data.val.subset(200), test=data.test.subset(100))
    graph = build_graph(model)
    fp32, int8 = _tables(graph)
    fp32_mb = SizeCost(graph, "fp32").predict({})
    out = tmp_path_factory.mktemp("joint") / "run"
    # the budget on the look-alike's prediction (no device time before the episodes); the measured wall still
    # times the quantized pick next to the original and holds the same 0.7 as a measured ratio
    cfg = SearchConfig(model="tinynet", cost="latency", target=0.7, latency_reference="predicted", precision="joint",
                       size_mb=0.5 * fp32_mb, episodes=2, warmup=1, val_images=100, calib_images=64, quant_calib_images=16,
                       final_candidates=1, out=str(out), progress=False, checkpoint_every=0, seed=0)
    result = run_search(cfg, model=model, data=data, latency_model=fp32, int8_latency_model=int8)
    return result, data, fp32_mb


@pytest.mark.slow
def test_joint_search_end_to_end_quantized_result(joint_run, et_bench):
    from amc_mobile.search import read_log

    result, _, fp32_mb = joint_run
    run = result.run_dir
    rows = read_log(run / "episodes.csv")
    assert len(rows) == 2 and all(len(r["precisions"].split()) == 4 for r in rows)
    best = result.best
    assert set(best["precisions"]) == {"stem", "conv1", "conv2", "fc"} and best["size_mb"] <= 0.5 * fp32_mb
    policy = QuantPolicy.parse(str(run / "quant_policy.json"))
    assert policy.layers == best["precisions"]
    q = result.summary["quantized"]
    assert (run / "quantized" / "model.pte").is_file() and q["int8_layers"] >= 1
    assert q["size_mb"] <= 0.5 * fp32_mb * (1 + 1e-9) and 0 < q["accuracy"]["quantized_pte"] <= 1
    rep = json.loads((run / "quantized" / "quantization.json").read_text())
    assert rep["pte_mb"] > rep["weights_mb"] == pytest.approx(q["size_mb"])  # the .pte holds the weights + graph
    # the picked policy was measured quantized, next to the original, and is the run's final measurement
    mb, m = result.summary["measured_budget"], result.summary["measured"]
    assert mb["candidates"][0]["precisions"] == best["precisions"] or mb["picked"] is None
    assert m["pruned"]["median_ms"] > 0 and m["original"]["median_ms"] > 0


@pytest.mark.slow
def test_finetune_compare_and_report_of_a_quantized_result(joint_run, et_bench, tmp_path):
    from amc_mobile.compare import run_compare
    from amc_mobile.report import build_report
    from amc_mobile.search.finetune import FinetuneConfig, finetune

    from test_compare import EagerCpuDevice

    result, data, _ = joint_run
    run = result.run_dir
    r = finetune(run, FinetuneConfig(epochs=1, train_images=64, eval_images=50, eval_before=("val",),
                                     eval_after=("val",), quant_calib_images=16, progress=False), data=data)
    q = r.record["quantized"]
    assert q["policy"]["layers"] == result.best["precisions"]
    assert 0 < q["before"]["val"] <= 1 and 0 < q["after"]["val"] <= 1
    assert (run / "quantized_finetuned" / "model.pte").is_file()
    assert json.loads((run / "finetune.json").read_text())["quantized"]["after"] == q["after"]

    res = run_compare([str(run / "pruned"), str(run / "quantized")], ["local", EagerCpuDevice()],
                      out=tmp_path / "cmp", log=None, report=False, accuracy=True, accuracy_images=30)
    quant = next(m for m in res.models if m.loaded.source == "quantized")
    assert quant.precision.startswith("int8 ") and quant.layer_precisions and quant.top1 is not None
    assert res.cell(quant.label, "local").ok
    skipped = res.cell(quant.label, "eager-cpu")
    assert skipped.status == "skipped" and "int8 for XNNPACK" in skipped.error
    row = next(r for r in res.rows() if r["model"] == quant.label and r["device"] == "local")
    assert row["precision"] == quant.precision

    from amc_mobile.reporting.render import Heading, Table

    report = build_report(run)
    headings = [b.text for b in report.blocks if isinstance(b, Heading)]
    assert "Quantized result: quantized/" in headings and "Quantized result: quantized_finetuned/" in headings
    assert any(isinstance(b, Table) and b.caption == "precision per conv/linear layer" for b in report.blocks)


def test_traced_quantizer_patterns_are_reused_with_the_same_result():
    """device/quantize.py keeps XNNPACK's traced conv-bn patterns for the process (a joint search quantizes
    every episode): a quantization with the kept patterns equals one that traced them afresh, and the stock
    tracer is back in place afterwards."""
    from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils as utils

    import device.quantize as dq

    torch.manual_seed(0)
    model = TinyNet().eval()
    x, calib = torch.randn(4, 1, 28, 28), torch.randn(16, 1, 28, 28)
    stock = utils._get_aten_graph_module_for_pattern
    dq._PATTERNS.clear()
    fresh = dq.quantize_model(model, x[:1], calib, QuantPolicy("int8"), check_delegation=False)
    assert dq._PATTERNS and utils._get_aten_graph_module_for_pattern is stock
    kept = dq.quantize_model(model, x[:1], calib, QuantPolicy("int8"), check_delegation=False)
    with torch.no_grad():
        assert torch.equal(fresh.module(x), kept.module(x))
    assert [l.actual for l in fresh.layers] == [l.actual for l in kept.layers] == ["int8"] * 4
