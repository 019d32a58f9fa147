"""Fine-tuning a pruned model (real training of a hard-pruned ResNet-20 on a small subset), the search
figures as real PNGs from a tiny search run, and the one-line CLI errors of finetune / search-plots."""

import json
import struct

import pytest

from amc_mobile.cli import main
from amc_mobile.errors import AmcError
from amc_mobile.search.finetune import FinetuneConfig, finetune, resolve_pruned

from _search_helpers import fashion

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _small_data(val=1000, test=1000):
    from amc_mobile.data import FashionMNIST

    d = fashion()
    return FashionMNIST(d.train, d.val.subset(val), d.test.subset(test), d.source)


def _hard_pruned_resnet20(folder):
    """ResNet-20 (shipped weights) with every prunable group cut to a quarter, plain slicing, no reconstruction."""
    from amc_mobile.models import model_config
    from amc_mobile.pruning import build_graph, prune_by_counts, save_pruned
    from amc_mobile.train import get_or_train

    model, _ = get_or_train("resnet20")
    graph = build_graph(model)
    channels = {g: max(1, graph.groups[g].size // 4) for g in graph.decision_groups("all")}
    pruned = prune_by_counts(model, graph, channels)
    save_pruned(pruned, folder, model_config(model), channels, extra={"policy": {"note": "test"}})
    return channels


@pytest.mark.slow
def test_finetune_recovers_accuracy_of_a_hard_pruned_model(tmp_path):
    from amc_mobile.pruning import load_pruned
    from amc_mobile.runs import write_manifest

    run = tmp_path / "run"
    run.mkdir()
    write_manifest(run, "search")
    (run / "summary.json").write_text(json.dumps({"best": {}}))
    channels = _hard_pruned_resnet20(run / "pruned")
    data = _small_data()
    cfg = FinetuneConfig(epochs=1, lr=0.01, batch_size=64, train_images=2000, eval_images=1000, device="cpu",
                         progress=False)
    result = finetune(run, cfg, data=data)
    assert result.out == run / "finetuned" and result.run_dir == run
    b, a = result.before, result.after
    assert b["val"]["images"] == 1000 and b["test"]["images"] == 1000
    assert a["val"]["top1"] >= b["val"]["top1"] and a["test"]["top1"] >= b["test"]["top1"]
    assert a["val"]["top1"] > 0.5  # it learned something real, not just "not worse"
    # the fine-tuned folder is the same pruned format, same base model and shapes, flagged as fine-tuned
    model, spec = load_pruned(run / "finetuned")
    _, orig_spec = load_pruned(run / "pruned")
    assert spec["base_model"] == orig_spec["base_model"] and spec["modules"] == orig_spec["modules"]
    assert spec["fine_tuned"] is True and spec["policy"] == {"note": "test"}
    assert {int(g): c for g, c in spec["group_channels"].items()} == channels
    from amc_mobile.search.finetune import fast_evaluate

    assert fast_evaluate(model, data.val)["top1"] == pytest.approx(a["val"]["top1"])
    record = json.loads((run / "finetune.json").read_text())
    assert record["recipe"]["weight_decay"] == 4e-5 and record["recipe"]["train_images_used"] == 2000
    assert record["delta_top1"]["val"] == pytest.approx(a["val"]["top1"] - b["val"]["top1"])
    assert json.loads((run / "summary.json").read_text())["finetune"]["after"]["val"]["top1"] == a["val"]["top1"]


def test_fast_evaluate_matches_plain_evaluation():
    from amc_mobile.search.finetune import fast_evaluate
    from amc_mobile.train import evaluate, get_or_train

    data = _small_data(val=300)
    model, _ = get_or_train("resnet20")
    plain = evaluate(model, data.val)
    fast = fast_evaluate(model, data.val)
    assert fast["top1"] == pytest.approx(plain["top1"]) and fast["loss"] == pytest.approx(plain["loss"], rel=1e-3)


def _png_size(path):
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, f"{path} is not a PNG"
    width, height = struct.unpack(">II", raw[16:24])
    return width, height


@pytest.mark.slow
def test_plots_are_real_pngs_from_a_tiny_search(tmp_path):
    from amc_mobile.search import SearchConfig, run_search
    from amc_mobile.search.plots import POLICY_PNG, REWARD_PNG, SCATTER_PNG, write_plots
    from amc_mobile.train import get_or_train

    model, _ = get_or_train("resnet20")
    cfg = SearchConfig(model="resnet20", cost="flops", target=0.5, episodes=5, warmup=2, val_images=200,
                       calib_images=40, measure_final=False, progress=False, checkpoint_every=0,
                       out=str(tmp_path / "search"))
    result = run_search(cfg, model=model, data=_small_data(val=200, test=200))
    paths = write_plots(result.run_dir)
    assert [p.name for p in paths] == [REWARD_PNG, POLICY_PNG, SCATTER_PNG]
    for p in paths:
        w, h = _png_size(p)
        assert w > 300 and h > 200 and p.stat().st_size > 5000
    # the CLI draws them after the fact too, and the report embeds them
    for p in paths:
        p.unlink()
    assert main(["search-plots", str(result.run_dir)]) == 0
    assert all(p.exists() for p in paths)
    from amc_mobile.report import write_report

    html, _ = write_report(result.run_dir)
    text = html.read_text()
    assert text.count("data:image/png;base64,") >= 3


def test_resolve_pruned_finds_the_model_and_the_run(tmp_path):
    run = tmp_path / "run"
    (run / "pruned").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "pruned" / "architecture.json").write_text("{}")
    (run / "pruned" / "model.pt").write_bytes(b"")
    assert resolve_pruned(run) == (run / "pruned", run)
    assert resolve_pruned(run / "pruned") == (run / "pruned", run)
    (run / "run.json").unlink()
    assert resolve_pruned(run / "pruned") == (run / "pruned", run / "pruned")
    with pytest.raises(AmcError, match="does not exist"):
        resolve_pruned(tmp_path / "nope")
    with pytest.raises(AmcError, match="no pruned model"):
        resolve_pruned(tmp_path)


@pytest.mark.parametrize("argv,needle", [
    (["finetune", "{tmp}/missing-run"], "does not exist"),
    (["finetune", "{tmp}/empty"], "no pruned model"),
    (["finetune", "{tmp}/empty", "--epochs", "0"], "--epochs"),
    (["search-plots", "{tmp}/missing-run"], "does not exist"),
    (["search-plots", "{tmp}/empty"], "not a search run folder"),
])
def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys, argv, needle):
    (tmp_path / "empty").mkdir()
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("amc-mobile: error:") and "\n" not in err and needle in err
