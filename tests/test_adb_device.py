"""The adb device (device/adb/) against the ADB test device: a real ADB peer on loopback.

Fast tests use a fake runner (a shell script standing in for et_bench or executor_runner, chosen via
AMC_ANDROID_RUNNER / AMC_ANDROID_EXECUTOR_RUNNER) so no lowering or libtorch start-up is involved;
tests/test_adb_end_to_end.py runs the real host-built et_bench with real models.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="the ADB test phone signs with cryptography: pip install -e '.[dev]'")

from amc_mobile.errors import AmcError
from device import MeasureConfig, open_device
from device.adb import AdbConnectionLost, AdbDevice, discover
from device.adb import executor_runner as stock
from device.adb.connection import AUTH_PROMPT, TCP_PROMPT, ensure_key
from device.adb.hygiene import ThermalGuard, default_affinity_and_threads, repeat_summary
from device.adb.phone_info import (Core, ThermalZone, clusters_of, cpu_zones, cpus_to_mask, mask_to_cpus, parse_info,
                                   parse_snapshot, to_celsius)
from device.stats import LatencyStats

from conftest_adb import make_adb_key

# A stand-in for et_bench: same flags, same JSON lines. Behaviour from the file `fake_mode` next to it:
#   crash:NAME    exit 4 when reaching method NAME (after printing the methods before it)
#   usage         exit 2 at once
#   sleep:SECS    sleep before every method
#   wait:NAME     before method NAME, wait until the file `go` exists next to it
FAKE_ET_BENCH = r"""#!/bin/sh
dir=$(dirname "$0")
mode=$(cat "$dir/fake_mode" 2>/dev/null)
methods=""; threads=1; list=0; model=""
while [ $# -gt 0 ]; do
  case "$1" in
    --methods) methods="$2"; shift 2;;
    --threads) threads="$2"; shift 2;;
    --model_path) model="$2"; shift 2;;
    --list) list=1; shift;;
    --interleave) shift;;  # interleaved rounds (issue 19): the stand-in times in order, without a reference
    *) shift 2;;
  esac
done
[ -f "$model" ] || { echo "et_bench: cannot open $model" >&2; exit 2; }
if [ "$list" = 1 ]; then echo '{"methods": ["m0", "m1", "m2"]}'; exit 0; fi
case "$mode" in usage) echo "et_bench: bad arguments (fake)" >&2; exit 2;; esac
[ -n "$methods" ] || methods="m0,m1,m2"
n=$(cat "$dir/fake_count" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$dir/fake_count"
for m in $(echo "$methods" | tr ',' ' '); do
  case "$mode" in sleep:*) sleep "${mode#sleep:}";; esac
  if [ "$mode" = "wait:$m" ]; then while [ ! -f "$dir/go" ]; do sleep 0.05; done; fi
  if [ "$mode" = "crash:$m" ]; then echo "et_bench: execution of '$m' failed (fake)" >&2; exit 4; fi
  echo "{\"method\": \"$m\", \"iterations_us\": [100$n.0, 110$n.0, 120$n.0], \"load_ms\": 1.5, \"threads\": $threads, \"affinity\": null, \"warmup\": 1, \"runtime_version\": \"1.4.1\"}"
done
"""

FAKE_EXECUTOR_RUNNER = r"""#!/bin/sh
n=1; method=forward
while [ $# -gt 0 ]; do
  case "$1" in
    --num_executions) n="$2"; shift 2;;
    --method_name) method="$2"; shift 2;;
    *) shift 2;;
  esac
done
echo "I 00:00:00.000100 executorch:executor_runner.cpp:300] Using method $method" >&2
echo "I 00:00:00.000200 executorch:executor_runner.cpp:400] Model loaded in 2.500000 ms." >&2
i=1
while [ $i -le $n ]; do
  if [ $i -le 2 ]; then t=9.000000; else t=1.$i; fi
  echo "I 00:00:00.00${i}000 executorch:executor_runner.cpp:612] Iteration $i of $n: $t ms" >&2
  i=$((i+1))
done
echo "I 00:00:00.009000 executorch:executor_runner.cpp:620] Model executed successfully $n time(s) in 30.0 ms." >&2
echo "OutputX 0: tensor(sizes=[1, 10], [1., 1., ...])"
"""

COOL = [("cpu-0-0", 38_000), ("cpu-1-0", 39_000), ("cpu-2-0", 40_000), ("gpu", 37_000), ("battery", 31_000)]


@pytest.fixture
def fake_runner(tmp_path, monkeypatch):
    path = tmp_path / "fake_et_bench"
    path.write_text(FAKE_ET_BENCH)
    path.chmod(0o755)
    monkeypatch.setenv("AMC_ANDROID_RUNNER", str(path))
    return path


@pytest.fixture
def phone(adb_home, adb_test_device_factory):
    """A cool test phone (no thermal wait) with the temp HOME's key authorised."""
    return adb_test_device_factory(thermal_zones=COOL)


