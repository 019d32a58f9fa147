"""The `local` device: real lowering, the real host et_bench, real latencies."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from amc_mobile.errors import AmcError
from device import Candidate, MeasureConfig, open_device
from device.local import LocalDevice, cpu_model, discover
from device.lowering import lower_to_pte
from device.runner import DEFAULT_RUNNER, ENV_RUNNER, REPO_ROOT, find_runner


@pytest.fixture(scope="session")
def runner():
    if not os.environ.get(ENV_RUNNER) and not DEFAULT_RUNNER.exists():
        subprocess.run(
            ["bash", str(REPO_ROOT / "android_bench" / "build_host.sh"), sys.executable, str(DEFAULT_RUNNER.parent)],
            check=True,
        )
    return find_runner()


@pytest.fixture
def dev(runner):
    return LocalDevice(runner=runner)


class ConvUnit(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y.relu()
        return y


class TinyEmbedding(nn.Module):
    """Lowers, then fails at run time: et_bench feeds 0/1 indices into a 1-row table."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 8))

    def forward(self, idx):
        return nn.functional.embedding(idx, self.weight)


def conv(name: str, cin: int, cout: int, hw: int) -> Candidate:
    torch.manual_seed(0)
    return Candidate(name, ConvUnit(cin, cout), torch.randn(1, cin, hw, hw))


FAST = MeasureConfig(warmup=2, iterations=6)


# -- no measuring -----------------------------------------------------------------------------------


def test_uri():
    dev = open_device("local")
    assert isinstance(dev, LocalDevice) and dev.uri == "local"
    with pytest.raises(AmcError, match="takes no options"):
        open_device("local:0")
    with pytest.raises(AmcError):
        LocalDevice.from_uri_rest("x")


def test_discover():
    ((uri, desc),) = discover()
    assert uri == "local"
    assert f"{os.cpu_count()} cores" in desc and "executorch 1.4.1" in desc and "xnnpack" in desc


def test_fingerprint():
    with open("/proc/cpuinfo") as f:
        models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    fp = LocalDevice().fingerprint()
    assert fp.kind == "local" and fp.runtime == "executorch-1.4.1" and fp.backend == "xnnpack"
    assert fp.threads == 1 and fp.affinity is None
    if models:
        assert fp.hardware == " ".join(models[0].split()) == cpu_model()
    assert fp.extra["cores"] == os.cpu_count() and fp.extra["kernel"] == platform.release()
    fp4 = LocalDevice().fingerprint(MeasureConfig(threads=4, affinity="f"))
    assert fp4.threads == 4 and fp4.affinity == "f"
    assert fp4.digest() != fp.digest() and any("threads" in d for d in fp.differences(fp4))


def test_missing_runner_fails_before_lowering(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_RUNNER, str(tmp_path / "nope"))

    class Exploding(nn.Module):  # would make lowering fail loudly if it were reached
        def forward(self, x):
            raise AssertionError("lowering was attempted")

    with pytest.raises(AmcError, match="not an executable"):
        LocalDevice().measure([Candidate("a", Exploding(), torch.zeros(1))])


def test_empty_batch(dev):
    assert dev.measure([]) == []


# -- measuring ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_measure_three_in_order(dev):
    cands = [conv("c_mid", 8, 16, 16), conv("a_tiny", 3, 4, 8), conv("b_big", 32, 64, 32)]
    ticks = []
    res = dev.measure(cands, FAST, progress=ticks.append)
    assert [r.name for r in res] == ["c_mid", "a_tiny", "b_big"]  # candidate order, not the .pte's
    for r in res:
        assert r.ok, r.error
        assert r.n == FAST.iterations and len(r.samples_ms) == FAST.iterations
        assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms and r.load_ms is not None and r.load_ms > 0
    assert sum(ticks) == 3
    # each result is its own candidate's timing (not its neighbour's): ~600x the multiply-adds takes clearly
    # longer. Compared on the fastest sample of each: host noise only ever adds time, so it would have to slow
    # down every sample of the tiny one 10x to break this, and a mix-up of results still breaks it.
    assert min(res[2].samples_ms) > 10 * min(res[1].samples_ms)


@pytest.mark.slow
def test_failed_export_does_not_lose_the_others(dev):
    cands = [conv("first", 3, 8, 8), Candidate("odd", DataDependent(), torch.randn(1, 4, 8, 8)), conv("last", 8, 8, 8)]
    ticks = []
    res = dev.measure(cands, FAST, progress=ticks.append)
    assert [r.name for r in res] == ["first", "odd", "last"]
    assert res[0].ok and res[2].ok and res[0].n == res[2].n == FAST.iterations
    assert not res[1].ok and "'odd'" in res[1].error and "export" in res[1].error
    assert math.isnan(res[1].median_ms) and res[1].n == 0
    assert sum(ticks) == 3


@pytest.mark.slow
def test_runtime_failure_gets_the_runner_reason_and_the_rest_still_run(dev):
    cands = [
        conv("a", 3, 8, 8),
        Candidate("bad", TinyEmbedding(), torch.zeros(64, dtype=torch.long)),
        conv("c", 8, 8, 8),
        conv("d", 4, 4, 8),
    ]
    res = dev.measure(cands, MeasureConfig(warmup=1, iterations=3, repeats=2))
    assert [r.ok for r in res] == [True, False, True, True]
    assert "'bad'" in res[1].error and "embedding" in res[1].error
    # repeats pool their samples, also for the methods after the failing one
    assert [r.n for r in res] == [6, 0, 6, 6]


