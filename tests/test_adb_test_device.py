"""The ADB test device (tests/adb_test_device/): a fake phone that speaks the real ADB protocol.

Three clients talk to it: adb-shell (what our bridge uses), a raw-socket client written here (to pin
down wire details adb-shell never exercises: version 0x01000001 without checksums, shell v2), and
Google's own adb (slow; proves the fake is faithful).
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import struct
import threading
import time

import pytest

pytest.importorskip("cryptography", reason="the ADB test phone signs with cryptography: pip install -e '.[dev]'")

from adb_shell import exceptions as adb_exc
from adb_shell.adb_device import AdbDeviceTcp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, utils

from conftest_adb import *  # noqa: F401,F403  (fixtures; tests/conftest.py imports them too)
from conftest_adb import make_adb_key

try:
    from adb_test_device import AdbTestDevice, protocol as P
    from adb_test_device.sandbox import OutputRewriter
    from adb_test_device.server import _hang_rewrite
except ImportError:  # tests/ imported as a package
    from tests.adb_test_device import AdbTestDevice, protocol as P
    from tests.adb_test_device.sandbox import OutputRewriter
    from tests.adb_test_device.server import _hang_rewrite

# Errors adb-shell raises when the transport goes away under it.
CONNECTION_ERRORS = (adb_exc.AdbTimeoutError, adb_exc.TcpTimeoutException, adb_exc.InvalidResponseError,
                     adb_exc.InvalidCommandError, ConnectionError, OSError)


def _client(dev, key=None, timeout=3.0, connect=True, **connect_kw):
    c = AdbDeviceTcp(dev.host, dev.port, default_transport_timeout_s=timeout)
    if connect:
        connect_kw.setdefault("auth_timeout_s", timeout)
        connect_kw.setdefault("read_timeout_s", timeout)
        c.connect(rsa_keys=[(key or dev.key).signer()], **connect_kw)
    return c


# -- adb-shell: connect, shell ---------------------------------------------------------------------


def test_connect_with_auth_and_shell_echo(adb_test_device):
    c = adb_test_device.connect()
    assert c.available
    assert c.shell("echo hi") == "hi\n"
    assert adb_test_device.auth_log == ["signature-ok"]
    assert [r.command for r in adb_test_device.commands] == ["echo hi"]
    c.close()


def test_shell_v1_merges_stderr_and_reports_status_in_band(adb_test_device):
    c = adb_test_device.connect()
    out = c.shell("echo out; echo err >&2; sh -c 'exit 3'; echo rc=$?")
    assert out == "out\nerr\nrc=3\n"
    # the exit status is recorded on the device side too, once the process is reaped
    c.shell("exit 5")
    deadline = time.monotonic() + 3
    while adb_test_device.commands[-1].exit_code is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert adb_test_device.commands[-1].exit_code == 5


def test_shell_v2_framing_separates_streams_and_carries_exit_code(adb_test_device):
    c = adb_test_device.connect()
    raw = c._service(b"shell,v2,raw", b"echo out; echo err >&2; exit 7", decode=False)
    packets, i = [], 0
    while i < len(raw):
        kind, length = struct.unpack_from("<BI", raw, i)
        packets.append((kind, raw[i + 5:i + 5 + length]))
        i += 5 + length
    stdout = b"".join(d for k, d in packets if k == P.SHELL_STDOUT)
    stderr = b"".join(d for k, d in packets if k == P.SHELL_STDERR)
    assert (stdout, stderr) == (b"out\n", b"err\n")
    assert packets[-1] == (P.SHELL_EXIT, bytes([7]))
    assert _v2(c, "kill -9 $$")[2] == 128 + 9  # killed by a signal: 128 + signal, as adbd reports


def test_exec_service_is_raw(adb_test_device):
    c = adb_test_device.connect()
    assert c.exec_out("echo a; echo b >&2") == "a\nb\n"


def test_shell_sees_phone_paths_and_output_is_translated_back(adb_test_device):
    c = adb_test_device.connect()
    c.push(io.BytesIO(b"x"), "/data/local/tmp/dir/a.txt")
    assert adb_test_device.phone_path("/data/local/tmp/dir/a.txt").read_bytes() == b"x"
    assert c.shell("ls /data/local/tmp/dir") == "a.txt\n"
    assert c.shell("find /data/local/tmp/dir -name a.txt") == "/data/local/tmp/dir/a.txt\n"
    assert c.shell("cd /data/local/tmp/dir && pwd && cat a.txt") == "/data/local/tmp/dir\nx"
    assert c.shell("cat /data/local/tmp/dir/missing 2>&1; echo rc=$?") == (
        "cat: /data/local/tmp/dir/missing: No such file or directory\nrc=1\n")
    # host paths stay host paths
    assert c.shell("test -d /proc/self && echo proc-ok") == "proc-ok\n"


def test_device_properties_sysfs_and_battery(adb_test_device_factory):
    dev = adb_test_device_factory(props={"ro.soc.model": "SM8650", "ro.product.model": "Pixel Sim"})
    c = dev.connect()
    assert c.shell("getprop ro.product.model") == "Pixel Sim\n"
    assert c.shell("getprop ro.soc.model") == "SM8650\n"
    assert c.shell("getprop ro.board.platform") == "amcsim\n"
    assert c.shell("getprop ro.build.version.release") == "14\n"
    assert c.shell("getprop ro.product.cpu.abi") == "arm64-v8a\n"
    assert c.shell("getprop no.such.prop") == "\n"
    assert c.shell("getprop no.such.prop fallback") == "fallback\n"
    assert "[ro.soc.model]: [SM8650]" in c.shell("getprop")
    freqs = c.shell("cat /sys/devices/system/cpu/cpu*/cpufreq/cpuinfo_max_freq").split()
    assert freqs == ["1800000"] * 4 + ["2400000"] * 3 + ["3000000"]
    assert c.shell("cat /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor").split() == ["schedutil"] * 8
    assert c.shell("cat /sys/devices/system/cpu/possible") == "0-7\n"
    types = c.shell("cat /sys/class/thermal/thermal_zone*/type").split()
    temps = [int(t) for t in c.shell("cat /sys/class/thermal/thermal_zone*/temp").split()]
    assert len(types) == len(temps) >= 4 and all(20_000 < t < 60_000 for t in temps)
    dev.set_temperature(types[0], 71_500)
    assert c.shell("cat /sys/class/thermal/thermal_zone0/temp") == "71500\n"
    # cpufreq is per policy, as on a phone: cpu0-3 share policy0
    c.shell("echo performance > /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    assert c.shell("cat /sys/devices/system/cpu/cpu3/cpufreq/scaling_governor") == "performance\n"
    assert c.shell("cat /sys/devices/system/cpu/cpu4/cpufreq/scaling_governor") == "schedutil\n"
    battery = c.shell("dumpsys battery")
    assert battery.startswith("Current Battery Service state:\n") and "  level: 87\n" in battery
    dev.set_battery(level=12)
    assert "  level: 12\n" in c.shell("dumpsys battery")
    dev.set_prop("ro.soc.model", "X1")
    assert c.shell("getprop ro.soc.model") == "X1\n"


def test_phone_tools_exist(adb_test_device):
    c = adb_test_device.connect()
    # the phone has 8 CPUs and the host fewer: taskset folds the mask onto the host's CPUs
    assert c.shell("taskset 80 sh -c 'echo pinned'; echo rc=$?") == "pinned\nrc=0\n"
    assert c.shell("taskset -c 4-7 sh -c 'echo pinned'") == "pinned\n"
    c.push(io.BytesIO(b"abc"), "/data/local/tmp/h")
    assert c.shell("sha256sum /data/local/tmp/h") == f"{hashlib.sha256(b'abc').hexdigest()}  /data/local/tmp/h\n"
    assert c.shell("md5sum /data/local/tmp/h").split()[0] == hashlib.md5(b"abc").hexdigest()
    assert c.shell("mkdir -p /data/local/tmp/d/e && chmod 700 /data/local/tmp/d && rm /data/local/tmp/h "
                   "&& ls /data/local/tmp") == "d\n"


# -- adb-shell: sync -------------------------------------------------------------------------------


def test_push_pull_stat_list(adb_test_device, tmp_path):
    c = adb_test_device.connect()
    payload = os.urandom(100_003)
    src = tmp_path / "in.bin"
    src.write_bytes(payload)
    c.push(str(src), "/data/local/tmp/new/dir/f.bin", mtime=1_600_000_000)  # parents are created
    mode, size, mtime = c.stat("/data/local/tmp/new/dir/f.bin")
    assert stat.S_ISREG(mode) and size == len(payload) and mtime == 1_600_000_000
    assert c.stat("/data/local/tmp/absent") == (0, 0, 0)
    names = {bytes(f.filename).decode(): f for f in c.list("/data/local/tmp/new/dir")}
    assert set(names) == {".", "..", "f.bin"}
    assert names["f.bin"].size == len(payload) and stat.S_ISREG(names["f.bin"].mode)
    assert stat.S_ISDIR(names["."].mode)
    dst = tmp_path / "out.bin"
    c.pull("/data/local/tmp/new/dir/f.bin", str(dst))
    assert dst.read_bytes() == payload
    with pytest.raises(adb_exc.AdbCommandFailureException, match="No such file"):
        c.pull("/data/local/tmp/absent", str(tmp_path / "never"))


def test_push_5mb_is_chunked_and_intact(adb_test_device, tmp_path):
    c = adb_test_device.connect()
    payload = os.urandom(5 * 1024 * 1024 + 17)
    src = tmp_path / "big.bin"
    src.write_bytes(payload)
    before = adb_test_device.stats["wrte_in"]
    c.push(str(src), "/data/local/tmp/big.bin")
    assert adb_test_device.stats["wrte_in"] - before >= 5  # maxdata is 1 MiB: several WRTEs
    assert adb_test_device.stats["max_payload_in"] <= adb_test_device.device.maxdata
    assert c.shell("sha256sum /data/local/tmp/big.bin").split()[0] == hashlib.sha256(payload).hexdigest()
    out = io.BytesIO()
    c.pull("/data/local/tmp/big.bin", out)
    assert out.getvalue() == payload


def test_small_maxdata_is_respected_both_ways(adb_test_device_factory, tmp_path):
    dev = adb_test_device_factory(maxdata=4096)
    c = dev.connect()
    payload = os.urandom(300_000)
    c.push(io.BytesIO(payload), "/data/local/tmp/m.bin")
    out = io.BytesIO()
    c.pull("/data/local/tmp/m.bin", out)
    assert out.getvalue() == payload
    assert c.shell("head -c 20000 /dev/zero | tr '\\0' a") == "a" * 20000
    assert dev.stats["max_payload_out"] <= 4096 and dev.stats["max_payload_in"] <= 4096


def test_pushed_executable_runs(adb_test_device):
    c = adb_test_device.connect()
    script = b"#!/bin/sh\necho \"runner says $1\"\nexit 0\n"  # the host kernel reads shebangs
    c.push(io.BytesIO(script), "/data/local/tmp/amc_mobile/hello.sh", st_mode=stat.S_IFREG | 0o755)
    mode, _, _ = c.stat("/data/local/tmp/amc_mobile/hello.sh")
    assert mode & 0o111 == 0o111
    assert c.shell("/data/local/tmp/amc_mobile/hello.sh hi") == "runner says hi\n"
    assert c.shell("cd /data/local/tmp/amc_mobile && ./hello.sh there") == "runner says there\n"
    # without the exec bit it does not run, as on a phone
    c.push(io.BytesIO(script), "/data/local/tmp/amc_mobile/noexec.sh", st_mode=stat.S_IFREG | 0o644)
    assert "Permission denied" in c.shell("/data/local/tmp/amc_mobile/noexec.sh 2>&1")


def _v2(client, command: str) -> tuple[bytes, bytes, int]:
    """Run `command` through shell v2 with adb-shell's raw service call: (stdout, stderr, exit code)."""
    raw = client._service(b"shell,v2,raw", command.encode(), decode=False)
    out, err, code, i = b"", b"", None, 0
    while i < len(raw):
        kind, length = struct.unpack_from("<BI", raw, i)
        data = raw[i + 5:i + 5 + length]
        i += 5 + length
        if kind == P.SHELL_STDOUT:
            out += data
        elif kind == P.SHELL_STDERR:
            err += data
        elif kind == P.SHELL_EXIT:
            code = data[0]
    return out, err, code