def _pte(tmp_path) -> Path:
    p = tmp_path / "dummy.pte"
    p.write_bytes(b"not really a program" * 10)
    return p


def _mode(phone, text: str | None) -> None:
    path = phone.phone_path("/data/local/tmp/amc_mobile/fake_mode")
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(text)


CFG = MeasureConfig(warmup=1, iterations=3, repeats=1)


# -- pure functions --------------------------------------------------------------------------------


SAMPLE_INFO = """@@props
[ro.product.manufacturer]: [Google]
[ro.product.model]: [Pixel 8]
[ro.soc.model]: [Tensor G3]
[ro.board.platform]: [zuma]
[ro.build.version.release]: [14]
[ro.build.version.sdk]: [34]
[ro.product.cpu.abi]: [arm64-v8a]
@@cpus
0|1704000|sched_pixel|1100000|1
1|1704000|sched_pixel|1100000|1
2|1704000|sched_pixel|900000|1
3|1704000|sched_pixel|900000|1
4|2367000|sched_pixel|2000000|1
5|2367000|sched_pixel|2000000|1
6|2367000|sched_pixel|2000000|1
7|2367000|sched_pixel|2000000|1
8|2914000|sched_pixel|2914000|1
@@thermal
0|BIG|51234
1|MID|47000
2|LITTLE|42000
3|battery|30500
4|soc|85
@@battery
  AC powered: false
  level: 80
  temperature: 305
@@tools
taskset
sha256sum
@@end
"""


def test_parse_info_groups_clusters_and_reads_everything():
    info = parse_info(SAMPLE_INFO)
    assert info.hardware == "Google Pixel 8 (Tensor G3)"
    assert (info.android_version, info.abi) == ("14", "arm64-v8a")
    assert [(c.name, c.cpus) for c in info.clusters] == [("little", [0, 1, 2, 3]), ("mid", [4, 5, 6, 7]), ("big", [8])]
    assert info.clusters[-1].mask == "100"
    assert info.snapshot.max_cpu_temp_c() == pytest.approx(51.234)  # BIG; "soc" (battery gauge) and battery ignored
    assert info.snapshot.battery_temp_c == pytest.approx(30.5)
    assert info.has("taskset") and not info.has("logcat")
    assert default_affinity_and_threads(info.cores) == ("100", 1)
    d = info.to_dict()
    assert d["clusters"][1] == {"name": "mid", "cpus": [4, 5, 6, 7], "max_khz": 2367000, "mask": "f0"}


def test_parse_info_rejects_a_cut_answer():
    with pytest.raises(ValueError):
        parse_info(SAMPLE_INFO.split("@@end")[0].replace("@@props", "@@cpus"))


def test_cluster_names_and_masks():
    cores = [Core(i, f, "g", f, True) for i, f in enumerate([1, 1, 2, 2, 3, 4, None])]
    names = [(c.name, c.cpus) for c in clusters_of(cores)]
    assert names == [("little", [0, 1]), ("mid1", [2, 3]), ("mid2", [4]), ("big", [5]), ("unknown", [6])]
    assert cpus_to_mask([4, 5, 6, 7]) == "f0" and mask_to_cpus("f0") == [4, 5, 6, 7]
    assert default_affinity_and_threads([]) == (None, 1)
    assert default_affinity_and_threads(cores[:4]) == ("c", 2)


@pytest.mark.parametrize("raw,want", [(46000, 46.0), (46, 46.0), (455, 45.5), (-274000, None), (None, None)])
def test_to_celsius(raw, want):
    assert to_celsius(raw) == want


def test_cpu_zones_fall_back_to_non_battery_zones():
    zones = [ThermalZone(0, "tz-a", 50.0), ThermalZone(1, "battery", 60.0), ThermalZone(2, "skin", 70.0)]
    assert [z.type for z in cpu_zones(zones)] == ["tz-a"]
    zones.append(ThermalZone(3, "cpu-1-0-usr", 44.0))
    assert [z.type for z in cpu_zones(zones)] == ["cpu-1-0-usr"]


def test_executor_runner_parser_discards_warmup():
    text = "\n".join([
        "I 00:00:00.000100 executorch:executor_runner.cpp:400] Model loaded in 3.250000 ms.",
        "I 00:00:00.000200 executorch:executor_runner.cpp:612] Iteration 1 of 5: 9.500000 ms",
        "I 00:00:00.000300 executorch:executor_runner.cpp:612] Iteration 2 of 5: 2.000000 ms",
        "some tensor output 1.0 2.0",
        "I 00:00:00.000400 executorch:executor_runner.cpp:612] Iteration 3 of 5: 1.000000 ms",
        "Iteration 4 of 5: 1.5 ms",
        "I 00:00:00.000600 executorch:executor_runner.cpp:612] Iteration 5 of 5: 1.25e0 ms",
        "I 00:00:00.000700 executorch:executor_runner.cpp:630] Model executed successfully 5 time(s) in 15.25 ms.",
    ])
    out = stock.parse_output(text)
    assert out.samples_ms == [9.5, 2.0, 1.0, 1.5, 1.25]
    assert (out.expected, out.load_ms, out.total) == (5, 3.25, (5, 15.25))
    s = out.stats("forward", warmup=2)
    assert s.samples_ms == (1.0, 1.5, 1.25) and s.median_ms == 1.25 and s.load_ms == 3.25
    argv = stock.build_argv("/r", "/m.pte", MeasureConfig(warmup=2, iterations=3), "forward", 4)
    assert argv == ["/r", "--model_path", "/m.pte", "--num_executions", "5", "--cpu_threads", "4",
                    "--method_name", "forward"]


