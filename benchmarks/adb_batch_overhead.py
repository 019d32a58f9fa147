"""ADB overhead per measured configuration: one push + one run per batch of N unit configurations,
against one push + one run per configuration, side by side in one run.

    .venv/bin/python benchmarks/adb_batch_overhead.py [--n 16] [--rounds 3] [--device adb-tcp:HOST:PORT]

Without `--device` it starts the ADB test device (tests/adb_test_device: a fake phone speaking the
real ADB protocol on loopback, x86_64 ABI so the host-built build/host/et_bench stands in for the
Android runner). With `--device` it measures a real phone (needs build/android/et_bench).

The N units (conv3x3+BN+ReLU, C->C at 14x14, C = 8, 16, ...) are lowered ONCE up front, both as one
N-method .pte and as N one-method .pte files; lowering is timed and reported separately, so the
timed part is only what the adb device does per batch: thermal-guard snapshot, push, runner
invocation(s) with phone-side polling, cleanup + after-snapshot. MeasureConfig(warmup=2,
iterations=10, repeats=1); the thermal guard is off (max_temp_c=none) so no waiting is counted.
Each round times both modes back to back (the order alternates); figures are medians over rounds.
"Overhead" is wall time minus the runner's work on the methods themselves ("work": method load,
warm-up and timed runs, from the runner's own figures), i.e. ADB traffic, phone-side polling and
runner process start-up; a second line takes out the start-up (timed separately with
`et_bench --list`; a rough figure, it varies with the machine's load).

On the test device every runner invocation pays the host build's libtorch start-up (0.3-1 s,
android_bench/README.md); the Android build has none, so on a phone the per-invocation cost is
mostly ADB round-trips and the ratio is smaller.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from device import Candidate, MeasureConfig, open_device  # noqa: E402
from device.lowering import lower_to_pte  # noqa: E402

CONFIG = MeasureConfig(warmup=2, iterations=10, repeats=1)


class ConvUnit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def candidates(n: int) -> list[Candidate]:
    torch.manual_seed(0)
    return [Candidate(f"unit_c{8 * (i + 1)}", ConvUnit(8 * (i + 1)).eval(), torch.randn(1, 8 * (i + 1), 14, 14))
            for i in range(n)]


def start_test_device():
    from adb_test_device import AdbTestDevice
    from conftest_adb import make_adb_key

    home = Path(tempfile.mkdtemp(prefix="amc-bench-home-"))
    os.environ["HOME"] = str(home)
    for var in ("ANDROID_USER_HOME", "ANDROID_SDK_HOME"):
        os.environ.pop(var, None)
    key = make_adb_key(home)
    dev = AdbTestDevice(tempfile.mkdtemp(prefix="amc-bench-phone-"), authorized_keys=[key.public_key],
                        props={"ro.product.cpu.abi": "x86_64"})
    dev.start()
    return dev, f"adb-tcp:127.0.0.1:{dev.port}"


def work(s) -> float:
    """Seconds the runner spent on a method itself (load, warm-up, timed runs): the same in both modes."""
    return (sum(s.samples_ms) + (s.load_ms or 0.0) + CONFIG.warmup * s.median_ms) / 1e3


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="unit configurations per batch (default 16)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of both modes (default 3)")
    ap.add_argument("--device", default=None, help="a real phone's URI (default: the ADB test device)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    phone = None
    if args.device:
        uri = args.device
    else:
        phone, uri = start_test_device()
    uri_opts = uri + ("&" if "?" in uri else "?") + "max_temp_c=none"
    cands = candidates(args.n)
    names = [c.name for c in cands]
    with tempfile.TemporaryDirectory(prefix="amc-bench-") as tmp:
        tmp = Path(tmp)
        lower_to_pte(candidates(1), tmp / "warm.pte")  # first-use costs of the exporter, untimed
        t_batch_lower, failed = timed(lambda: lower_to_pte(cands, tmp / "batch.pte"))
        assert not failed, failed
        t0 = time.perf_counter()
        for c in cands:
            assert not lower_to_pte([c], tmp / f"{c.name}.pte")
        t_single_lower = time.perf_counter() - t0

        dev = open_device(uri_opts)
        try:
            fp = dev.fingerprint(CONFIG)
            dev.runner  # deploy once, outside the timing
            rtt = []
            for _ in range(10):
                t, _ = timed(lambda: dev.conn.run("true"))
                rtt.append(t)
            # the runner's own start-up (process, runtime, program header): `--list` of a one-method .pte
            probe = "/data/local/tmp/amc_mobile/bench_probe.pte"
            dev.conn.push(tmp / f"{names[0]}.pte", probe)
            start = []
            for _ in range(5):
                t, _ = timed(lambda: dev.conn.run(f"{dev.runner} --model_path {probe} --list", timeout_s=60))
                start.append(t)
            dev.conn.run(f"rm -f {probe}")
            startup = max(0.0, statistics.median(start) - statistics.median(rtt))

            def batched():
                c0, p0 = dev.conn.commands, dev.conn.pushes
                t, res = timed(lambda: dev.measure_pte(tmp / "batch.pte", names, CONFIG))
                assert all(r.ok for r in res), [r.error for r in res if not r.ok]
                return t, sum(work(r) for r in res), dev.conn.commands - c0, dev.conn.pushes - p0, 1

            def single():
                c0, p0 = dev.conn.commands, dev.conn.pushes
                t = compute = 0.0
                for n in names:
                    dt, res = timed(lambda: dev.measure_pte(tmp / f"{n}.pte", [n], CONFIG))
                    assert res[0].ok, res[0].error
                    t += dt
                    compute += work(res[0])
                return t, compute, dev.conn.commands - c0, dev.conn.pushes - p0, len(names)

            batched(), single()  # untimed warm-up round (page cache, first connection costs)
            rows = {"batched": [], "single": []}
            ratios = []
            for r in range(args.rounds):
                order = [("batched", batched), ("single", single)]
                if r % 2:
                    order.reverse()
                got = {name: fn() for name, fn in order}
                for name in rows:
                    rows[name].append(got[name])
                ratios.append((got["single"][0] - got["single"][1]) / (got["batched"][0] - got["batched"][1]))
        finally:
            dev.close()
            if phone is not None:
                phone.stop()

    print(f"device: {uri} ({fp.hardware}; runner threads {fp.threads}, affinity {fp.affinity})")
    print(f"{args.n} conv3x3 units, MeasureConfig(warmup={CONFIG.warmup}, iterations={CONFIG.iterations}, "
          f"repeats={CONFIG.repeats}); {args.rounds} rounds, medians")
    print(f"shell round-trip (`true`): median {statistics.median(rtt) * 1e3:.1f} ms; runner start-up "
          f"(`et_bench --list`, minus a round-trip): median {startup * 1e3:.0f} ms")
    print(f"lowering, once up front (not in the figures below): one {args.n}-method .pte {t_batch_lower:.1f} s; "
          f"{args.n} one-method .pte files {t_single_lower:.1f} s")
    print()
    print(f"{'mode':8s} {'pushes':>6s} {'runs':>5s} {'shell cmds':>10s} {'wall s':>8s} {'work s':>8s} "
          f"{'overhead s':>10s} {'ms/config':>10s}")
    per, bare = {}, {}
    for name, vals in rows.items():
        wall = statistics.median(v[0] for v in vals)
        comp = statistics.median(v[1] for v in vals)
        cmds, pushes, runs = vals[-1][2], vals[-1][3], vals[-1][4]
        per[name] = (wall - comp) / args.n
        bare[name] = max(0.0, wall - comp - runs * startup) / args.n
        print(f"{name:8s} {pushes:6d} {runs:5d} {cmds:10d} {wall:8.2f} {comp:8.3f} {wall - comp:10.2f} "
              f"{per[name] * 1e3:10.1f}")
    print()
    print(f"ADB overhead per configuration: batched {per['batched'] * 1e3:.1f} ms, single {per['single'] * 1e3:.1f} ms; "
          f"single / batched = {per['single'] / per['batched']:.1f}x (median of per-round ratios "
          f"{statistics.median(ratios):.1f}x)")
    print(f"without the runner's start-up (per invocation {startup * 1e3:.0f} ms): batched {bare['batched'] * 1e3:.1f} ms, "
          f"single {bare['single'] * 1e3:.1f} ms per configuration; single / batched = "
          f"{bare['single'] / max(bare['batched'], 1e-9):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