def test_host_built_runner_pushed_like_the_bridge_runs(adb_test_device, et_bench):
    c = adb_test_device.connect(timeout_s=20)
    c.push(str(et_bench), "/data/local/tmp/amc_mobile/et_bench", st_mode=stat.S_IFREG | 0o755)
    out, err, code = _v2(c, "/data/local/tmp/amc_mobile/et_bench --model_path /data/local/tmp/amc_mobile/missing.pte")
    # ARCHITECTURE.md: a missing model file is exit code 2 with one line on stderr
    assert (code, out) == (2, b""), err
    assert err.count(b"\n") == 1


def test_install_runner_helper(adb_test_device, tmp_path):
    fake = tmp_path / "et_bench"
    fake.write_text('#!/bin/sh\necho \'{"methods": ["forward"]}\'\n')
    target = adb_test_device.install_runner(fake)
    assert target == adb_test_device.sandbox / "data/local/tmp/amc_mobile/et_bench"
    c = adb_test_device.connect()
    assert c.shell("/data/local/tmp/amc_mobile/et_bench --list") == '{"methods": ["forward"]}\n'
    with pytest.raises(FileNotFoundError, match="make runner"):
        adb_test_device.install_runner(tmp_path / "not-built")


# -- auth ------------------------------------------------------------------------------------------


