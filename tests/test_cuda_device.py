"""The `cuda:N` device. The first half runs everywhere; the GPU half skips without an NVIDIA GPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from amc_mobile.errors import AmcError
from device import Candidate, MeasureConfig, open_device
from device.cuda import CudaDevice, discover, parse_uri_rest

HAS_GPU = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(
    not HAS_GPU, reason=f"no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none"
)


# -- everywhere: URI parsing and the reasons a GPU is not there ------------------------------------


@pytest.mark.parametrize(
    "rest, expected",
    [
        ("0", (0, {})),
        ("3", (3, {})),
        ("0?dtype=fp16", (0, {"dtype": "fp16"})),
        ("1?dtype=fp16&channels_last=1", (1, {"dtype": "fp16", "channels_last": True})),
        ("0?dtype=fp32&channels_last=0", (0, {})),
        ("0?batch=50", (0, {"batch": 50})),
        ("0?graph=1&batch=8&dtype=fp16", (0, {"graph": True, "batch": 8, "dtype": "fp16"})),
        ("0?graph=off", (0, {})),
    ],
)
def test_parse_uri(rest, expected):
    defaults = {"dtype": "fp32", "channels_last": False, "batch": 1, "graph": False}
    index, options = expected
    assert parse_uri_rest(rest) == (index, {**defaults, **options})


@pytest.mark.parametrize(
    "uri, says",
    [
        ("cuda:x", "expected cuda:N"),
        ("cuda:-1", "expected cuda:N"),
        ("cuda:", "expected cuda:N"),
        ("cuda:1.5", "expected cuda:N"),
        ("cuda:0?dtype=int8", "dtype 'int8'"),
        ("cuda:0?bogus=1", "unknown option 'bogus'"),
        ("cuda:0?dtype", "needs a value"),
        ("cuda:0?channels_last=maybe", "must be 0 or 1"),
        ("cuda:0?graph=2", "graph='2' must be 0 or 1"),
        ("cuda:0?batch=0", "batch='0' must be a whole number"),
        ("cuda:0?batch=-4", "batch='-4' must be a whole number"),
        ("cuda:0?batch=2.5", "batch='2.5' must be a whole number"),
    ],
)
def test_bad_uri_forms(uri, says):
    # Malformed URIs are refused before CUDA is even looked at, so this holds on any machine.
    with pytest.raises(AmcError) as err:
        open_device(uri)
    msg = str(err.value)
    assert says in msg and repr(uri) in msg and "\n" not in msg


def test_open_without_cuda_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(AmcError) as err:
        open_device("cuda:0")
    msg = str(err.value)
    assert msg.startswith(f"cuda:0 is not available: torch was built without CUDA (torch {torch.__version__})")
    assert "\n" not in msg


def test_open_with_cuda_build_but_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(AmcError, match=r"^cuda:0 is not available: no NVIDIA GPU visible"):
        open_device("cuda:0?dtype=fp16")


def test_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(AmcError, match=r"^cuda:3 out of range \(1 GPU\)"):
        open_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(AmcError, match=r"^cuda:2 out of range \(2 GPUs\); use cuda:0 \.\. cuda:1"):
        CudaDevice(2)


def test_bad_constructor_dtype():
    with pytest.raises(AmcError, match="bf8"):
        CudaDevice(0, dtype="bf8")


def test_discover_without_cuda_never_raises(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert discover() == []
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert discover() == []


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_discover_on_this_machine_without_gpu():
    assert discover() == []


# -- on a GPU ----------------------------------------------------------------------------------------


def _conv_stack(channels: int, depth: int) -> nn.Module:
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*layers)


def _candidates() -> list[Candidate]:
    torch.manual_seed(0)
    return [
        Candidate("small", _conv_stack(8, 1), torch.randn(1, 8, 16, 16)),
        Candidate("medium", _conv_stack(64, 2), torch.randn(1, 64, 56, 56)),
        Candidate("big", _conv_stack(256, 4), torch.randn(8, 256, 112, 112)),
    ]


class _Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom: unsupported op in forward")


class _Oom(nn.Module):
    def forward(self, x):
        # 32 TiB through the caching allocator (plain cudaMalloc): fails at once, allocates nothing
        return torch.empty(2**43, dtype=torch.float32, device=x.device)


CFG = MeasureConfig(warmup=3, iterations=20)


def fastest(stats) -> float:
    """The fastest sample: host noise (a late launch, another process) only ever adds time, so latency
    comparisons here are made on it; a comparison of medians is a benchmark (benchmarks/cuda_smoke.py)."""
    return min(stats.samples_ms)


@pytest.fixture(scope="module")
def gpu():
    return open_device("cuda:0")


@pytest.mark.cuda
@gpu_only
def test_discover_lists_gpu0():
    found = discover()
    assert found and found[0][0] == "cuda:0"
    name = torch.cuda.get_device_name(0)
    assert found[0][1].startswith(f"{name}, ") and found[0][1].endswith(f"GiB, CUDA {torch.version.cuda}")


@pytest.mark.cuda
@gpu_only
def test_fingerprint(gpu):
    fp = gpu.fingerprint(CFG)
    assert fp.kind == "cuda"
    assert fp.hardware == torch.cuda.get_device_name(0)
    assert fp.runtime == f"torch-{torch.__version__}-cuda-{torch.version.cuda}"
    assert fp.backend == "cuda-fp32" and fp.threads == 0 and fp.affinity is None
    assert fp.extra["compute_capability"].count(".") == 1
    assert "driver" in fp.extra and "cudnn" in fp.extra
    assert open_device("cuda:0?dtype=fp16").fingerprint().backend == "cuda-fp16"
    fp16cl = open_device("cuda:0?dtype=fp16&channels_last=1")
    assert fp16cl.fingerprint().backend == "cuda-fp16-channels_last"
    assert fp16cl.uri == "cuda:0?dtype=fp16&channels_last=1"
    assert fp.digest() != fp16cl.fingerprint().digest()
    b50g = open_device("cuda:0?graph=1&batch=50&dtype=fp16")
    assert b50g.fingerprint().backend == "cuda-fp16-b50-graph"
    assert b50g.uri == "cuda:0?dtype=fp16&batch=50&graph=1"  # canonical order, whatever was typed


@pytest.mark.cuda
@gpu_only
def test_measure_three_convs_in_order(gpu):
    cands = _candidates()
    calls = []
    res = gpu.measure(cands, CFG, progress=calls.append)
    assert [r.name for r in res] == ["small", "medium", "big"]
    assert all(r.ok for r in res), [r.error for r in res]
    assert all(r.n == CFG.iterations == len(r.samples_ms) for r in res)
    assert all(r.median_ms > 0 and r.load_ms is not None for r in res)
    assert fastest(res[2]) > fastest(res[0]) * 5, [r.median_ms for r in res]
    assert calls == [1, 1, 1]
    # the caller's modules are untouched: still fp32 on the CPU, still in training mode
    for c in cands:
        p = next(c.module.parameters())
        assert p.device.type == "cpu" and p.dtype == torch.float32 and c.module.training
    assert torch.backends.cudnn.benchmark is False  # restored


@pytest.mark.cuda
@gpu_only
def test_fp16(gpu):
    dev = open_device("cuda:0?dtype=fp16")
    cands = _candidates()
    res = dev.measure(cands, CFG)
    assert all(r.ok and r.n == CFG.iterations for r in res), [r.error for r in res]
    assert fastest(res[2]) > fastest(res[0])
    assert next(cands[2].module.parameters()).dtype == torch.float32
    fp32_big = gpu.measure(cands[2:], CFG)[0]
    # tensor cores: half precision should not be slower than fp32/TF32 on a big conv stack
    assert fastest(res[2]) < fastest(fp32_big) * 1.2, (res[2].median_ms, fp32_big.median_ms)
    cl = CudaDevice(0, dtype="fp16", channels_last=True).measure(cands, CFG)
    assert all(r.ok for r in cl), [r.error for r in cl]


@pytest.mark.cuda
@gpu_only
def test_failing_candidates_do_not_stop_the_others(gpu):
    small, _, big = _candidates()
    bad = Candidate("raises", _Raises(), torch.randn(1, 8, 16, 16))
    oom = Candidate("oom", _Oom(), torch.randn(1, 8, 16, 16))
    res = gpu.measure([small, bad, oom, big], CFG)
    assert [r.name for r in res] == ["small", "raises", "oom", "big"]
    assert res[0].ok and res[3].ok and res[3].n == CFG.iterations
    assert not res[1].ok and res[1].n == 0 and math.isnan(res[1].median_ms)
    assert res[1].error == "RuntimeError: boom: unsupported op in forward"
    assert not res[2].ok and "out of memory" in res[2].error.lower() and "\n" not in res[2].error
    assert torch.cuda.memory_allocated(0) < 2**20  # freed between candidates


@pytest.mark.cuda
@gpu_only
def test_min_time_and_repeats(gpu):
    small = _candidates()[0]
    r = gpu.measure([small], MeasureConfig(warmup=2, iterations=5, min_time_ms=20.0))[0]
    assert r.ok and r.n > 5 and sum(r.samples_ms) >= 20.0
    r = gpu.measure([small], MeasureConfig(warmup=2, iterations=7, repeats=3))[0]
    assert r.ok and r.n == 21


@pytest.mark.cuda
@gpu_only
def test_graph_replay_removes_launch_cost(gpu):
    # a deep stack of tiny convs is pure launch overhead in eager mode; a graph replays it in one go
    torch.manual_seed(0)
    tiny = Candidate("tiny", _conv_stack(8, 12), torch.randn(1, 8, 8, 8))
    cfg = MeasureConfig(warmup=5, iterations=50)
    eager = gpu.measure([tiny], cfg)[0]
    graphed = open_device("cuda:0?graph=1").measure([tiny], cfg)[0]
    assert eager.ok and graphed.ok, (eager.error, graphed.error)
    assert graphed.n == 50
    assert fastest(graphed) < fastest(eager) * 0.8, (graphed.median_ms, eager.median_ms)


class _HostSync(nn.Module):
    def forward(self, x):
        return x * float(x.sum())  # .item()-style host read: not capturable


@pytest.mark.cuda
@gpu_only
def test_graph_capture_failure_is_that_candidates_error():
    small = _candidates()[0]
    bad = Candidate("host-sync", _HostSync(), torch.randn(1, 8, 16, 16))
    res = open_device("cuda:0?graph=1").measure([bad, small], CFG)
    assert not res[0].ok and "\n" not in res[0].error and res[0].error
    assert res[1].ok and res[1].n == CFG.iterations  # the capture failure left the GPU usable


@pytest.mark.cuda
@gpu_only
def test_batch_option():
    small, medium, big = _candidates()
    cfg = MeasureConfig(warmup=3, iterations=20)
    one = open_device("cuda:0").measure([medium], cfg)[0]
    many = open_device("cuda:0?batch=32").measure([medium, big], cfg)
    assert one.ok and many[0].ok, (one.error, many[0].error)
    assert fastest(many[0]) > fastest(one)  # 32 images of 64x56x56 cost more than one
    assert not many[1].ok and "batch size 1" in many[1].error  # big's example has batch 8
    assert medium.example_input.shape[0] == 1  # the caller's input is untouched