def test_executor_runner_parser_says_why_there_is_nothing():
    with pytest.raises(AmcError, match="predates"):
        stock.parse_output("Model executed successfully 10 time(s) in 12.0 ms.").stats("f", 0)
    with pytest.raises(AmcError, match="logcat"):
        stock.parse_output("").stats("f", 0)
    assert "Loading of method" in stock.failure_reason(
        "E 00:00:00.1 executorch:executor_runner.cpp:1] Loading of method x failed with status 0x12", 134)


def test_uri_parsing():
    d = AdbDevice.from_tcp_address("10.0.0.7:5037?max_temp_c=none&thermal_timeout_s=3&runner=executor_runner")
    assert d.uri == "adb-tcp:10.0.0.7:5037" and d.guard.max_temp_c is None and d.guard.timeout_s == 3
    assert d.runner_kind == "executor_runner"
    assert AdbDevice.from_tcp_address("[::1]:6000").uri == "adb-tcp:[::1]:6000"
    assert AdbDevice.from_tcp_address("phone.local").uri == "adb-tcp:phone.local:5555"
    assert AdbDevice.from_usb_serial("R5CT1234?max_temp_c=50").guard.max_temp_c == 50
    for bad in ("1.2.3.4:5555?colour=red", "1.2.3.4:99999", "a:b:c", "1.2.3.4:5?max_temp_c=hot",
                "1.2.3.4:5?runner=tflite"):
        with pytest.raises(AmcError):
            AdbDevice.from_tcp_address(bad)
    assert isinstance(open_device("adb-tcp:127.0.0.1:1"), AdbDevice)  # no connection until used


def test_thermal_guard_waits_then_gives_up_or_proceeds():
    temps = iter([50.0, 48.0, 44.0])
    snaps = []

    def snap():
        t = next(temps)
        s = parse_snapshot(f"@@thermal\n0|cpu-0|{int(t * 1000)}\n@@end\n")
        snaps.append(t)
        return s

    slept = []
    w = ThermalGuard(45.0, timeout_s=100, poll_s=1, sleep=slept.append).wait(snap)
    assert (w.timed_out, w.start_temp_c, w.snapshot.max_cpu_temp_c()) == (False, 50.0, 44.0)
    assert slept == [1, 1]
    hot = ThermalGuard(45.0, timeout_s=0.05, poll_s=0.01).wait(
        lambda: parse_snapshot("@@thermal\n0|cpu-0|60000\n@@end\n"))
    assert hot.timed_out and hot.waited_s >= 0.05
    off = ThermalGuard(None).wait(lambda: parse_snapshot("@@thermal\n0|cpu-0|90000\n@@end\n"))
    assert not off.timed_out and off.waited_s == 0.0


def test_repeat_summary_spread():
    reps = [LatencyStats.from_samples("a", [1.0, 1.0]), LatencyStats.from_samples("a", [1.1, 1.1]),
            LatencyStats.failed("a", "x")]
    s = repeat_summary("a", reps)
    assert s["repeat_medians_ms"] == [1.0, 1.1] and s["spread_pct"] == pytest.approx(100 * 0.1 / 1.05, rel=1e-3)


# -- keys, auth, reachability ----------------------------------------------------------------------