def test_unknown_key_is_refused_without_hanging(adb_test_device_factory, tmp_path):
    dev = adb_test_device_factory()
    stranger = make_adb_key(tmp_path / "stranger")
    t0 = time.monotonic()
    with pytest.raises((adb_exc.TcpTimeoutException, adb_exc.AdbTimeoutError)):
        _client(dev, key=stranger, timeout=1.0)
    assert time.monotonic() - t0 < 5
    assert dev.auth_log == ["signature-bad", "pubkey-rejected"]
    assert [k.comment for k in dev.rejected_keys] == [stranger.public_key.split(" ", 1)[1].strip()]
    assert not dev.commands
    _client(dev).shell("true")  # the authorised key still works


def test_unknown_key_can_be_hung_up_on(adb_test_device_factory, tmp_path):
    dev = adb_test_device_factory(on_unknown_key="close")
    stranger = make_adb_key(tmp_path / "stranger")
    t0 = time.monotonic()
    with pytest.raises(CONNECTION_ERRORS):
        _client(dev, key=stranger, timeout=1.0)
    assert time.monotonic() - t0 < 5
    assert dev.auth_log[-1] == "pubkey-rejected"


def test_no_keys_at_all_is_a_clear_error(adb_test_device):
    c = AdbDeviceTcp(adb_test_device.host, adb_test_device.port, default_transport_timeout_s=2)
    with pytest.raises(adb_exc.DeviceAuthError):
        c.connect(rsa_keys=[], auth_timeout_s=1, read_timeout_s=2)