@pytest.mark.slow
def test_threads_config_and_bad_affinity(dev):
    cands = [conv("u", 8, 8, 8)]
    (r,) = dev.measure(cands, MeasureConfig(warmup=1, iterations=2, threads=2))
    assert r.ok and r.n == 2
    # a mask that names only a CPU this machine lacks is the caller's error, not a candidate's
    with pytest.raises(AmcError, match="affinity"):
        dev.measure(cands, MeasureConfig(warmup=1, iterations=2, affinity=format(1 << 1000, "x")))


@pytest.mark.slow
def test_hanging_runner_times_out(runner):
    dev = LocalDevice(runner=runner, timeout_s=1.5)
    res = dev.measure([conv("x", 8, 8, 8), conv("y", 4, 4, 8)], MeasureConfig(warmup=0, iterations=1, min_time_ms=60_000))
    assert [r.ok for r in res] == [False, False]
    assert "did not finish within" in res[0].error


@pytest.mark.slow
def test_measure_pte(dev, tmp_path):
    path = tmp_path / "m.pte"
    assert lower_to_pte([conv("p", 3, 4, 8), conv("q", 4, 8, 8)], path) == {}
    assert sorted(dev.list_methods(path)) == ["p", "q"]
    res = dev.measure_pte(path, ["q", "p"], FAST)
    assert [r.name for r in res] == ["q", "p"] and all(r.ok and r.n == FAST.iterations for r in res)
    res = dev.measure_pte(path, None, MeasureConfig(warmup=0, iterations=2))
    assert sorted(r.name for r in res) == ["p", "q"]
    with pytest.raises(AmcError, match="unknown method 'zz'"):
        dev.measure_pte(path, ["zz"], FAST)
    with pytest.raises(AmcError, match="no such .pte"):
        dev.measure_pte(tmp_path / "none.pte", None, FAST)
    # a damaged file fails every method with the runner's reason, in one go
    damaged = tmp_path / "damaged.pte"
    damaged.write_bytes(path.read_bytes()[:2000])
    res = dev.measure_pte(damaged, ["p", "q"], FAST)
    assert [r.ok for r in res] == [False, False]
    assert all("cannot load program" in r.error and "damaged.pte" in r.error for r in res)


def test_lowered_program_computes_what_the_module_computes(tmp_path):
    """The lowering speed-up (an annotation-free `py_impl`) must not change what is lowered: the
    .pte, run by ExecuTorch's own runtime, gives the eager module's outputs; and `py_impl` still
    refuses a second registration for a key, as torch's does."""
    from executorch.runtime import Runtime

    import device.lowering as lowering

    torch.manual_seed(0)
    dw = ConvUnit(16, 16)  # named children: ExecuTorch's BN fusion fails on a top-level Sequential
    dw.conv, dw.relu = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Hardswish()
    units = [ConvUnit(8, 16).eval(), dw.eval()]
    for u in units:
        u.bn.running_mean.uniform_(-1, 1)
        u.bn.running_var.uniform_(0.5, 2)
    xs = [torch.randn(1, 8, 12, 12), torch.randn(1, 16, 10, 10)]
    pte = tmp_path / "two.pte"
    assert lower_to_pte([Candidate(f"m{i}", u, x) for i, (u, x) in enumerate(zip(units, xs))], pte) == {}
    # scoped: stock torch again once the lowering is done (tests/test_lowering_speedups.py)
    assert torch._ops.OperatorBase.py_impl is not lowering._py_impl_without_runtime_annotations
    program = Runtime.get().load_program(pte)
    for i, (u, x) in enumerate(zip(units, xs)):
        got = program.load_method(f"m{i}").execute([x])[0]
        with torch.no_grad():
            want = u(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    op = torch.ops.aten.hardswish.default
    key = torch._C.DispatchKey.AutogradCPU
    had = key in op.py_kernels
    with lowering.exporter_speedups():
        assert torch._ops.OperatorBase.py_impl is lowering._py_impl_without_runtime_annotations
        if not had:
            op.py_impl(key)(lambda *a, **k: None)
        try:
            with pytest.raises(RuntimeError, match="override a python impl"):
                op.py_impl(key)(lambda *a, **k: None)
        finally:
            if not had:
                del op.py_kernels[key]
                op._dispatch_cache.clear()


# -- interleaved rounds with a drift reference (issue 19) ----------------------------------------------


@pytest.mark.slow
def test_interleaved_with_reference_and_a_failing_method(dev):
    cands = [conv("a", 3, 8, 8), Candidate("bad", TinyEmbedding(), torch.zeros(64, dtype=torch.long)),
             conv("c", 8, 8, 8), conv("ref", 8, 16, 8)]
    cfg = MeasureConfig(warmup=1, iterations=4, reference="ref", group=2, repeats=2)
    res = dev.measure(cands, cfg)
    assert [r.ok for r in res] == [True, False, True, True]
    assert "'bad'" in res[1].error and "embedding" in res[1].error
    a, _, c, ref = res
    # each repeat pairs 4 rounds with the reference's samples of the same rounds
    assert a.n == c.n == 8 and len(a.reference_ms) == len(c.reference_ms) == 8
    assert a.ratio > 0 and a.noise >= 0 and dev.reference_error is None
    assert not ref.has_reference and ref.n >= 8  # the reference itself: pooled over the groups


@pytest.mark.slow
def test_a_failing_reference_measures_the_rest_without_it(dev):
    cands = [conv("a", 3, 8, 8), Candidate("bad", TinyEmbedding(), torch.zeros(64, dtype=torch.long)),
             conv("c", 8, 8, 8)]
    res = dev.measure(cands, MeasureConfig(warmup=1, iterations=3, reference="bad"))
    assert [r.ok for r in res] == [True, False, True]
    assert all(not r.has_reference and r.n == 3 for r in (res[0], res[2]))
    assert "drift reference 'bad' failed" in dev.reference_error and "\n" not in dev.reference_error
