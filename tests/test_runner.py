"""et_bench, the C++ runner, run for real on .pte files lowered here; and device/runner.py around it.

The first part needs no .pte (argument errors, output parsing); the `slow` part lowers small conv
units into one multi-method .pte (once per module) and runs the built host runner on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from amc_mobile.errors import AmcError
from device import Candidate, MeasureConfig
from device.lowering import lower_to_pte
from device.runner import (
    DEFAULT_RUNNER,
    ENV_RUNNER,
    REPO_ROOT,
    build_argv,
    find_runner,
    parse_list,
    parse_output,
    parse_stats,
    run_runner,
    runner_error,
)

CONTRACT_KEYS = {"method", "iterations_us", "load_ms", "threads", "affinity", "warmup", "runtime_version"}


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def runner() -> Path:
    """The host runner; built here when missing (the same script `make runner` runs)."""
    if os.environ.get(ENV_RUNNER):
        return find_runner()
    if not DEFAULT_RUNNER.exists():
        subprocess.run(
            ["bash", str(REPO_ROOT / "android_bench" / "build_host.sh"), sys.executable, str(DEFAULT_RUNNER.parent)],
            check=True,
        )
    return find_runner()


class ConvUnit(nn.Module):
    """conv-bn-relu; named children (an nn.Sequential trips XNNPACK's FuseBatchNormPass in 1.4.1)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class TinyEmbedding(nn.Module):
    """Lowers fine; at run time et_bench feeds int inputs of 0/1 and row 1 does not exist: exit 4."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 8))

    def forward(self, idx):
        return nn.functional.embedding(idx, self.weight)


SHAPES = {"tiny": (3, 4, 8), "mid": (16, 32, 16), "big": (64, 96, 32)}  # cin, cout, hw


def conv_candidate(name: str, cin: int, cout: int, hw: int) -> Candidate:
    torch.manual_seed(0)
    return Candidate(name, ConvUnit(cin, cout), torch.randn(1, cin, hw, hw))


@pytest.fixture(scope="module")
def pte(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pte") / "three.pte"
    failed = lower_to_pte([conv_candidate(n, *s) for n, s in SHAPES.items()], path)
    assert failed == {}
    return path


@pytest.fixture(scope="module")
def pte_with_bad_method(tmp_path_factory) -> Path:
    """Methods a, bad, c: `bad` fails at execution, after `a` was measured."""
    path = tmp_path_factory.mktemp("pte") / "bad.pte"
    cands = [
        conv_candidate("a", 3, 8, 8),
        Candidate("bad", TinyEmbedding(), torch.zeros(64, dtype=torch.long)),
        conv_candidate("c", 8, 8, 8),
    ]
    assert lower_to_pte(cands, path) == {}
    return path


def run(runner: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def lines(stdout: str) -> list[dict]:
    return [json.loads(ln) for ln in stdout.splitlines() if ln.strip()]


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert err and "\n" not in err, f"want exactly one stderr line, got {proc.stderr!r}"
    assert err.startswith("et_bench: ")
    return err


# -- no .pte needed ----------------------------------------------------------------------------------


def test_missing_file(runner, tmp_path):
    missing = tmp_path / "nope.pte"
    err = assert_one_line_error(run(runner, "--model_path", missing), 2)
    assert str(missing) in err and "not found" in err


@pytest.mark.parametrize(
    "args, says",
    [
        ([], "--model_path is required"),
        (["--model_path", "x.pte", "--iterations", "0"], "--iterations"),
        (["--model_path", "x.pte", "--warmup", "-1"], "--warmup"),
        (["--model_path", "x.pte", "--threads", "two"], "--threads"),
        (["--model_path", "x.pte", "--min_time_ms", "-5"], "--min_time_ms"),
        (["--model_path", "x.pte", "--affinity", "zz"], "--affinity"),
        (["--model_path", "x.pte", "--affinity", "0"], "selects no CPU"),
        (["--model_path", "x.pte", "--bogus"], "unknown argument '--bogus'"),
        (["--model_path"], "--model_path needs a value"),
    ],
)
def test_bad_arguments(runner, args, says):
    err = assert_one_line_error(run(runner, *args), 2)
    assert says in err


def test_affinity_on_no_existing_cpu_is_a_usage_error(runner, tmp_path):
    # bit 1000: a CPU this machine does not have; checked before the file is even read
    mask = format(1 << 1000, "x")
    err = assert_one_line_error(run(runner, "--model_path", tmp_path / "x.pte", "--affinity", mask), 2)
    assert "affinity" in err


def test_help(runner):
    proc = run(runner, "--help")
    assert proc.returncode == 0 and "--model_path" in proc.stdout


def test_not_a_pte(runner, tmp_path):
    junk = tmp_path / "junk.pte"
    junk.write_bytes(os.urandom(4096))
    err = assert_one_line_error(run(runner, "--model_path", junk), 3)
    assert "junk.pte" in err


def test_build_argv_defaults_and_overrides():
    cfg = MeasureConfig(warmup=3, iterations=7, min_time_ms=12.5)
    argv = build_argv("/r/et_bench", "/m.pte", cfg, ["a", "b"])
    assert argv[0] == "/r/et_bench"
    pairs = dict(zip(argv[1::2], argv[2::2]))
    assert pairs == {
        "--model_path": "/m.pte",
        "--warmup": "3",
        "--iterations": "7",
        "--min_time_ms": "12.5",
        "--threads": "1",
        "--methods": "a,b",
    }
    argv = build_argv("et_bench", "m.pte", MeasureConfig(threads=4, affinity="f0"), None, default_threads=2)
    pairs = dict(zip(argv[1::2], argv[2::2]))
    assert pairs["--threads"] == "4" and pairs["--affinity"] == "f0" and "--methods" not in pairs
    argv = build_argv("et_bench", "m.pte", MeasureConfig(), None, default_threads=4, default_affinity="f0")
    pairs = dict(zip(argv[1::2], argv[2::2]))
    assert pairs["--threads"] == "4" and pairs["--affinity"] == "f0"
    with pytest.raises(ValueError):
        build_argv("et_bench", "m.pte", MeasureConfig(), [])
    # Names a comma-joined list cannot carry go one by one, verbatim; plain names keep --methods.
    argv = build_argv("et_bench", "m.pte", MeasureConfig(), ["a,b", "", "c"])
    assert "--methods" not in argv and argv[-6:] == ["--method", "a,b", "--method", "", "--method", "c"]


def test_an_old_runner_without_method_says_rebuild():
    err = runner_error(2, "et_bench: unknown argument '--method' (see --help)\n")
    assert "predates --method" in str(err) and "rebuild" in str(err)


def _line(method: str, us: list[float], load_ms: float = 1.5) -> str:
    return json.dumps(
        {
            "method": method,
            "iterations_us": us,
            "load_ms": load_ms,
            "threads": 1,
            "affinity": None,
            "warmup": 5,
            "runtime_version": "1.4.1",
            "pool_threads": 1,
        }
    )


def test_parse_output_to_stats():
    out = _line("a", [1000.0, 2000.0, 3000.0]) + "\n" + _line("b", [500.0]) + "\n"
    stats = parse_stats(out)
    assert list(stats) == ["a", "b"]
    assert stats["a"].samples_ms == (1.0, 2.0, 3.0) and stats["a"].median_ms == 2.0 and stats["a"].n == 3
    assert stats["a"].load_ms == 1.5 and stats["a"].ok
    recs = parse_output(out)
    assert recs[0].runtime_version == "1.4.1" and recs[0].extra == {"pool_threads": 1}


def test_parse_output_drops_a_truncated_last_line():
    full = _line("a", [1000.0]) + "\n"
    cut = _line("b", [1000.0, 2000.0])[:-9]
    assert [r.method for r in parse_output(full + cut)] == ["a"]
    assert parse_output("") == []


def test_parse_output_rejects_garbage_before_the_end():
    with pytest.raises(AmcError, match="not JSON"):
        parse_output("Segmentation fault\n" + _line("a", [1.0]) + "\n")
    with pytest.raises(AmcError, match="unexpected line"):
        parse_output('{"foo": 1}\n')
    with pytest.raises(AmcError, match="malformed"):
        parse_output('{"method": "a", "iterations_us": ["x"]}\n')


def test_parse_list():
    assert parse_list('{"methods": ["big", "mid"]}\n') == ["big", "mid"]
    with pytest.raises(AmcError):
        parse_list("")


def test_runner_error_messages():
    err = runner_error(2, "some noise\net_bench: unknown method 'x' in m.pte; it has: a,b\n")
    assert str(err) == "et_bench: unknown method 'x' in m.pte; it has: a,b" and err.returncode == 2
    assert "killed by SIGKILL" in str(runner_error(-9, ""))
    assert "exited with code 1" in str(runner_error(1, "boom"))
    assert "execution failure" in str(runner_error(4, ""))


def test_find_runner_env(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_RUNNER, str(tmp_path / "missing"))
    with pytest.raises(AmcError, match=ENV_RUNNER):
        find_runner()
    exe = tmp_path / "et_bench"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv(ENV_RUNNER, str(exe))
    assert find_runner() == exe


def test_find_runner_missing(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_RUNNER, raising=False)
    monkeypatch.setattr("device.runner.DEFAULT_RUNNER", tmp_path / "et_bench")
    with pytest.raises(AmcError) as err:
        find_runner()
    assert str(err.value) == f"et_bench runner not built: run `make runner` (or set {ENV_RUNNER})"


# -- on a real .pte ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_list(runner, pte):
    proc = run(runner, "--model_path", pte, "--list")
    assert proc.returncode == 0, proc.stderr
    assert sorted(parse_list(proc.stdout)) == sorted(SHAPES)


@pytest.mark.slow
def test_all_methods(runner, pte):
    proc = run(runner, "--model_path", pte, "--iterations", 4, "--warmup", 2)
    assert proc.returncode == 0, proc.stderr
    recs = lines(proc.stdout)
    assert sorted(r["method"] for r in recs) == sorted(SHAPES)
    for r in recs:
        assert CONTRACT_KEYS <= set(r)
        assert len(r["iterations_us"]) == 4 and all(x > 0 for x in r["iterations_us"])
        assert r["load_ms"] > 0 and r["warmup"] == 2 and r["threads"] == 1 and r["affinity"] is None
        assert r["runtime_version"] == "1.4.1"


@pytest.mark.slow
def test_defaults_warmup_5_iterations_20(runner, pte):
    proc = run(runner, "--model_path", pte, "--methods", "tiny")
    (r,) = lines(proc.stdout)
    assert r["warmup"] == 5 and len(r["iterations_us"]) == 20 and r["threads"] == 1


@pytest.mark.slow
def test_methods_by_name_in_the_order_given(runner, pte):
    proc = run(runner, "--model_path", pte, "--methods", "mid", "--iterations", 3)
    assert [r["method"] for r in lines(proc.stdout)] == ["mid"]
    proc = run(runner, "--model_path", pte, "--methods", "tiny,big", "--iterations", 3)
    assert [r["method"] for r in lines(proc.stdout)] == ["tiny", "big"]


@pytest.mark.slow
def test_unknown_method(runner, pte):
    proc = run(runner, "--model_path", pte, "--methods", "mid,nope")
    err = assert_one_line_error(proc, 2)
    assert "'nope'" in err and all(m in err for m in SHAPES)
    assert proc.stdout == ""  # names are checked before anything runs


@pytest.mark.slow
def test_corrupt_pte(runner, pte, tmp_path):
    data = pte.read_bytes()
    truncated = tmp_path / "truncated.pte"
    truncated.write_bytes(data[: len(data) // 2])
    err = assert_one_line_error(run(runner, "--model_path", truncated), 3)
    assert "truncated.pte" in err
    # flip bytes all through the program's flatbuffer (the first few KB)
    garbled = bytearray(data)
    for i in range(64, min(len(garbled), 8192), 7):
        garbled[i] ^= 0xA5
    bad = tmp_path / "garbled.pte"
    bad.write_bytes(bytes(garbled))
    assert_one_line_error(run(runner, "--model_path", bad), 3)
    # a wrong magic
    magic = bytearray(data)
    magic[4:8] = b"XX99"
    bad.write_bytes(bytes(magic))
    assert_one_line_error(run(runner, "--model_path", bad), 3)


@pytest.mark.slow
def test_threads_and_affinity_are_applied(runner, pte):
    first_cpu = min(os.sched_getaffinity(0))
    mask = format(1 << first_cpu, "x")
    proc = run(runner, "--model_path", pte, "--methods", "mid", "--iterations", 2, "--threads", 2, "--affinity", "0x" + mask)
    assert proc.returncode == 0, proc.stderr
    (r,) = lines(proc.stdout)
    assert r["threads"] == 2 and r["affinity"] == mask
    # what really applied: the pool was resized before the load, the kernel took the mask
    assert r["pool_threads"] == 2 and r["affinity_effective"] == mask
    proc = run(runner, "--model_path", pte, "--methods", "mid", "--iterations", 2, "--threads", 1)
    (r,) = lines(proc.stdout)
    assert r["pool_threads"] == 1 and r["affinity"] is None


@pytest.mark.slow
def test_iterations_and_min_time(runner, pte):
    proc = run(runner, "--model_path", pte, "--methods", "tiny", "--iterations", 7, "--warmup", 0)
    (r,) = lines(proc.stdout)
    assert len(r["iterations_us"]) == 7 and r["warmup"] == 0
    proc = run(runner, "--model_path", pte, "--methods", "mid", "--iterations", 3, "--min_time_ms", 60)
    (r,) = lines(proc.stdout)
    assert len(r["iterations_us"]) > 3
    assert sum(r["iterations_us"]) >= 60_000
    # it stops soon after: the last iteration is the one that crossed the line
    assert sum(r["iterations_us"][:-1]) < 60_000


@pytest.mark.slow
def test_bigger_conv_is_slower(runner, pte):
    proc = run(runner, "--model_path", pte, "--methods", "tiny,big", "--iterations", 10)
    stats = parse_stats(proc.stdout)
    # on the fastest sample of each: noise only adds time, so this holds unless all ten tiny runs are slowed
    # 20x, and it fails when the runner times the wrong method
    assert min(stats["big"].samples_ms) > 20 * min(stats["tiny"].samples_ms)


@pytest.mark.slow
def test_each_method_is_flushed_as_it_finishes(runner, pte):
    # big runs for >= 2 s; the line for tiny must be readable while it does.
    proc = subprocess.Popen(
        [str(runner), "--model_path", str(pte), "--methods", "tiny,big", "--iterations", "3", "--min_time_ms", "2000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        assert proc.poll() is None, "the runner should still be timing big"
        assert json.loads(first)["method"] == "tiny"
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.slow
def test_run_runner_timeout_keeps_finished_methods(runner, pte):
    cfg = MeasureConfig(warmup=0, iterations=2, min_time_ms=0)
    res = run_runner(build_argv(runner, pte, cfg, ["tiny"]), timeout_s=60)
    assert res.error is None and list(res.stats) == ["tiny"] and res.stats["tiny"].n == 2
    cfg = MeasureConfig(warmup=0, iterations=2, min_time_ms=30_000)
    res = run_runner(build_argv(runner, pte, cfg, ["big"]), timeout_s=2)
    assert res.returncode is None and res.records == []
    assert "did not finish within 2s" in str(res.error)


@pytest.mark.slow
def test_execution_failure(runner, pte_with_bad_method):
    proc = run(runner, "--model_path", pte_with_bad_method, "--iterations", 2)
    err = assert_one_line_error(proc, 4)
    assert "method bad" in err and "embedding" in err
    # the method before it was measured and printed; the one after never ran
    assert [r["method"] for r in lines(proc.stdout)] == ["a"]
    res = run_runner(build_argv(runner, pte_with_bad_method, MeasureConfig(iterations=2), ["a", "bad", "c"]), 60)
    assert res.returncode == 4 and list(res.stats) == ["a"] and "method bad" in str(res.error)


# -- interleaved rounds, drift reference, adaptive rounds (issue 19) -----------------------------------


def test_build_argv_interleaved_options():
    plain = build_argv("et_bench", "m.pte", MeasureConfig())
    assert "--interleave" not in plain and "--reference" not in plain  # unchanged for existing callers
    argv = build_argv("et_bench", "m.pte", MeasureConfig(reference="ref", group=4, seed=7, ci_target=0.02,
                                                          max_time_ms=500.0, rewarm=2), ["a"])
    i = argv.index("--interleave")
    assert argv[i + 1:i + 7] == ["--group", "4", "--seed", "7", "--rewarm", "2"]
    assert argv[argv.index("--reference") + 1] == "ref"
    assert float(argv[argv.index("--ci_target") + 1]) == 0.02
    assert float(argv[argv.index("--max_time_ms") + 1]) == 500.0


def test_parse_output_pairs_reference_samples_and_skips_the_failed_method_line():
    line = json.dumps({"method": "a", "iterations_us": [100.0, 200.0, 300.0], "load_ms": 1.0,
                       "reference_us": [50.0, 100.0, 100.0], "ci_rel": 0.5, "converged": False}) + "\n"
    out = line + '{"failed_method": "b", "error": "boom"}\n'
    (rec,) = parse_output(out)
    s = rec.to_stats()
    assert s.reference_ms == (0.05, 0.1, 0.1) and s.ratio == pytest.approx(2.0)
    assert s.ref_median_ms == pytest.approx(0.1) and s.ci_rel == 0.5 and s.converged is False
    from device.runner import failed_method

    assert failed_method(out) == ("b", "boom") and failed_method(line) is None


@pytest.mark.slow
def test_interleaved_rounds_with_reference(runner, pte):
    proc = run(runner, "--model_path", pte, "--methods", "tiny,big,mid", "--reference", "mid", "--group", "1",
               "--iterations", "4", "--warmup", "0", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    recs = lines(proc.stdout)
    # one group per method (--group 1), the selected reference last, pooled over both groups
    assert [(r["method"], r["group"]) for r in recs] == [("tiny", 0), ("big", 1), ("mid", -1)]
    for r in recs[:2]:
        assert CONTRACT_KEYS <= set(r) and r["interleaved"] and r["reference"] == "mid" and r["seed"] == 5
        assert r["rounds"] == 4 and len(r["iterations_us"]) == len(r["reference_us"]) == 4
    assert recs[2]["is_reference"] and len(recs[2]["iterations_us"]) == 8
    # the reference's samples in tiny's rounds are exactly its first 4 pooled samples
    assert recs[0]["reference_us"] == recs[2]["iterations_us"][:4]


@pytest.mark.slow
def test_interleaved_min_time_is_the_span_of_the_rounds(runner, pte):
    """In rounds, --min_time_ms is wall time spanned, which the reference fills: a tiny method next to a big
    reference stops long before its own runs add up to it (before, it ran the reference in each of them)."""
    proc = run(runner, "--model_path", pte, "--methods", "tiny", "--reference", "big", "--iterations", "3",
               "--warmup", "0", "--rewarm", "0", "--min_time_ms", "300")
    assert proc.returncode == 0, proc.stderr
    (r,) = lines(proc.stdout)
    own, with_reference = sum(r["iterations_us"]), sum(r["iterations_us"]) + sum(r["reference_us"])
    assert r["rounds"] > 3  # min_time, not --iterations, ended it
    assert own < 300_000 / 2 <= with_reference

@pytest.mark.slow
def test_interleaved_bad_numbers_are_usage_errors(runner, pte):
    proc = run(runner, "--model_path", pte, "--interleave", "--seed", "-1")
    assert_one_line_error(proc, 2)
    for flag in ("--group", "--rewarm"):
        assert "expects an integer" in assert_one_line_error(run(runner, "--model_path", pte, flag, "x"), 2)


@pytest.mark.slow
def test_ci_target_stops_at_the_time_cap_and_says_not_converged(runner, pte):
    # tiny (~2 us) against big (~1 ms): its ratio can never be pinned to +-0.01 % within 300 ms timed.
    proc = run(runner, "--model_path", pte, "--methods", "tiny", "--reference", "big", "--iterations", "6",
               "--warmup", "0", "--ci_target", "0.0001", "--max_time_ms", "300")
    assert proc.returncode == 0, proc.stderr
    (rec,) = lines(proc.stdout)
    assert rec["converged"] is False and rec["ci_rel"] > 0.0001 and rec["rounds"] >= 6
    assert sum(rec["iterations_us"]) + sum(rec["reference_us"]) >= 300_000 * 0.99


@pytest.mark.slow
def test_interleaved_failure_names_the_method(runner, pte_with_bad_method):
    proc = run(runner, "--model_path", pte_with_bad_method, "--interleave", "--iterations", "2")
    assert "method bad" in assert_one_line_error(proc, 4)
    assert json.loads(proc.stdout.splitlines()[-1])["failed_method"] == "bad"
    res = run_runner(build_argv(runner, pte_with_bad_method, MeasureConfig(iterations=2, interleave=True),
                                ["a", "bad", "c"]), 60)
    assert res.returncode == 4 and res.failed == "bad" and res.records == []


@pytest.mark.slow
def test_unknown_reference_is_a_usage_error(runner, pte):
    err = assert_one_line_error(run(runner, "--model_path", pte, "--reference", "nope"), 2)
    assert "unknown reference method 'nope'" in err