def test_accept_new_keys_then_signature_works(adb_test_device_factory, tmp_path):
    dev = adb_test_device_factory(authorized_keys=[], accept_new_keys=True)
    assert dev.authorized_keys == []
    assert _client(dev).shell("echo first") == "first\n"
    assert dev.auth_log == ["signature-bad", "pubkey-accepted"]
    assert len(dev.authorized_keys) == 1
    assert dev.phone_path("/data/misc/adb/adb_keys").read_text().split()[0] == dev.key.public_key.split()[0]
    assert _client(dev).shell("echo second") == "second\n"
    assert dev.auth_log[-1] == "signature-ok"


def test_no_auth_mode(adb_test_device_factory):
    dev = adb_test_device_factory(auth_required=False, authorized_keys=[])
    c = AdbDeviceTcp(dev.host, dev.port, default_transport_timeout_s=2)
    assert c.connect(rsa_keys=None, read_timeout_s=2)
    assert c.shell("echo open") == "open\n"


# -- faults ----------------------------------------------------------------------------------------


def test_connection_dropped_mid_push_is_an_error(adb_test_device, tmp_path):
    adb_test_device.set_faults(drop_push_after_bytes=200_000)
    c = adb_test_device.connect(timeout_s=2)
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(2 * 1024 * 1024))
    t0 = time.monotonic()
    with pytest.raises(CONNECTION_ERRORS):
        c.push(str(src), "/data/local/tmp/partial.bin", read_timeout_s=2)
    assert time.monotonic() - t0 < 6
    # adbd deletes what it had written of a failed push
    assert not adb_test_device.phone_path("/data/local/tmp/partial.bin").exists()
    assert adb_test_device.faults.drop_push_after_bytes is None  # one-shot
    c2 = adb_test_device.connect()
    c2.push(str(src), "/data/local/tmp/partial.bin")
    assert adb_test_device.phone_path("/data/local/tmp/partial.bin").read_bytes() == src.read_bytes()


def test_connection_dropped_after_kth_shell_command(adb_test_device):
    adb_test_device.set_faults(drop_after_shell_commands=2)
    c = adb_test_device.connect(timeout_s=2)
    assert c.shell("echo one") == "one\n"
    assert c.shell("echo two") == "two\n"  # the K-th command completes...
    with pytest.raises(CONNECTION_ERRORS):  # ...then the connection is gone
        c.shell("echo three", read_timeout_s=2)
    c2 = adb_test_device.connect()
    assert c2.shell("echo four") == "four\n"
    assert [r.command for r in adb_test_device.commands] == ["echo one", "echo two", "echo four"]


