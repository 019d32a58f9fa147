"""`amc-mobile devices` and `amc-mobile device-info URI`."""

from __future__ import annotations

import argparse

from amc_mobile.cli.common import dump_json


def register(sub) -> None:
    p = sub.add_parser("devices", help="list the devices that are reachable")
    p.add_argument("--json", action="store_true", help='print [{"uri": ..., "description": ...}, ...]')
    p.set_defaults(func=run_devices)
    q = sub.add_parser("device-info", help="print everything known about one device")
    q.add_argument("uri", help="device URI, e.g. local, cuda:0, adb:SERIAL, adb-tcp:HOST:PORT, "
                              "adb-server:HOST:PORT/SERIAL")
    q.set_defaults(func=run_info)


def run_devices(args: argparse.Namespace) -> int:
    from device import discover

    found = discover()
    if args.json:
        print(dump_json([{"uri": uri, "description": desc} for uri, desc in found]))
        return 0
    width = max([len(u) for u, _ in found] + [10])
    for uri, desc in found:
        print(f"{uri:{width}s}  {desc}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from device import open_device

    with open_device(args.uri) as dev:
        print(dump_json(dev.info()))
    return 0