def test_key_is_generated_0600_and_the_prompt_is_shown_once(tmp_path, monkeypatch, adb_test_device_factory, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("ANDROID_USER_HOME", raising=False)
    monkeypatch.delenv("ANDROID_SDK_HOME", raising=False)
    dev = adb_test_device_factory(authorized_keys=[], accept_new_keys=True, thermal_zones=COOL)
    d = open_device(dev.uri)
    info = d.phone_info()
    key = home / ".android" / "adbkey"
    assert key.is_file() and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (home / ".android" / "adbkey.pub").is_file()
    assert info.model == "AMC Test Phone"
    assert dev.auth_log == ["signature-bad", "pubkey-accepted"]
    err = capsys.readouterr().err
    # A TCP phone: no "USB" in what the user is told to accept.
    assert err.count("accept the debugging prompt on the phone's screen (key ~/.android/adbkey)") == 1
    assert "USB" not in err
    d.close()
    d2 = open_device(dev.uri)  # the key is now known: no prompt, signature accepted
    d2.phone_info()
    assert dev.auth_log[-1] == "signature-ok" and "accept the" not in capsys.readouterr().err
    assert ensure_key(key) == key  # an existing key is kept
    d2.close()


def test_unauthorised_key_is_a_clear_error_without_hanging(adb_home, adb_test_device_factory, tmp_path, capsys):
    dev = adb_test_device_factory(authorized_keys=[make_adb_key(tmp_path / "other").public_key])
    t0 = time.monotonic()
    with pytest.raises(AmcError, match=r"did not accept the key .* within 1s: accept the debugging prompt on the phone's screen"):
        open_device(dev.uri + "?auth_timeout_s=1").phone_info()
    assert time.monotonic() - t0 < 6
    assert AUTH_PROMPT.format(prompt=TCP_PROMPT, key="").split("(")[0] in capsys.readouterr().err
    closing = adb_test_device_factory(authorized_keys=[], on_unknown_key="close")
    with pytest.raises(AmcError, match="refused the key"):
        open_device(closing.uri + "?auth_timeout_s=5").phone_info()
    assert not dev.commands and not closing.commands


def test_unreachable_port_is_one_line(adb_home):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(AmcError) as info:
        open_device(f"adb-tcp:127.0.0.1:{port}").fingerprint()
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert "\n" not in msg and f"cannot reach adb-tcp:127.0.0.1:{port}" in msg


def test_tcp_transport_writes_whole_messages_and_reports_eof():
    """adb-shell's own bulk_write is one send() on a non-blocking socket whose count nobody checks: a
    full send buffer cut messages short and desynchronised the stream. Ours sends everything."""
    import socket

    from device.adb.connection import _tcp_transport_class

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        transport = _tcp_transport_class()("127.0.0.1", listener.getsockname()[1])
        transport.connect(5.0)  # non-blocking from here on, as in a real session
        server, _ = listener.accept()
    transport._connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = os.urandom(4_000_000)  # far more than the socket buffers take at once
    received = bytearray()

    def slow_reader():
        time.sleep(0.2)  # the peer is busy: the send buffer fills up first
        while len(received) < len(data):
            chunk = server.recv(1 << 16)
            if not chunk:
                break
            received.extend(chunk)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    try:
        assert transport.bulk_write(data, 20.0) == len(data)
        reader.join(20)
        assert bytes(received) == data
        server.sendall(b"OKAY")
        assert transport.bulk_read(24, 2.0) == b"OKAY"  # a short read is returned (the caller loops)...
        server.close()
        with pytest.raises(ConnectionResetError):  # ...and EOF is an error, not b"" forever
            transport.bulk_read(24, 2.0)
    finally:
        transport.close()
        server.close()


# -- info, fingerprint, deployment -----------------------------------------------------------------


def test_info_and_fingerprint_in_one_round_trip(phone, fake_runner):
    d = open_device(phone.uri)
    fp = d.fingerprint()
    assert len(phone.commands) == 1  # props, cpufreq, thermal, battery, tools: one shell command
    assert (fp.kind, fp.hardware, fp.runtime, fp.backend) == ("adb", "AMC AMC Test Phone (SIM8000)",
                                                              "executorch-1.4.1", "xnnpack")
    assert (fp.threads, fp.affinity) == (1, "80")  # the single 3.0 GHz core
    assert fp.extra["abi"] == "arm64-v8a" and fp.extra["android_version"] == "14"
    assert [c["cpus"] for c in fp.extra["clusters"]] == [[0, 1, 2, 3], [4, 5, 6], [7]]
    assert fp.extra["governors"] == ["schedutil"]
    fp2 = d.fingerprint(MeasureConfig(threads=3, affinity="0x70"))
    assert (fp2.threads, fp2.affinity) == (3, "70") and fp2.digest() != fp.digest()
    info = d.info()
    assert info["phone"]["battery_temp_c"] == 31.2 and info["defaults"] == {"affinity": "80", "threads": 1}
    assert info["runner"]["local"] == str(fake_runner) and info["runner"]["on_phone"] is False
    assert open_device(phone.uri + "?runner=executor_runner").fingerprint().runtime.startswith("executor_runner-")
    d.close()


def test_device_info_cli(phone, fake_runner, capsys):
    from amc_mobile.cli import main

    assert main(["device-info", phone.uri]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["phone"]["soc"] == "SIM8000" and out["fingerprint"]["kind"] == "adb"


def test_runner_is_pushed_only_when_its_hash_differs(phone, fake_runner, tmp_path):
    d = open_device(phone.uri)
    assert d.runner == "/data/local/tmp/amc_mobile/et_bench"
    on_phone = phone.phone_path("/data/local/tmp/amc_mobile/et_bench")
    assert on_phone.read_bytes() == fake_runner.read_bytes() and on_phone.stat().st_mode & 0o777 == 0o755
    pushes = d.conn.pushes
    d.close()
    d2 = open_device(phone.uri)
    d2.runner
    assert d2.conn.pushes == 0  # same sha256: nothing pushed
    d2.close()
    fake_runner.write_text(fake_runner.read_text() + "\n# changed\n")
    d3 = open_device(phone.uri)
    d3.runner
    assert d3.conn.pushes == 1 and on_phone.read_text().endswith("# changed\n")
    assert pushes == 1
    d3.close()


def test_missing_runner_says_how_to_build_it(phone, monkeypatch, tmp_path):
    monkeypatch.delenv("AMC_ANDROID_RUNNER", raising=False)
    d = open_device(phone.uri)  # the test phone reports arm64-v8a: build/android/et_bench is needed
    with pytest.raises(AmcError, match=r"no et_bench runner .*ABI arm64-v8a.*android_bench/README.md"):
        d.measure_pte(_pte(tmp_path), ["m0"], CFG)
    with pytest.raises(AmcError, match="executor_runner"):
        open_device(phone.uri + "?runner=executor_runner").runner
    monkeypatch.setenv("AMC_ANDROID_RUNNER", str(tmp_path / "nope"))
    with pytest.raises(AmcError, match="AMC_ANDROID_RUNNER=.* is not a file"):
        open_device(phone.uri).runner


# -- measuring (fake runner) -----------------------------------------------------------------------


def test_measure_pte_batch_one_push_one_run_pinned_and_cleaned(phone, fake_runner, tmp_path):
    d = open_device(phone.uri)
    d.runner  # deploy first, to count only the batch's own traffic
    n_cmd, n_push = d.conn.commands, d.conn.pushes
    ticks = []
    res = d.measure_pte(_pte(tmp_path), ["m2", "m0"], MeasureConfig(warmup=1, iterations=3, repeats=2),
                        progress=ticks.append)
    assert [r.name for r in res] == ["m2", "m0"] and all(r.ok for r in res)
    assert res[0].n == 6 and res[0].samples_ms[:3] == (1.001, 1.101, 1.201)  # repeats pooled
    assert ticks == [1, 1]
    assert d.conn.pushes - n_push == 1
    runs = [c.command for c in phone.commands if "et_bench --model_path" in c.command]
    assert len(runs) == 2 and all("taskset 80 " in c and "--methods m2,m0" in c and "--threads 1" in c for c in runs)
    assert "--affinity" not in runs[0]
    # guard snapshot, push, 2 x (launch + wait), cleanup + snapshot
    assert d.conn.commands - n_cmd == 4
    assert not list(phone.phone_path(d.session_dir).glob("*"))  # the batch folder is gone
    rep = d.last_batch_report
    assert rep["methods"] == 2 and rep["invocations"] == 2 and rep["affinity"] == "80" and rep["threads"] == 1
    assert rep["before"]["max_cpu_temp_c"] == 40.0 and rep["after"]["governors"]["7"] == "schedutil"
    assert rep["candidates"]["m0"]["repeat_medians_ms"] == [1.101, 1.102] and rep["max_spread_pct"] > 0
    assert rep["thermal"]["waited_s"] == 0 and rep["runtime_version"] == "1.4.1"
    # all methods when none are named
    assert [r.name for r in d.measure_pte(_pte(tmp_path), None, CFG)] == ["m0", "m1", "m2"]
    d.close()


def test_config_threads_and_affinity_win_over_defaults(phone, fake_runner, tmp_path):
    d = open_device(phone.uri)
    d.measure_pte(_pte(tmp_path), ["m0"], MeasureConfig(warmup=1, iterations=3, threads=3, affinity="70"))
    run = [c.command for c in phone.commands if "et_bench --model_path" in c.command][-1]
    assert "taskset 70 " in run and "--threads 3" in run
    d.close()


def test_a_crash_keeps_earlier_methods_and_restarts_after_the_culprit(phone, fake_runner, tmp_path):
    _mode(phone, "crash:m1")
    d = open_device(phone.uri)
    res = d.measure_pte(_pte(tmp_path), ["m0", "m1", "m2"], CFG)
    assert res[0].ok and res[2].ok
    assert not res[1].ok and "execution of 'm1' failed (fake)" in res[1].error
    runs = [c.command for c in phone.commands if "et_bench --model_path" in c.command]
    assert "--methods m0,m1,m2" in runs[0] and "--methods m2" in runs[1]
    _mode(phone, "usage")
    with pytest.raises(AmcError, match="bad arguments"):
        d.measure_pte(_pte(tmp_path), ["m0"], CFG)
    d.close()


def test_hung_runner_is_killed_by_pid_within_the_timeout(phone, fake_runner, tmp_path):
    phone.set_faults(hang_program="et_bench")
    d = open_device(phone.uri + "?timeout_s=2")
    d.runner
    t0 = time.monotonic()
    res = d.measure_pte(_pte(tmp_path), ["m0", "m1", "m2"], CFG)
    took = time.monotonic() - t0
    assert took < 12, took
    assert not any(r.ok for r in res)
    assert "did not finish within 2s" in res[0].error and "was killed (pid" in res[0].error
    assert "keeps timing out" in res[2].error
    kills = [c for c in phone.commands if "kill $p" in c.command]
    assert len(kills) == 2 and not any("pkill" in c.command or "killall" in c.command for c in phone.commands)
    for r in (res[0], res[2]):  # the stand-ins (same pid, same name as the runner) are gone
        pid = int(r.error.split("(pid ")[1].split(";")[0])
        assert _gone(pid), r.error
    phone.set_faults(hang_program=None)
    assert all(r.ok for r in d.measure_pte(_pte(tmp_path), ["m0"], CFG))
    d.close()


def test_connection_dropped_mid_run_is_a_clear_error_and_the_next_session_cleans_up(phone, fake_runner, tmp_path):
    d = open_device(phone.uri)
    d.runner
    d.poll_window_s = 0.3
    _mode(phone, "sleep:20")
    phone.set_faults(drop_after_shell_commands=2)  # guard snapshot, then the runner's launch: then RST
    with pytest.raises(AdbConnectionLost, match=r"connection to adb-tcp:127\.0\.0\.1:\d+ lost during run of "
                                                r"et_bench .*reconnect and rerun") as info:
        d.measure_pte(_pte(tmp_path), ["m0", "m1"], CFG)
    assert info.value.partial == {}
    leftover = phone.phone_path(d.session_dir)
    assert leftover.exists()  # no cleanup over a dead connection...
    d.close()
    _mode(phone, None)
    d2 = open_device(phone.uri)
    assert all(r.ok for r in d2.measure_pte(_pte(tmp_path), ["m0"], CFG))
    assert not leftover.exists()  # ...the next session of this host removes it
    d2.close()


def _drop_once_seen(d, phone, needle: str, outputs: list[str]) -> None:
    """Wrap d.conn.run: once an answer contains `needle`, the test device drops the connection after
    the next shell command (its answer still arrives; the one after fails)."""
    real_run = d.conn.run
    armed = []

    def run(command, *args, **kwargs):
        out = real_run(command, *args, **kwargs)
        outputs.append(out[0])
        if needle in out[0] and not armed:
            armed.append(True)
            phone.set_faults(drop_after_shell_commands=1)
        return out

    d.conn.run = run


def test_connection_dropped_mid_run_keeps_the_methods_already_received(phone, fake_runner, tmp_path):
    """et_bench prints m0 and m1, then works on m2 when the connection drops: m0 and m1 came back with
    the polls while it ran, so they are in `partial`; a rerun needs only m2 and m3."""
    d = open_device(phone.uri)
    d.runner
    d.poll_window_s = 0.2
    _mode(phone, "wait:m2")
    outputs: list[str] = []
    _drop_once_seen(d, phone, '"method": "m1"', outputs)
    with pytest.raises(AdbConnectionLost, match="lost during run of et_bench") as info:
        d.measure_pte(_pte(tmp_path), ["m0", "m1", "m2", "m3"], CFG)
    partial = info.value.partial
    assert sorted(partial) == ["m0", "m1"] and all(s.ok for s in partial.values())
    assert partial["m0"].samples_ms == (1.001, 1.101, 1.201) and partial["m1"].n == 3
    # each line was fetched once: later polls ask for the bytes after the ones already consumed
    assert sum(o.count('"method": "m0"') for o in outputs) == 1
    assert any("tail -c +" in c.command and "tail -c +1 " not in c.command for c in phone.commands)
    d.close()
    phone.phone_path("/data/local/tmp/amc_mobile/go").write_text("")
    _mode(phone, None)
    d2 = open_device(phone.uri)
    res = d2.measure_pte(_pte(tmp_path), ["m2", "m3"], CFG)
    assert [r.name for r in res] == ["m2", "m3"] and all(r.ok for r in res)
    d2.close()


def test_connection_dropped_with_repeats_keeps_only_complete_methods(phone, fake_runner, tmp_path):
    """With 2 repeats a method is finished once its 2nd repeat is in: a drop during the 2nd invocation
    keeps the method it had printed there (m0), not those with only their 1st repeat (m1, m2)."""
    d = open_device(phone.uri)
    d.runner
    d.poll_window_s = 0.2
    _mode(phone, "wait:m1")
    gate = phone.phone_path("/data/local/tmp/amc_mobile/go")
    gate.write_text("")  # the 1st invocation runs through; the 2nd stops before m1
    real_run = d.conn.run
    launches = []

    def gated(command, *args, **kwargs):
        if "et_bench --model_path" in command:
            launches.append(command)
            if len(launches) == 2:
                gate.unlink()
        return real_run(command, *args, **kwargs)

    d.conn.run = gated
    outputs: list[str] = []
    _drop_once_seen(d, phone, '"method": "m0", "iterations_us": [1002', outputs)  # m0 of invocation 2
    with pytest.raises(AdbConnectionLost) as info:
        d.measure_pte(_pte(tmp_path), ["m0", "m1", "m2"], MeasureConfig(warmup=1, iterations=3, repeats=2))
    partial = info.value.partial
    assert sorted(partial) == ["m0"] and partial["m0"].n == 6  # both repeats, pooled
    assert len(launches) == 2
    d.close()


class _DroppingDevice:
    """A device whose connection drops in its 2nd batch after finishing the first half of it."""

    uri = "stub:dropping"

    def __init__(self):
        self.calls = 0

    def fingerprint(self, config=None):
        raise NotImplementedError

    def measure(self, candidates, config=None, progress=None):
        self.calls += 1
        names = [c.name for c in candidates]
        if self.calls == 2:
            half = names[: len(names) // 2]
            raise AdbConnectionLost("connection to stub lost during run of et_bench",
                                    partial={n: LatencyStats(n, 1.0, 1.0, 1.0, 1.0, 1.0, 3, (1.0,) * 3, None, None)
                                             for n in half})
        return [LatencyStats(n, 2.0, 2.0, 2.0, 2.0, 2.0, 3, (2.0,) * 3, None, None) for n in names]


def test_batches_hand_over_what_a_dropped_device_finished():
    """BatchRunner, Programs and Companions give `on_batch` the finished methods of the batch that
    was cut short (no failure rows for the others), then let the error through."""
    from latency_tables.batching import BatchRunner, Companions, Job, Programs
    from latency_tables.units import UnitSpec

    spec = UnitSpec("conv", 4, 4, 8, 8, 1)
    jobs = [Job(f"u{i}", spec=spec) for i in range(8)]
    got: list[tuple[str, bool]] = []

    def on_batch(results):
        got.extend((j.name, s.ok) for j, s in results)

    runner = BatchRunner(_DroppingDevice(), CFG, batch_size=4, workers=1)
    with pytest.raises(AdbConnectionLost):
        runner.run(jobs, on_batch)
    assert got == [("u0", True), ("u1", True), ("u2", True), ("u3", True), ("u4", True), ("u5", True)]

    got.clear()
    programs = Programs(BatchRunner(_DroppingDevice(), CFG, batch_size=4, workers=1), jobs)
    with pytest.raises(AdbConnectionLost):
        programs.measure_pass(on_batch)
    assert [n for n, _ in got] == ["u0", "u1", "u2", "u3", "u4", "u5"]

    got.clear()
    companions = Companions(BatchRunner(_DroppingDevice(), CFG, batch_size=4, workers=1), jobs, on_batch)
    with pytest.raises(AdbConnectionLost):  # each program's results are passed on as soon as it is timed
        companions.measure_once()
    assert [n for n, _ in got] == ["u0", "u1", "u2", "u3", "u4", "u5"]


@pytest.mark.slow
def test_table_build_dropped_mid_invocation_keeps_finished_rows_and_rerun_measures_only_the_rest(
        phone, fake_runner, tmp_path):
    """resnet20 at a 64-channel grid (16 unit configs) in batches of 4 on the fake runner: batch 2's
    runner prints u0005, then the connection drops while it works on u0006. u0005's row is in the
    table with batch 1's; the rerun measures the other 11, once each."""
    from amc_mobile.tables import build_table
    from latency_tables.reference import REFERENCE_NAME
    from latency_tables.store import TableStore

    kw = dict(grid=64, coarse_step=100, refine=False, calibrate=False, batch_size=4, workers=1, progress=False,
              config=CFG, table_dir=tmp_path / "table")
    d = open_device(phone.uri)
    d.poll_window_s = 0.2
    _mode(phone, "wait:u0006")
    outputs: list[str] = []
    _drop_once_seen(d, phone, '"method": "u0005"', outputs)
    with pytest.raises(AdbConnectionLost, match="lost during run of et_bench"):
        build_table("resnet20", d, **kw)
    d.close()
    units = TableStore(tmp_path / "table").units()
    assert len(units) == 5 and not TableStore(tmp_path / "table").failures()

    phone.phone_path("/data/local/tmp/amc_mobile/go").write_text("")
    _mode(phone, None)
    n_cmds = len(phone.commands)
    d2 = open_device(phone.uri)
    report = build_table("resnet20", d2, **kw)
    d2.close()
    assert (report.measured, report.failed, report.present) == (11, 0, 5)
    runs = [c.command for c in phone.commands[n_cmds:] if "et_bench --model_path" in c.command]
    # the drift reference runs in every program (issue 19); it is not a configuration asked for
    asked = [m for c in runs for m in c.split("--methods ")[1].split()[0].split(",") if m != REFERENCE_NAME]
    assert len(asked) == 11  # nothing measured twice
    units2 = TableStore(tmp_path / "table").units()
    assert len(units2) == 16 and set(units) <= set(units2)
    with open(tmp_path / "table" / "units.csv") as f:
        assert len(f.read().splitlines()) == 1 + 16  # header + one row per configuration


def test_connection_dropped_mid_push(phone, fake_runner, tmp_path):
    d = open_device(phone.uri)
    d.runner
    big = tmp_path / "big.pte"
    big.write_bytes(os.urandom(300_000))
    phone.set_faults(drop_push_after_bytes=100_000)
    t0 = time.monotonic()
    with pytest.raises(AdbConnectionLost, match=r"lost during push of batch \d+ \(1 methods\)"):
        d.measure_pte(big, ["m0"], CFG)
    assert time.monotonic() - t0 < 10
    assert all(r.ok for r in d.measure_pte(big, ["m0"], CFG))  # reconnects by itself on the next call
    d.close()


HOT = [("cpu-0-0", 41_000), ("cpu-1-0", 43_000), ("cpu-2-0", 46_000), ("gpu", 39_500), ("battery", 31_000)]


def test_the_default_test_phone_is_under_the_thermal_guard(adb_home, adb_test_device_factory, fake_runner, tmp_path):
    phone = adb_test_device_factory()  # default zones: no test waits for the guard unless it heats the phone
    d = open_device(phone.uri + "?thermal_timeout_s=30&thermal_poll_s=0.2")
    assert d.measure_pte(_pte(tmp_path), ["m0"], CFG)[0].ok
    rep = d.last_batch_report["thermal"]
    assert rep["waited_s"] == 0 and not rep["timed_out"] and rep["start_cpu_temp_c"] < rep["max_temp_c"] == 45.0
    d.close()


def test_thermal_guard_waits_for_a_hot_phone(adb_home, adb_test_device_factory, fake_runner, tmp_path, caplog):
    phone = adb_test_device_factory(thermal_zones=HOT)  # cpu-2-0 at 46 °C: above the default 45 °C
    d = open_device(phone.uri + "?thermal_timeout_s=0.8&thermal_poll_s=0.2")
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="device.adb"):
        assert d.measure_pte(_pte(tmp_path), ["m0"], CFG)[0].ok
    rep = d.last_batch_report["thermal"]
    assert rep["timed_out"] and rep["waited_s"] >= 0.8 and rep["start_cpu_temp_c"] == 46.0
    assert "measuring anyway" in caplog.text
    # cooling down while we wait
    d2 = open_device(phone.uri + "?thermal_timeout_s=20&thermal_poll_s=0.1")
    d2.runner
    threading.Timer(0.5, phone.set_temperature, args=("cpu-2-0", 42_000)).start()
    assert d2.measure_pte(_pte(tmp_path), ["m0"], CFG)[0].ok
    rep = d2.last_batch_report["thermal"]
    assert not rep["timed_out"] and 0.3 < rep["waited_s"] < 5 and d2.last_batch_report["before"]["max_cpu_temp_c"] == 43
    assert time.monotonic() - t0 < 15
    d.close(), d2.close()


def test_stock_executor_runner(phone, tmp_path, monkeypatch):
    runner = tmp_path / "fake_executor_runner"
    runner.write_text(FAKE_EXECUTOR_RUNNER)
    runner.chmod(0o755)
    monkeypatch.setenv("AMC_ANDROID_EXECUTOR_RUNNER", str(runner))
    d = open_device(phone.uri + "?runner=executor_runner")
    res = d.measure_pte(_pte(tmp_path), ["fwd", "other"], MeasureConfig(warmup=2, iterations=3, repeats=2))
    assert [r.name for r in res] == ["fwd", "other"]
    assert res[0].samples_ms == (1.3, 1.4, 1.5, 1.3, 1.4, 1.5) and res[0].load_ms == 2.5
    runs = [c.command for c in phone.commands if "executor_runner --model_path" in c.command]
    assert len(runs) == 4 and "--method_name other" in runs[1] and "--num_executions 5" in runs[0]
    assert "taskset 80 " in runs[0] and "--cpu_threads 1" in runs[0]
    with pytest.raises(AmcError, match="give the method names"):
        d.measure_pte(_pte(tmp_path), None, CFG)
    d.close()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_discover(adb_home, phone, monkeypatch):
    monkeypatch.delenv("AMC_ADB_TCP", raising=False)
    assert all(not uri.startswith("adb-tcp:") for uri, _ in discover())
    monkeypatch.setenv("AMC_ADB_TCP", f"127.0.0.1:{phone.port}, 127.0.0.1:1")
    found = dict(discover())
    assert found[phone.uri].startswith("AMC AMC Test Phone (SIM8000), Android 14, arm64-v8a, 8 cores")
    # The user named it: listed with the reason, under the address as typed (no probe options).
    assert found["adb-tcp:127.0.0.1:1"].startswith("cannot reach adb-tcp:127.0.0.1:1: ")
    assert "timeout_s" not in found["adb-tcp:127.0.0.1:1"]
    monkeypatch.setenv("AMC_ADB_TCP", f"127.0.0.1:{phone.port},host:notaport")
    with pytest.raises(AmcError, match=r"^bad AMC_ADB_TCP entry 'host:notaport': expected HOST:PORT"):
        discover()


def test_a_silent_address_is_one_line_within_the_connect_timeout(adb_home):
    t0 = time.monotonic()
    with pytest.raises(AmcError) as info:  # TEST-NET-1: nothing answers (or the route is refused at once)
        open_device("adb-tcp:192.0.2.1:5555?connect_timeout_s=1").fingerprint()
    assert time.monotonic() - t0 < 5
    assert str(info.value).startswith("cannot reach adb-tcp:192.0.2.1:5555: ") and "\n" not in str(info.value)