def _push_fake_runner(c):
    c.push(io.BytesIO(b"#!/bin/sh\necho ran \"$@\"\n"), "/data/local/tmp/amc_mobile/fake_runner",
           st_mode=stat.S_IFREG | 0o755)


def test_hanging_runner_is_killable_by_pid(adb_test_device):
    c = adb_test_device.connect()
    _push_fake_runner(c)
    cmd = "cd /data/local/tmp/amc_mobile && echo pid=$$ && exec ./fake_runner --x 1"
    assert c.shell(cmd).splitlines()[1] == "ran --x 1"  # no fault: it just runs

    adb_test_device.set_faults(hang_program="fake_runner")
    lines: list[str] = []
    finished = threading.Event()

    def run():
        try:
            for line in _client(adb_test_device, timeout=30).streaming_shell(cmd, read_timeout_s=30):
                lines.append(line)
        finally:
            finished.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not lines and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = int("".join(lines).split("pid=")[1].split()[0])
    assert not finished.wait(1.0), f"runner did not hang: {lines}"
    c2 = adb_test_device.connect()
    assert c2.shell(f"cat /proc/{pid}/comm") == "fake_runner\n"  # same pid, same name as the runner
    assert "--x" in c2.shell(f"tr '\\0' ' ' < /proc/{pid}/cmdline")
    assert c2.shell(f"kill {pid}; echo rc=$?") == "rc=0\n"
    assert finished.wait(5), "killing the runner did not end its shell command"
    t.join(5)
    assert "ran" not in "".join(lines)
    adb_test_device.set_faults(hang_program=None)
    assert c2.shell(cmd).splitlines()[1] == "ran --x 1"


def test_missing_runner_fails_like_a_phone(adb_test_device):
    c = adb_test_device.connect()
    out = c.shell("/data/local/tmp/amc_mobile/et_bench --list 2>&1; echo rc=$?")
    assert out.endswith("rc=127\n") and "not found" in out


def test_stop_kills_processes_and_threads(adb_key, tmp_path):
    dev = AdbTestDevice(tmp_path / "phone", authorized_keys=[adb_key.public_key])
    port = dev.start()
    c = AdbDeviceTcp("127.0.0.1", port, default_transport_timeout_s=3)
    c.connect(rsa_keys=[adb_key.signer()], auth_timeout_s=3, read_timeout_s=3)
    pid = int(c.shell("sleep 300 > /dev/null 2>&1 & echo $!"))  # outlives its shell, as on a phone
    hold = threading.Thread(target=lambda: list(c.streaming_shell("echo $$; sleep 300", read_timeout_s=2)),
                            daemon=True)
    hold.start()
    time.sleep(0.3)
    assert os.path.exists(f"/proc/{pid}")
    t0 = time.monotonic()
    dev.stop()
    assert time.monotonic() - t0 < 5
    assert not any(t.name.startswith("adb-") and t.is_alive() for t in threading.enumerate())
    deadline = time.monotonic() + 3
    while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    hold.join(10)  # adb-shell notices the closed connection only after its read timeout


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_refuses_non_loopback_host(tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        AdbTestDevice(tmp_path / "phone", host="0.0.0.0")


# -- wire details with a raw client ----------------------------------------------------------------


class RawClient:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=3)
        self.buf = b""

    def send(self, command, arg0, arg1, data=b"", check=None):
        check = P.checksum(data) if check is None else check
        self.sock.sendall(struct.pack("<6I", command, arg0, arg1, len(data), check, command ^ 0xFFFFFFFF) + data)

    def recv(self):
        header = self._exact(24)
        command, arg0, arg1, length, check, magic = struct.unpack("<6I", header)
        assert magic == command ^ 0xFFFFFFFF
        return command, arg0, arg1, self._exact(length), check

    def _exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _sign(key, token):
    private = serialization.load_pem_private_key(key.path.read_bytes(), password=None)
    return private.sign(token, padding.PKCS1v15(), utils.Prehashed(hashes.SHA1()))


