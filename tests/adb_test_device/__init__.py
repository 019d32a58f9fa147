"""amcsim: a fake Android phone that speaks the real ADB wire protocol on loopback TCP.

Test infrastructure: lets the adb bridge (``device/adb/``) run end to end without a phone, and lets
Google's own ``adb`` client talk to it (which is how we know it is faithful).

    from adb_test_device import AdbTestDevice

    with AdbTestDevice(tmp_path / "phone", authorized_keys=[pubkey_text]) as dev:
        AdbDeviceTcp("127.0.0.1", dev.port) ...        # or: adb connect 127.0.0.1:<port>

What it models
- Transport: CNXN (version 0x01000000 with byte-sum checksums, or 0x01000001 without), AUTH (token,
  signature, RSA public key), OPEN/OKAY/WRTE/CLSE with one outstanding WRTE per stream, maxdata.
- Services: ``shell:`` / ``exec:`` (raw, stdout+stderr merged), ``shell,v2,...:`` (shell protocol:
  separate stdout/stderr, exit code), ``sync:`` (STAT/STA2/LST2, LIST/LIS2, SEND, RECV, QUIT).
- A phone filesystem in the sandbox folder (see ``sandbox.py``): ``/data/local/tmp``, a fake sysfs
  (8 cores in 3 clusters, thermal zones), ``getprop``, ``dumpsys battery``, ``taskset``.
- Faults (``Faults``): drop mid-push, drop after the K-th shell command, a runner that hangs until
  killed, unauthorised keys (``on_unknown_key``), a missing runner (just don't push it).

Inspect what happened: ``commands`` (every shell/exec command, as sent and as run, with its exit
code), ``auth_log``, ``rejected_keys``, ``stats`` (largest payloads, WRTE counts).

Limits (it is a protocol fake, not an emulator; commands run on the host as the current user):
- Only the command text is path-translated. Paths inside pushed scripts are not, and shebangs are
  read by the host kernel: ``#!/system/bin/sh`` does not resolve (use ``#!/bin/sh`` or ``sh script``).
- ``/proc``, ``/dev``, ``/tmp``, ``/bin``, ``/usr``, ``/etc`` are the host's; ``cd /`` and ``ls /``
  see the host root; ``nproc`` and ``/proc/cpuinfo`` describe the host, not the 8 fake cores.
- No pty (``shell,v2,pty`` runs raw). ``root:``, ``remount:``, ``reboot:``, ``jdwp``, ``reverse:``,
  ``abb`` and other services are refused with CLSE.
- The hang fault finds the program in command position (after start, ``;``, ``&``, ``|``, ``(``,
  ``$(``, backquote, ``exec``/``nohup``/``time``/``nice``/``env``/``VAR=x``, ``taskset MASK``,
  ``timeout N``, ``sh -c '``). The stand-in has the runner's name in ``/proc/PID/comm`` (``pgrep``
  finds it) but is a Python script, so procps ``pidof`` does not.
"""

from .auth import AndroidPublicKey, load_public_keys, parse_public_key
from .sandbox import DEFAULT_CPU_CLUSTERS, DEFAULT_PROPS, DEFAULT_THERMAL_ZONES
from .server import DEFAULT_FEATURES, AdbTestDevice, CommandRecord, Faults

__all__ = [
    "AdbTestDevice",
    "AndroidPublicKey",
    "CommandRecord",
    "DEFAULT_CPU_CLUSTERS",
    "DEFAULT_FEATURES",
    "DEFAULT_PROPS",
    "DEFAULT_THERMAL_ZONES",
    "Faults",
    "load_public_keys",
    "parse_public_key",
]
