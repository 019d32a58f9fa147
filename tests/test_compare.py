"""`amc-mobile compare`: every model on every device, speedups, CSV + chart + report, and bad input.

The fast tests measure on a small eager-PyTorch CPU device defined here (a real `Device`, timing
real forwards with perf_counter) next to `cuda:0`, which skips with its reason on a machine
without CUDA; the slow test measures on `local` (ExecuTorch + XNNPACK through et_bench).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pytest
import torch

from amc_mobile.cli import main
from amc_mobile.compare import add_accuracy, load_models, run_compare
from amc_mobile.errors import AmcError
from amc_mobile.models import build_model, model_config
from amc_mobile.pruning import build_graph, prune_by_counts, save_pruned
from device import Device, Fingerprint, LatencyStats, MeasureConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_GPU = torch.cuda.is_available()
FAST = MeasureConfig(warmup=1, iterations=3)


class EagerCpuDevice(Device):
    """PyTorch eager forwards on this CPU, timed with perf_counter; no .pte support (like cuda)."""

    uri = "eager-cpu"

    def fingerprint(self, config=None):
        return Fingerprint(kind="eager", hardware="test CPU", runtime=f"torch-{torch.__version__}",
                           backend="eager-fp32", threads=torch.get_num_threads())

    def measure(self, candidates, config=MeasureConfig(), progress=None):
        out = []
        for c in candidates:
            m = c.module.eval()
            samples = []
            with torch.inference_mode():
                for _ in range(config.warmup):
                    m(c.example_input)
                for _ in range(config.iterations):
                    t0 = time.perf_counter()
                    m(c.example_input)
                    samples.append((time.perf_counter() - t0) * 1e3)
            out.append(LatencyStats.from_samples(c.name, samples))
        return out


def make_pruned(folder, name="resnet20", frac=0.125, **kw):
    """A pruned-model folder: `name` with every prunable group cut to `frac` of its channels."""
    model = build_model(name, **kw).eval()
    graph = build_graph(model)
    channels = {l.in_group: max(1, int(graph.groups[l.in_group].size * frac)) for l in graph.prunable_layers}
    pruned = prune_by_counts(model, graph, channels)
    save_pruned(pruned, folder, model_config(model), channels)
    return folder


def is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    return make_pruned(tmp_path_factory.mktemp("models") / "r20_eighth")


# -- fast: the compare machinery on the eager device and cuda:0 -----------------------------------


def test_compare_eager_and_cuda(tmp_path, pruned_dir):
    out = tmp_path / "run"
    res = run_compare(["resnet20", str(pruned_dir)], [EagerCpuDevice(), "cuda:0"], FAST, out=out, log=None,
                      argv=["amc-mobile", "compare", "resnet20", str(pruned_dir)])
    df = pd.read_csv(out / "compare.csv")
    assert len(df) == 4  # tidy: 2 models x 2 devices
    assert set(df["device"]) == {"eager-cpu", "cuda:0"}
    assert list(df["model"].unique()) == ["resnet20", "r20_eighth"]
    eager = df[df["device"] == "eager-cpu"].set_index("model")
    assert (eager["status"] == "ok").all()
    assert eager.loc["resnet20", "speedup"] == pytest.approx(1.0)
    # speedup is the original's median over the model's, from the medians of the recorded samples
    cells = {c.model: c for c in res.devices[0].cells}
    for label in ("resnet20", "r20_eighth"):
        assert eager.loc[label, "median_ms"] == pytest.approx(
            float(np.median(cells[label].stats.samples_ms)), rel=1e-6)
    assert eager.loc["r20_eighth", "speedup"] == pytest.approx(
        eager.loc["resnet20", "median_ms"] / eager.loc["r20_eighth", "median_ms"], rel=1e-6)
    assert eager.loc["r20_eighth", "macs"] < 0.2 * eager.loc["resnet20", "macs"]
    assert eager.loc["r20_eighth", "macs_ratio"] == pytest.approx(
        eager.loc["r20_eighth", "macs"] / eager.loc["resnet20", "macs"])
    assert eager.loc["r20_eighth", "params"] < eager.loc["resnet20", "params"]
    assert eager.loc["r20_eighth", "size_mb"] < eager.loc["resnet20", "size_mb"]
    cuda = df[df["device"] == "cuda:0"]
    if HAS_GPU:
        assert (cuda["status"] == "ok").all() and res.exit_code == 0
    else:
        assert (cuda["status"] == "skipped").all()
        assert cuda["error"].str.startswith("skipped: cuda:0 is not available: torch was built without CUDA").all() \
            or cuda["error"].str.startswith("skipped: cuda:0 is not available: no NVIDIA GPU").all()
        assert cuda["median_ms"].isna().all() and cuda["speedup"].isna().all()
        assert res.exit_code == 1
    assert is_png(out / "speedup.png") and is_png(out / "latency.png")
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["kind"] == "compare"
    assert manifest["fingerprints"]["eager-cpu"]["hardware"] == "test CPU"
    assert "cuda:0" in manifest["fingerprints"]
    assert manifest["config"]["iterations"] == 3
    lines = (out / "measurements.jsonl").read_text().splitlines()
    assert [json.loads(x)["device"] for x in lines] == ["eager-cpu", "cuda:0"]
    assert len(json.loads(lines[0])["cells"][0]["stats"]["samples_ms"]) == 3  # raw samples kept
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "r20_eighth" in html


def test_pte_on_a_pytorch_device_says_why(tmp_path):
    pte = tmp_path / "fake.pte"
    pte.write_bytes(b"\x00\x00\x00\x00ET12" + b"\x00" * 64)  # passes the header check; never run here
    res = run_compare(["resnet20", str(pte)], [EagerCpuDevice()], FAST, out=tmp_path / "run", log=None,
                      report=False)
    cell = res.cell("fake.pte", "eager-cpu")
    assert cell.status == "skipped"
    assert "is a .pte" in cell.error and "runs PyTorch modules" in cell.error
    assert res.cell("resnet20", "eager-cpu").ok
    assert res.exit_code == 1


def test_missing_runner_skips_local_others_still_run(tmp_path, monkeypatch):
    monkeypatch.setenv("AMC_ET_BENCH", str(tmp_path / "no-such-runner"))
    res = run_compare(["resnet20"], ["local", EagerCpuDevice()], FAST, out=tmp_path / "run", log=None,
                      report=False)
    local = res.cell("resnet20", "local")
    assert local.status == "skipped" and "AMC_ET_BENCH" in local.error
    assert res.cell("resnet20", "eager-cpu").ok
    assert res.exit_code == 1
    assert "local" in json.loads((tmp_path / "run" / "run.json").read_text())["device_errors"]


def test_unreachable_device_cells_show_the_error(tmp_path, capsys):
    # adb-tcp:127.0.0.1:1 refuses connections (or the adb bridge is not installed): its cells say why, exit code 1
    rc = main(["compare", "resnet20", "--devices", "adb-tcp:127.0.0.1:1", "--out", str(tmp_path / "run"),
               "--iterations", "2", "--warmup", "0", "--no-report"])
    assert rc == 1
    df = pd.read_csv(tmp_path / "run" / "compare.csv")
    assert df.loc[0, "status"] in ("skipped", "failed")
    assert df.loc[0, "error"].startswith(("skipped: ", "failed: "))
    assert "adb-tcp:127.0.0.1:1" in capsys.readouterr().out


# -- bad input: one line, exit 2, nothing measured ------------------------------------------------


def test_bad_model_file_is_an_error_in_its_cells_others_still_run(tmp_path, capsys):
    junk = tmp_path / "model.pte"
    junk.write_bytes(b"this is not a program")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    out = tmp_path / "run"
    res = run_compare(["resnet20", str(junk), str(text)], [EagerCpuDevice()], FAST, out=out, log=None, report=False)
    assert res.exit_code == 1
    cells = {c.model: c for c in res.devices[0].cells}
    assert cells["resnet20"].ok  # the loadable model is still measured
    assert cells["model.pte"].status == "failed" and "not an ExecuTorch program" in cells["model.pte"].error
    assert cells["notes.txt"].status == "failed" and "is not a model" in cells["notes.txt"].error
    assert "\n" not in cells["model.pte"].error and (out / "compare.csv").is_file()
    # nothing loadable at all: a one-line error before any run folder
    assert main(["compare", str(junk), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("amc-mobile: error:") and "not an ExecuTorch program" in err and "\n" not in err
    assert not (tmp_path / "none").exists()


def test_mismatched_spec_and_weights(tmp_path, capsys):
    folder = make_pruned(tmp_path / "pruned")
    torch.save(build_model("resnet20").state_dict(), folder / "model.pt")  # unpruned weights, pruned spec
    assert main(["compare", "resnet20", str(folder), "--devices", "local",
                 "--out", str(tmp_path / "run"), "--iterations", "5", "--warmup", "1"]) == 1
    out = capsys.readouterr().out
    assert "does not match architecture.json" in out and "not loaded" in out


def test_unknown_device_scheme_and_bad_labels(tmp_path, capsys):
    assert main(["compare", "resnet20", "--devices", "tpu:0", "--out", str(tmp_path / "a")]) == 2
    assert "unknown device URI 'tpu:0'" in capsys.readouterr().err
    with pytest.raises(AmcError, match="one per model"):
        load_models(["resnet20", "resnet20"], labels=["only-one"])
    assert [m.label for m in load_models(["resnet20", "resnet20"])] == ["resnet20", "resnet20-2"]


def test_pickled_module_needs_allow_pickle(tmp_path, capsys):
    path = tmp_path / "whole.pt"
    torch.save(build_model("resnet20"), path)
    with pytest.raises(AmcError, match="--allow-pickle"):
        load_models(["resnet20", str(path)])
    res = run_compare(["resnet20", str(path)], [EagerCpuDevice()], FAST, out=tmp_path / "a", log=None, report=False)
    assert res.cell("resnet20", "eager-cpu").ok and "--allow-pickle" in res.cell("whole.pt", "eager-cpu").error
    models = load_models(["resnet20", str(path)], allow_pickle=True)
    assert models[1].loaded.source == "pickle" and models[1].macs == models[0].macs


# -- accuracy -------------------------------------------------------------------------------------


def _have_data() -> bool:
    from amc_mobile.data import find_data_dir

    try:
        find_data_dir()
        return True
    except AmcError:
        return False


@pytest.mark.skipif(not _have_data(), reason="Fashion-MNIST not installed (dataset-fashion-mnist)")
def test_accuracy_and_shape_mismatch_note(tmp_path):
    wide = make_pruned(tmp_path / "r20_32px", frac=0.5, input_size=32)
    models = load_models(["resnet20", str(wide)])
    add_accuracy(models, max_images=200)
    assert 0.0 <= models[0].top1 <= 1.0
    assert "200 images" in models[0].accuracy_note and "untrained" in models[0].accuracy_note
    assert models[1].top1 is None
    assert models[1].accuracy_note == "skipped: the model takes input 1x32x32, Fashion-MNIST images are 1x28x28"


def test_missing_data_is_an_error_before_measuring(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["compare", "resnet20", "--accuracy", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out)])
    assert rc == 2 and "Fashion-MNIST not found" in capsys.readouterr().err
    assert not out.exists()


# -- slow: the real thing on local (and cuda:0 when there is a GPU) -------------------------------


@pytest.mark.slow
def test_compare_local_and_cuda_cli(tmp_path, pruned_dir, capsys, et_bench):
    out = tmp_path / "run"
    rc = main(["compare", "resnet20", str(pruned_dir), "--devices", "local", "cuda:0",
               "--iterations", "20", "--warmup", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    df = pd.read_csv(out / "compare.csv")
    assert set(df["device"]) == {"local", "cuda:0"}
    local = df[df["device"] == "local"].set_index("model")
    assert (local["status"] == "ok").all(), local["error"].tolist()
    # how much faster 14% of the MACs runs is a benchmark; here: the speedup is the ratio of the medians,
    # and the headline line prints that ratio
    speedup = local.loc["r20_eighth", "speedup"]
    assert speedup == pytest.approx(local.loc["resnet20", "median_ms"] / local.loc["r20_eighth", "median_ms"], rel=1e-6)
    assert local.loc["resnet20", "speedup"] == pytest.approx(1.0) and (local["n"] >= 20).all()
    assert local.loc["r20_eighth", "p90_ms"] >= local.loc["r20_eighth", "median_ms"]
    cuda = df[df["device"] == "cuda:0"]
    if HAS_GPU:
        assert rc == 0 and (cuda["status"] == "ok").all() and not math.isnan(cuda["speedup"].iloc[1])
    else:
        assert rc == 1
        assert cuda["error"].str.contains("skipped: cuda:0 is not available: torch was built without CUDA").all() \
            or cuda["error"].str.contains("skipped: cuda:0 is not available: no NVIDIA GPU").all()
        assert "skipped: cuda:0 is not available" in printed
    assert f"r20_eighth (14% MACs) vs resnet20: {speedup:.2f}x on local" in printed
    assert is_png(out / "speedup.png")
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["fingerprints"]["local"]["backend"] == "xnnpack"
    assert manifest["command"].startswith("amc-mobile compare resnet20")
    html = (out / "report.html").read_text()
    assert "xnnpack" in html and "data:image/png;base64," in html
