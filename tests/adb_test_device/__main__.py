"""Serve a fake phone on loopback until Ctrl-C, to try the adb bridge without a phone:

    cd tests && ../.venv/bin/python -m adb_test_device /tmp/phone [--port 5555]
    # prints adb-tcp:127.0.0.1:PORT; in another shell:
    .venv/bin/amc-mobile compare ORIGINAL PRUNED --devices local adb-tcp:127.0.0.1:PORT

The phone reports ABI x86_64, so the bridge pushes the host build of et_bench (build/host/et_bench),
and accepts a new host key the first time (like tapping "Always allow"). Cool thermal zones.
"""

from __future__ import annotations

import argparse
import signal
import threading

from .server import AdbTestDevice

COOL = [("cpu-0-0", 38_000), ("cpu-1-0", 39_000), ("cpu-2-0", 40_000), ("gpu", 37_000), ("battery", 31_000)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sandbox", help="folder for the phone's filesystem (created)")
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: any free one)")
    ap.add_argument("--abi", default="x86_64", help="ro.product.cpu.abi (default x86_64: the host runner)")
    args = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with AdbTestDevice(args.sandbox, port=args.port, accept_new_keys=True, thermal_zones=COOL,
                       props={"ro.product.cpu.abi": args.abi}) as dev:
        print(f"adb-tcp:127.0.0.1:{dev.port}", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
