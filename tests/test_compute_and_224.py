"""`--compute`, the per-phase timing of a search, and the code paths that ImageNet-sized inputs take
(ImageNet strides, 3-channel resized image folders, the calibration pass's batching and sampling), at small sizes: a 3x64x64 MobileNet-V2 runs the 224x224 strides. The 224x224 figures
are in benchmarks/imagenet_shaped.py and docs/BENCHMARKS.md."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amc_mobile.errors import AmcError

NO_CUDA = not torch.cuda.is_available()


# ------------------------------------------------------------------------------------ --compute


@pytest.mark.skipif(not NO_CUDA, reason="this host has a GPU: cuda is a valid --compute here")
@pytest.mark.parametrize("argv", [
    ["search", "--compute", "cuda", "--cost", "flops", "--episodes", "1"],
    ["finetune", "RUN", "--compute", "cuda"],
    ["train", "--compute", "cuda", "--epochs", "1", "--out", "OUT"],
    ["train", "--device", "cuda", "--epochs", "1", "--out", "OUT"],  # the old name of the flag
])
def test_compute_cuda_without_a_gpu_is_one_line(argv, tmp_path, capsys):
    from amc_mobile.cli import main

    run = tmp_path / "run"
    if "RUN" in argv:  # a real pruned folder: the compute check must not hide behind a missing-folder error
        from amc_mobile.models import build_model
        from amc_mobile.pruning.slicing import save_pruned

        m = build_model("resnet20")
        save_pruned(m, run / "pruned", {"name": "resnet20"}, {})
    argv = [str(run) if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sees no CUDA GPU" in err[0] and "--compute cpu" in err[0], err


def test_compute_values():
    from amc_mobile.compute import resolve_compute

    assert resolve_compute("cpu") == torch.device("cpu")
    assert resolve_compute(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "mps", "cuda:x", ""):
        with pytest.raises(AmcError, match="expected cpu, cuda or cuda:N"):
            resolve_compute(bad)
    if torch.cuda.is_available():
        with pytest.raises(AmcError, match="CUDA GPU"):
            resolve_compute(f"cuda:{torch.cuda.device_count()}")


def test_copy_to_another_device_leaves_the_shared_original_alone():
    """The scorer's pruned models share tensors with the original; `module.to()` would move those in place.
    The meta device stands in for a GPU: the copy moves, the original (and what it shares) does not."""
    from amc_mobile.compute import copy_to
    from amc_mobile.search.reconstruct import shallow_copy

    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    original(torch.zeros(1, 3, 6, 6))
    shared = shallow_copy(original)
    assert shared[0].weight is original[0].weight
    moved = copy_to(shared, torch.device("meta"))
    assert all(p.device.type == "meta" for p in moved.parameters())
    assert all(b.device.type == "meta" for b in moved.buffers())
    assert all(p.device.type == "cpu" for p in original.parameters())
    assert all(t.device.type == "cpu" for t in list(shared.parameters()) + list(shared.buffers()))
    assert copy_to(shared, torch.device("cpu")) is shared


# ------------------------------------------------------------------------------------ the calibration pass


def _unfold_points(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor):
    """Reference: im2col of the whole map with F.unfold, rows taken at `pos`."""
    cols = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)  # (b, C*k*k, L)
    b, n = pos.shape
    X = cols.gather(2, pos[:, None, :].expand(b, cols.shape[1], n)).permute(0, 2, 1).reshape(b * n, -1)
    Y = y.flatten(2).gather(2, pos[:, None, :].expand(b, y.shape[1], n)).permute(0, 2, 1).reshape(b * n, -1)
    return X, Y - conv.bias.detach()


@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (7, 2, 3), (5, 1, 2), (1, 2, 0)])
def test_sampled_patches_match_im2col_without_padding_the_map(k, s, p):
    from amc_mobile.search.reconstruct import _conv_points

    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, k, s, p, bias=True)
    x = torch.randn(3, 5, 11, 11)
    y = conv(x).detach()
    X, Y = _conv_points(conv, x.contiguous(memory_format=torch.channels_last),
                        y.contiguous(memory_format=torch.channels_last), 7, torch.Generator().manual_seed(1))
    ho, wo = y.shape[2:]
    pos = torch.rand(3, ho * wo, generator=torch.Generator().manual_seed(1)).argsort(dim=1)[:, :7]
    Xr, Yr = _unfold_points(conv, x, y, pos)
    assert torch.allclose(X, Xr) and torch.allclose(Y, Yr, atol=1e-6)
    # the sampled rows reproduce the conv: X W^T = Y at those points
    assert torch.allclose(X @ conv.weight.detach().reshape(4, -1).T, Y, atol=1e-4)


def test_calibration_batch_scales_with_pixels():
    from amc_mobile.search.reconstruct import calibration_batch

    assert calibration_batch(torch.zeros(500, 1, 28, 28)) == 100
    assert calibration_batch(torch.zeros(500, 3, 224, 224)) == 16
    assert calibration_batch(torch.zeros(500, 3, 1024, 1024)) == 1


# ------------------------------------------------------------------------------------ a 224-strided search


def test_imagenet_strided_search_on_a_resized_image_folder_records_its_phases(tmp_path, monkeypatch):
    """MobileNet-V2 with ImageNet strides (stride-2 stem and stage 2: the 224x224 layout) on 3x64x64 PNGs
    resized by --input-size, --compute cpu: per-phase timings in episodes.csv, summary.json and the CLI."""
    from PIL import Image

    from amc_mobile.cli import main

    root = tmp_path / "imgs"
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 24), ("val", 16)):
        for i in range(n):
            d = root / split / f"c{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            px = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(d / f"{i}.png")  # 48x40: resized (shorter side) and center-cropped
    monkeypatch.setenv("AMC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    kwargs = json.dumps({"num_classes": 4, "in_channels": 3, "input_size": 64, "width_mult": 0.35})
    rc = main(["search", "-m", "amc_mobile.models:mobilenet_v2", "--model-kwargs", kwargs,
               "--data", f"imagefolder:{root}", "--input-size", "64", "--cost", "flops", "--target", "0.6",
               "--episodes", "3", "--warmup", "2", "--val-images", "16", "--calib-images", "24",
               "--compute", "cpu", "--out", str(out), "--no-measure-final", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["setup"]["compute"].startswith("cpu")
    assert summary["setup"]["calibration_s"] > 0
    timing = summary["timing"]
    assert timing["episodes"] == 3
    shares = [timing[k]["share"] for k in ("prune_s", "eval_s", "predict_s", "agent_s", "other_s")]
    assert all(0 <= x <= 1 for x in shares) and sum(shares) == pytest.approx(1, abs=0.02)
    rows = list(csv.DictReader(open(out / "episodes.csv")))
    for r in rows:
        assert float(r["episode_s"]) >= float(r["eval_s"]) + float(r["prune_s"])
    config = json.loads((out / "config.json").read_text())
    assert config["compute"] == "cpu"
    # a resumed run may be scored elsewhere (compute is a run-time choice, like --threads)
    from amc_mobile.search.run_folder import RESUMABLE_OVERRIDES

    assert "compute" in RESUMABLE_OVERRIDES


def test_phase_timing_summary_and_line():
    from amc_mobile.search.timing import describe, phase_timing

    rows = [{"prune_s": "0.5", "eval_s": "2", "predict_s": "0.1", "agent_s": "0.2", "episode_s": "3"},
            {"prune_s": "0", "eval_s": "0", "predict_s": "0.1", "agent_s": "0.3", "episode_s": "0.5"}]
    t = phase_timing(rows, {"calibration_s": 4.0})
    assert t["episodes"] == 2 and t["eval_s"]["total"] == 2 and t["eval_s"]["share"] == pytest.approx(2 / 3.5)
    assert t["other_s"]["total"] == pytest.approx(0.3)
    line = describe(t)
    assert line.startswith("per episode 1.75 s median over 2: evaluation 57%") and "features 4 s once" in line
    assert phase_timing([{"prune_s": "1", "eval_s": "1"}]) == {}  # a log from before these columns


def test_too_few_calibration_rows_is_named_with_the_fix():
    from amc_mobile.pruning import build_graph
    from amc_mobile.search.config import SearchWarning
    from amc_mobile.search.reconstruct import collect_layer_stats

    model = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 8, 3, 1, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    model.input_shape = (3, 8, 8)
    graph = build_graph(model)
    groups = [l.in_group for l in graph.decision_layers("all")]
    with pytest.warns(SearchWarning, match=r"under-determined .*288 columns\): raise --calib-images to at least 29"):
        collect_layer_stats(model, graph, groups, torch.randn(4, 3, 8, 8), points=10)