def test_version_0x01000001_skips_checksums(adb_test_device):
    raw = RawClient(adb_test_device.port)
    raw.send(P.A_CNXN, 0x01000001, 256 * 1024, b"host::features=shell_v2\0")
    command, arg0, _, token, _ = raw.recv()
    assert (command, arg0, len(token)) == (P.A_AUTH, P.AUTH_TOKEN, 20)
    raw.send(P.A_AUTH, P.AUTH_SIGNATURE, 0, _sign(adb_test_device.key, token), check=0)
    command, version, maxdata, banner, _ = raw.recv()
    assert command == P.A_CNXN and version == 0x01000001 and maxdata == 256 * 1024
    assert banner.startswith(b"device::") and b"ro.product.model=AMC Test Phone" in banner
    assert b"features=shell_v2,cmd,stat_v2,ls_v2,fixed_push_mkdir" in banner
    raw.send(P.A_OPEN, 7, 0, b"shell:echo skip\0", check=0)
    command, local, remote, _, _ = raw.recv()
    assert (command, remote) == (P.A_OKAY, 7)
    command, _, _, data, check = raw.recv()
    assert (command, data, check) == (P.A_WRTE, b"skip\n", 0)  # no checksum once 0x01000001
    raw.send(P.A_OKAY, 7, local, check=0)
    assert raw.recv()[:3] == (P.A_CLSE, local, 7)


def test_old_version_bad_checksum_drops_the_connection(adb_test_device):
    raw = RawClient(adb_test_device.port)
    raw.send(P.A_CNXN, 0x01000000, 4096, b"host::\0", check=12345)
    with pytest.raises((ConnectionError, socket.timeout)):
        raw.recv()


def test_bad_signature_gets_a_new_token(adb_test_device):
    raw = RawClient(adb_test_device.port)
    raw.send(P.A_CNXN, 0x01000000, 4096, b"host::\0")
    _, _, _, token1, check = raw.recv()
    assert check == P.checksum(token1)  # old version: checksummed
    raw.send(P.A_AUTH, P.AUTH_SIGNATURE, 0, b"\0" * 256)
    command, arg0, _, token2, _ = raw.recv()
    assert (command, arg0) == (P.A_AUTH, P.AUTH_TOKEN) and token2 != token1


# -- framing under load: partial reads, concurrent writers, descriptor reuse --------------------------


def _online(port: int, maxdata: int = 4096) -> RawClient:
    """A raw client past CNXN on a device without auth (version 0x01000000: checksummed)."""
    raw = RawClient(port)
    raw.send(P.A_CNXN, 0x01000000, maxdata, b"host::\0")
    command, _, _, banner, _ = raw.recv()
    assert command == P.A_CNXN and banner.startswith(b"device::")
    return raw


def test_messages_dribbled_in_tiny_segments_are_reassembled(adb_test_device_factory):
    """Every message split into 1-5 byte TCP segments with pauses (header split too): the device must
    wait for exactly 24 header bytes, then the payload, and never act on a partial read."""
    dev = adb_test_device_factory(auth_required=False, authorized_keys=[])
    raw = RawClient(dev.port)
    raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def dribble(command, arg0, arg1, data=b""):
        packet = P.pack(command, arg0, arg1, data)
        i, step = 0, 1
        while i < len(packet):
            raw.sock.sendall(packet[i:i + step])
            i += step
            step = step % 5 + 1
            time.sleep(0.002)

    dribble(P.A_CNXN, 0x01000000, 4096, b"host::features=shell_v2\0")
    command, version, _, banner, _ = raw.recv()
    assert command == P.A_CNXN and version == 0x01000000 and banner.startswith(b"device::")
    dribble(P.A_OPEN, 5, 0, b"shell:cat\0")
    command, local, remote, _, _ = raw.recv()
    assert (command, remote) == (P.A_OKAY, 5)
    payload = bytes(range(256)) * 4  # every byte value, so a shifted frame would show
    dribble(P.A_WRTE, 5, local, payload)
    echoed = b""
    while len(echoed) < len(payload):
        command, arg0, arg1, data, _ = raw.recv()
        if command == P.A_OKAY:  # the device acknowledging our WRTE
            continue
        assert (command, arg0, arg1) == (P.A_WRTE, local, 5)
        echoed += data
        dribble(P.A_OKAY, 5, local)
    assert echoed == payload
    dribble(P.A_CLSE, 5, local)
    assert dev.device.stats["wrte_in"] == 1


