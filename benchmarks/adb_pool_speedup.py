"""Sharded table build: configurations per minute with 1, 2 and 3 test phones behind Google's adb
server, and the per-configuration quantities the speed-up model needs (docs/BENCHMARKS.md).

    .venv/bin/python benchmarks/adb_pool_speedup.py [--model mobilenet_v2] [--grid 64] [--batch-size 8]
                                                    [--workers 2] [--phones 1,2,3]

Starts Google's adb server (`adb -P PORT nodaemon server`) and 3 identical ADB test devices (x86_64
ABI: the host-built build/host/et_bench is pushed and runs real lowered units), `adb connect`s
them, then builds the same coarse table (no refinement, no calibration, the default unit
measurement config) into a fresh folder with the first N phones, N from --phones, and checks
that every configuration has exactly one row and one origin. The test phones share this host's
CPUs (with each other and with lowering), so the measured speed-up is a floor; the model's inputs
come from the same runs: per configuration, runner work (from the rows: n x mean + warm-up),
phone-side time beyond it (batch wall / methods - work: pushes, polls, runner start-up) and host
lowering CPU seconds.
"""

from __future__ import annotations

import argparse
import csv
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--grid", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="lowering processes (default 2)")
    ap.add_argument("--phones", default="1,2,3")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    from adb_test_device import AdbTestDevice
    from conftest_adb import AdbServerProcess, AdbTestDeviceHandle, make_adb_key

    from device import open_device
    from amc_mobile.tables import build_table
    from latency_tables.build import UNIT_CONFIG
    from latency_tables.store import TableStore

    home = Path(tempfile.mkdtemp(prefix="amc-bench-home-"))
    os.environ["HOME"] = str(home)
    for var in ("ANDROID_USER_HOME", "ANDROID_SDK_HOME", "ANDROID_ADB_SERVER_PORT", "ADB_SERVER_SOCKET",
                "AMC_ANDROID_RUNNER"):
        os.environ.pop(var, None)
    key = make_adb_key(home)
    cool = [("cpu-0-0", 38_000), ("cpu-1-0", 39_000), ("cpu-2-0", 40_000), ("battery", 31_000)]
    phones = [AdbTestDevice(tempfile.mkdtemp(prefix="amc-bench-phone-"), authorized_keys=[key.public_key],
                            props={"ro.product.cpu.abi": "x86_64"}, thermal_zones=cool) for _ in range(3)]
    server = AdbServerProcess(key, Path(tempfile.mkdtemp(prefix="amc-bench-server-")))
    rows_out = []
    try:
        for p in phones:
            p.start()
        server.start()
        serials = [server.attach(AdbTestDeviceHandle(device=p, key=key)) for p in phones]
        uris = [f"adb-server:127.0.0.1:{server.server_port}/{s}" for s in serials]
        for n in [int(x) for x in args.phones.split(",")]:
            devs = [open_device(u) for u in uris[:n]]
            for d in devs:
                d.runner  # deploy outside the timing
            folder = Path(tempfile.mkdtemp(prefix=f"amc-bench-table-{n}-"))
            t0 = time.perf_counter()
            rep = build_table(args.model, devs if n > 1 else devs[0], grid=args.grid, coarse_step=100, refine=False,
                              calibrate=False, batch_size=args.batch_size, workers=args.workers, progress=False,
                              table_dir=folder)
            wall = time.perf_counter() - t0
            with open(folder / "units.csv", newline="") as f:
                units = list(csv.DictReader(f))
            keys = [u["key"] for u in units]
            origins = TableStore(folder).origins()
            assert len(keys) == len(set(keys)) == rep.measured and set(origins) == set(keys), "lost or duplicated"
            cfg = UNIT_CONFIG
            work = statistics.mean((int(u["n"]) * float(u["mean_ms"]) + cfg.warmup * cfg.repeats * float(u["median_ms"]))
                                   / 1e3 for u in units)
            batches = [r for d in devs for r in d.batch_reports]
            phone_s = sum(r["seconds"] for r in batches) / max(1, sum(r["methods"] for r in batches))
            rows_out.append((n, rep.measured, wall, rep.measured / wall * 60, work, phone_s - work,
                             rep.lower_s / max(1, rep.measured), dict(rep.devices) or {devs[0].uri: rep.measured}))
            for d in devs:
                d.close()
    finally:
        server.stop()
        for p in phones:
            p.stop()

    base = rows_out[0][3]
    print(f"{args.model} grid {args.grid}, coarse pass only, batch size {args.batch_size}, {args.workers} lowering "
          f"processes, MeasureConfig(warmup=20, iterations=100, min_time_ms=30, repeats=3); adb server "
          f"{server.server_port}")
    print(f"{'phones':>6s} {'configs':>7s} {'wall s':>7s} {'cfg/min':>8s} {'speed-up':>8s} {'work s/cfg':>10s} "
          f"{'phone extra s/cfg':>17s} {'lower s/cfg':>11s}  per phone")
    for n, m, wall, rate, work, extra, low, per in rows_out:
        print(f"{n:6d} {m:7d} {wall:7.1f} {rate:8.1f} {rate / base:8.2f} {work:10.3f} {extra:17.3f} {low:11.3f}  "
              + ", ".join(str(v) for v in per.values()))
    print("no row lost or duplicated in any run (rows == measured == origins, keys unique)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
