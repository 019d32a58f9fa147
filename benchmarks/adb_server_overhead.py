"""Per-configuration overhead through Google's adb server against the direct adb-shell path, on the
same test phone, side by side and paired.

    .venv/bin/python benchmarks/adb_server_overhead.py [--n 16] [--rounds 7] [--rtt 100]

Starts the ADB test device (tests/adb_test_device, x86_64 ABI so the host-built build/host/et_bench
runs) and Google's adb server (`adb -P PORT nodaemon server`, Debian's `adb`) on free loopback ports,
`adb connect`s the phone, and opens it twice: `adb-tcp:127.0.0.1:N` (direct, one adb-shell TCP
session) and `adb-server:127.0.0.1:P/127.0.0.1:N` (our host-protocol client: one TCP connection to the
server per command, shell v2, sync SEND). Same batch as benchmarks/adb_batch_overhead.py (N conv3x3
units lowered once into one N-method .pte; MeasureConfig(warmup=2, iterations=10); thermal guard
off). Each round measures the batch on both transports back to back, order alternating; the figure
is the per-round paired difference of (wall - runner work) / N. Also paired: shell round-trips
(`true`) and a 4 MB push.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from adb_batch_overhead import CONFIG, candidates, timed, work  # noqa: E402

from device import open_device  # noqa: E402
from device.lowering import lower_to_pte  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rtt", type=int, default=100, help="paired shell round-trips (default 100)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    from adb_test_device import AdbTestDevice
    from conftest_adb import AdbServerProcess, AdbTestDeviceHandle, make_adb_key

    home = Path(tempfile.mkdtemp(prefix="amc-bench-home-"))
    os.environ.update(HOME=str(home))
    for var in ("ANDROID_USER_HOME", "ANDROID_SDK_HOME", "ANDROID_ADB_SERVER_PORT", "ADB_SERVER_SOCKET"):
        os.environ.pop(var, None)
    key = make_adb_key(home)
    phone = AdbTestDevice(tempfile.mkdtemp(prefix="amc-bench-phone-"), authorized_keys=[key.public_key],
                          props={"ro.product.cpu.abi": "x86_64"})
    phone.start()
    server = AdbServerProcess(key, Path(tempfile.mkdtemp(prefix="amc-bench-server-")))
    try:
        server.start()
        serial = server.attach(AdbTestDeviceHandle(device=phone, key=key))
        uris = {"direct": f"adb-tcp:{serial}?max_temp_c=none",
                "server": f"adb-server:127.0.0.1:{server.server_port}/{serial}?max_temp_c=none"}
        cands = candidates(args.n)
        names = [c.name for c in cands]
        with tempfile.TemporaryDirectory(prefix="amc-bench-") as tmp:
            tmp = Path(tmp)
            assert not lower_to_pte(cands, tmp / "batch.pte")
            blob = tmp / "blob.bin"
            blob.write_bytes(os.urandom(4 << 20))
            devs = {k: open_device(u) for k, u in uris.items()}
            try:
                for d in devs.values():
                    d.runner  # deploy outside the timing
                rtt = {k: [] for k in devs}
                for i in range(args.rtt):
                    for k in (("direct", "server") if i % 2 == 0 else ("server", "direct")):
                        rtt[k].append(timed(lambda: devs[k].conn.run("true"))[0])
                push = {k: [] for k in devs}
                for i in range(5):
                    for k in (("direct", "server") if i % 2 == 0 else ("server", "direct")):
                        push[k].append(timed(lambda: devs[k].conn.push(blob, "/data/local/tmp/amc_mobile/blob"))[0])

                def batch(k):
                    t, res = timed(lambda: devs[k].measure_pte(tmp / "batch.pte", names, CONFIG))
                    assert all(r.ok for r in res), [r.error for r in res if not r.ok]
                    return t, sum(work(r) for r in res)

                batch("direct"), batch("server")  # untimed warm-up
                per = {k: [] for k in devs}
                diffs = []
                for r in range(args.rounds):
                    got = {}
                    for k in (("direct", "server") if r % 2 == 0 else ("server", "direct")):
                        got[k] = batch(k)
                    for k, (t, w) in got.items():
                        per[k].append((t - w) / args.n)
                    diffs.append(per["server"][-1] - per["direct"][-1])
            finally:
                for d in devs.values():
                    d.close()
    finally:
        server.stop()
        phone.stop()

    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    print(f"phone: ADB test device {serial}; adb server: {server.exe} (Google's, `adb version` 1.0.41) on port "
          f"{server.server_port}")
    print(f"{args.n} conv3x3 units in one .pte, MeasureConfig(warmup={CONFIG.warmup}, iterations={CONFIG.iterations}); "
          f"{args.rounds} paired rounds (order alternating), medians")
    print(f"shell round-trip (`true`, {args.rtt} paired): direct {ms(rtt['direct']):.2f} ms, server "
          f"{ms(rtt['server']):.2f} ms, paired difference {ms([s - d for s, d in zip(rtt['server'], rtt['direct'])]):+.2f} ms")
    print(f"4 MiB push (5 paired): direct {ms(push['direct']):.1f} ms, server {ms(push['server']):.1f} ms")
    print(f"overhead per configuration (wall - runner work) / {args.n}: direct {ms(per['direct']):.1f} ms, server "
          f"{ms(per['server']):.1f} ms; paired difference server - direct {ms(diffs):+.2f} ms "
          f"(rounds: {', '.join(f'{d * 1e3:+.1f}' for d in diffs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