def test_concurrent_streams_never_interleave_messages(adb_test_device_factory):
    """Eight shell streams on one connection write at once (small maxdata: many WRTEs from eight
    threads) while the client writes its OKAYs from eight threads too: every header must be whole and
    every stream's bytes must arrive complete and unmixed."""
    dev = adb_test_device_factory(auth_required=False, authorized_keys=[], maxdata=4096)
    raw = _online(dev.port, maxdata=4096)
    n, size = 8, 60_000
    letters = "abcdefgh"
    send_lock = threading.Lock()

    def send(*args):
        with send_lock:
            raw.send(*args)

    for i in range(n):
        send(P.A_OPEN, 100 + i, 0, f"shell:head -c {size} /dev/zero | tr '\\0' {letters[i]}\0".encode())
    local_of: dict[int, int] = {}
    got = {100 + i: bytearray() for i in range(n)}
    closed: set[int] = set()
    acks: list[threading.Thread] = []
    while len(closed) < n:
        command, arg0, arg1, data, _ = raw.recv()  # asserts the magic of every header
        if command == P.A_OKAY:
            local_of[arg1] = arg0
        elif command == P.A_WRTE:
            assert local_of[arg1] == arg0
            got[arg1] += data
            t = threading.Thread(target=send, args=(P.A_OKAY, arg1, arg0))
            t.start()
            acks.append(t)
        elif command == P.A_CLSE:
            closed.add(arg1)
            send(P.A_CLSE, arg1, arg0)
        else:
            raise AssertionError(f"unexpected {P.name_of(command)}")
    for t in acks:
        t.join()
    for i in range(n):
        assert bytes(got[100 + i]) == letters[i].encode() * size, i
    assert dev.device.stats["wrte_out"] >= n * size // 4096


def test_a_late_wake_up_never_writes_into_a_reused_descriptor(adb_test_device_factory):
    """The bug behind 'xCNX...': a shell's close hook ran after the shell had finished and closed its
    wake-up pipe (the host's CLSE answering the device's comes later) and wrote b"x" to that number,
    by then another socket's: a stray byte in front of the next connection's CNXN."""
    dev = adb_test_device_factory(auth_required=False, authorized_keys=[])
    for _ in range(3):
        raw = _online(dev.port)
        raw.send(P.A_OPEN, 1, 0, b"shell:echo hi\0")
        command, local, _, _, _ = raw.recv()
        assert command == P.A_OKAY
        while True:
            command, _, _, _, _ = raw.recv()
            if command == P.A_WRTE:
                raw.send(P.A_OKAY, 1, local)
            elif command == P.A_CLSE:
                break
        time.sleep(0.3)  # the shell service has finished and closed its descriptors
        others = [RawClient(dev.port) for _ in range(8)]  # these take the freed descriptor numbers
        raw.send(P.A_CLSE, 1, local)  # -> the close hook runs now
        time.sleep(0.2)
        for other in others:
            other.send(P.A_CNXN, 0x01000000, 4096, b"host::\0")
            assert other.recv()[0] == P.A_CNXN
            other.sock.close()
        raw.sock.close()


def test_unknown_service_is_refused(adb_test_device):
    c = adb_test_device.connect(timeout_s=1)
    with pytest.raises((adb_exc.AdbTimeoutError, adb_exc.TcpTimeoutException)):  # no OKAY ever comes
        c._service(b"jdwp", b"", read_timeout_s=1)


# -- pure helpers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [
        ("cat /data/local/tmp/x", "cat R/data/local/tmp/x"),
        ("cd /data/local/tmp&&./b --model_path=/data/local/tmp/m.pte", "cd R/data/local/tmp&&./b --model_path=R/data/local/tmp/m.pte"),
        ("cat /sys/class/thermal/thermal_zone*/temp", "cat R/sys/class/thermal/thermal_zone*/temp"),
        ("ls /proc/1 /dev/null /tmp /bin/sh", "ls /proc/1 /dev/null /tmp /bin/sh"),
        ("echo $HOME/data ./data a/data ~/data", "echo $HOME/data ./data a/data ~/data"),
        ("sh -c 'cat \"/data/x\"' >/sdcard/o", "sh -c 'cat \"R/data/x\"' >R/sdcard/o"),
        ("echo /database /data", "echo /database R/data"),
    ],
)
def test_translate_command(tmp_path, command, expected):
    dev = AdbTestDevice(tmp_path / "phone")
    assert dev.sandbox.translate_command(command) == expected.replace("R", dev.sandbox.root)


@pytest.mark.parametrize(
    "command, expected",
    [
        ("./et_bench --list", "S --list"),
        ("cd /d && /d/et_bench --x 1 > o 2>&1 &", "cd /d && S --x 1 > o 2>&1 &"),
        ("echo $$; exec ./et_bench", "echo $$; exec S"),
        ("taskset 80 /d/et_bench", "taskset 80 S"),
        ("sh -c './et_bench -a'", "sh -c 'S -a'"),
        ("LD_LIBRARY_PATH=/d /d/et_bench", "LD_LIBRARY_PATH=/d S"),
        ("sha256sum /d/et_bench; ls /d/et_bench; chmod 755 ./et_bench", None),
        ("pidof et_bench || kill $(pidof et_bench)", None),
        ("./et_bench_old", None),
    ],
)
def test_hang_rewrite(command, expected):
    assert _hang_rewrite(command, "et_bench", "S") == (command if expected is None else expected)


def test_output_rewriter_handles_split_prefix():
    rw = OutputRewriter(b"/tmp/sbx")
    stream = [b"a /tm", b"p/sb", b"x/data/x\n/tmp/sbx", b"\n/tmp/sbx2 /tmp/sbx"]
    out = b"".join(rw.feed(chunk) for chunk in stream) + rw.flush()
    assert out == b"a /data/x\n/\n/tmp/sbx2 /"


# -- Google's adb client ---------------------------------------------------------------------------


@pytest.mark.slow
def test_google_adb_connect_push_shell_pull(adb_test_device, google_adb, tmp_path):
    adb, serial = google_adb, adb_test_device.serial
    out = adb.run("connect", serial, text=True, timeout=30)
    assert f"connected to {serial}" in out.stdout, (out, adb.log_tail())
    adb.run("-s", serial, "wait-for-device", timeout=20, check=True)
    devices = adb.run("devices", "-l", text=True, check=True).stdout
    assert f"{serial}" in devices and "device product:amcsim model:AMC_Test_Phone device:amcsim" in devices

    payload = os.urandom(3 * 1024 * 1024 + 11)
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    adb.run("-s", serial, "push", str(src), "/data/local/tmp/g/payload.bin", check=True, timeout=60)
    assert adb_test_device.phone_path("/data/local/tmp/g/payload.bin").read_bytes() == payload

    cat = adb.run("-s", serial, "shell", "cat", "/data/local/tmp/g/payload.bin", check=True, timeout=60)
    assert cat.stdout == payload  # shell v2 carries binary stdout untouched

    dst = tmp_path / "back.bin"
    adb.run("-s", serial, "pull", "/data/local/tmp/g/payload.bin", str(dst), check=True, timeout=60)
    assert dst.read_bytes() == payload

    r = adb.run("-s", serial, "shell", "echo hi; echo oops >&2; exit 3", text=True)
    assert (r.returncode, r.stdout, r.stderr) == (3, "hi\n", "oops\n")
    assert adb.run("-s", serial, "shell", "getprop", "ro.product.model", text=True).stdout == "AMC Test Phone\n"
    # push keeps the exec bit; the pushed program runs
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho \"from $0\"\n")  # shebangs are read by the host kernel
    script.chmod(0o755)
    adb.run("-s", serial, "push", str(script), "/data/local/tmp/g/run.sh", check=True)
    assert adb.run("-s", serial, "shell", "/data/local/tmp/g/run.sh", text=True).stdout == "from /data/local/tmp/g/run.sh\n"
    assert adb_test_device.auth_log[0] == "signature-ok"
    assert all(r.service.startswith("shell,v2") for r in adb_test_device.commands)


@pytest.mark.slow
def test_google_adb_unauthorised_then_accepted(adb_test_device_factory, google_adb):
    refusing = adb_test_device_factory(authorized_keys=[])
    adb = google_adb
    adb.run("connect", refusing.serial, text=True, timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        devices = adb.run("devices", text=True).stdout
        if f"{refusing.serial}\tunauthorized" in devices:
            break
        time.sleep(0.2)
    assert f"{refusing.serial}\tunauthorized" in devices, (devices, adb.log_tail())
    r = adb.run("-s", refusing.serial, "shell", "echo no", text=True, timeout=30)
    assert r.returncode != 0 and "unauthorized" in r.stderr
    assert refusing.auth_log[:2] == ["signature-bad", "pubkey-rejected"]

    accepting = adb_test_device_factory(authorized_keys=[], accept_new_keys=True)
    adb.run("connect", accepting.serial, text=True, timeout=30)
    adb.run("-s", accepting.serial, "wait-for-device", timeout=20, check=True)
    assert adb.run("-s", accepting.serial, "shell", "echo yes", text=True, check=True).stdout == "yes\n"
    assert "pubkey-accepted" in accepting.auth_log
