"""Phones through Google's adb server (Debian's `adb`): `adb:SERIAL` with a running server and
`adb-server:HOST:PORT/SERIAL`, against real parts only: the server is `adb -P PORT nodaemon server`
on a free loopback port (fixture `adb_server`, always stopped), connected with `adb connect` to ADB
test phones (tests/adb_test_device). The direct path's tests are in test_adb_device.py.

Proof that a command went through Google's server and not our direct client: the phone records the
service of every command, and only the server asks for `shell,v2` (the direct path uses `shell:`).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from amc_mobile.errors import AmcError
from device import MeasureConfig, open_device
from device.adb import AdbConnectionLost, discover
from device.adb import host_protocol as hp
from device.adb.server_connection import ServerConnection, local_server

from test_adb_device import COOL, HOT, _gone, _mode, _pte

CFG = MeasureConfig(warmup=1, iterations=3, repeats=1)
HOST_RUNNER = Path(__file__).resolve().parent.parent / "build" / "host" / "et_bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_env(monkeypatch):
    for var in (hp.ENV_SOCKET, hp.ENV_PORT, "AMC_ADB_SERVERS", "AMC_ADB_TCP"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def served(adb_home, adb_test_device_factory, adb_server, clean_env, fake_runner):
    """One cool test phone attached to a private adb server that `adb:SERIAL` finds through
    $ANDROID_ADB_SERVER_PORT; returns (phone, serial)."""
    phone = adb_test_device_factory(thermal_zones=COOL)
    serial = adb_server.attach(phone)
    clean_env.setenv(hp.ENV_PORT, str(adb_server.server_port))
    return phone, serial


def _via_server(phone) -> bool:
    return bool(phone.commands) and all(c.service.startswith("shell,v2") for c in phone.commands)


@pytest.fixture
def fake_runner(tmp_path, monkeypatch):
    from test_adb_device import FAKE_ET_BENCH

    path = tmp_path / "fake_et_bench"
    path.write_text(FAKE_ET_BENCH)
    path.chmod(0o755)
    monkeypatch.setenv("AMC_ANDROID_RUNNER", str(path))
    return path


# -- the protocol's pure parts ---------------------------------------------------------------------


def test_devices_l_parsing_keeps_states_with_spaces():
    text = ("127.0.0.1:40001        device product:amcsim model:AMC_Test_Phone device:amcsim transport_id:1\n"
            "R58M123ABC             unauthorized usb:1-1 transport_id:2\n"
            "emulator-5554          offline transport_id:3\n"
            "0123456789ABCDEF       no permissions (user in plugdev group; are your udev rules wrong?); see "
            "[http://developer.android.com/tools/device.html] usb:1-2 transport_id:4\n")
    entries = hp.parse_devices_l(text)
    assert [(e.serial, e.state) for e in entries][:3] == [("127.0.0.1:40001", "device"), ("R58M123ABC", "unauthorized"),
                                                          ("emulator-5554", "offline")]
    assert entries[0].model == "AMC Test Phone" and entries[0].attrs["transport_id"] == "1"
    assert entries[3].state.startswith("no permissions (user in plugdev") and entries[3].attrs["usb"] == "1-2"


def test_the_server_address_comes_from_the_variables_adb_itself_reads(clean_env):
    assert (hp.configured_server().host, hp.configured_server().port) == ("127.0.0.1", 5037)
    clean_env.setenv(hp.ENV_PORT, "5099")
    assert (str(hp.configured_server()), hp.configured_server().source) == ("127.0.0.1:5099", hp.ENV_PORT)
    clean_env.setenv(hp.ENV_SOCKET, "tcp:10.1.2.3:6000")  # wins over the port, as in adb
    assert (str(hp.configured_server()), hp.configured_server().source) == ("10.1.2.3:6000", hp.ENV_SOCKET)
    clean_env.setenv(hp.ENV_SOCKET, "localabstract:adb")
    with pytest.raises(AmcError, match="only tcp:HOST:PORT is"):
        hp.configured_server()
    clean_env.delenv(hp.ENV_SOCKET)
    clean_env.setenv(hp.ENV_PORT, "fifty")
    with pytest.raises(AmcError, match="ANDROID_ADB_SERVER_PORT=fifty is not a port number"):
        hp.configured_server()


def test_adb_server_uri_parsing(clean_env):
    d = open_device("adb-server:10.0.0.5:5038/R58M123ABC?max_temp_c=none")  # nothing is contacted yet
    assert d.uri == "adb-server:10.0.0.5:5038/R58M123ABC" and isinstance(d.conn, ServerConnection)
    assert d.guard.max_temp_c is None and str(d.conn.address) == "10.0.0.5:5038"
    assert open_device("adb-server:[::1]:5037/127.0.0.1:5555").conn.serial == "127.0.0.1:5555"
    for bad in ("adb-server:10.0.0.5:5037", "adb-server:10.0.0.5:5037/", "adb-server:h:99999/X",
                "adb-server:h:1/X?bogus=1"):
        with pytest.raises(AmcError) as info:
            open_device(bad)
        assert "\n" not in str(info.value)


# -- errors that say what to do --------------------------------------------------------------------


def test_an_unreachable_server_is_one_line_with_what_to_do(adb_home, clean_env, capsys):
    port = _free_port()
    with pytest.raises(AmcError) as info:
        open_device(f"adb-server:127.0.0.1:{port}/X").fingerprint()
    msg = str(info.value)
    assert msg.startswith(f"cannot reach the adb server at 127.0.0.1:{port}: ") and "\n" not in msg
    assert f"adb -P {port} start-server" in msg and "ssh -N -L" in msg
    from amc_mobile.cli import main

    assert main(["device-info", f"adb-server:127.0.0.1:{port}/X"]) == 2  # the CLI: one line, exit 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach the adb server" in err and "\n" not in err and "Traceback" not in err
    # a variable that names a dead server is an error, never a silent fall-back to USB
    clean_env.setenv(hp.ENV_PORT, str(port))
    with pytest.raises(AmcError, match=rf"cannot reach the adb server at 127.0.0.1:{port} \(from "
                                       rf"ANDROID_ADB_SERVER_PORT\)"):
        open_device("adb:R58M123ABC")


def test_without_any_server_adb_serial_is_the_direct_usb_path(adb_home, clean_env):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 5037)) == 0:
            pytest.skip("something listens on 127.0.0.1:5037 on this machine")
    assert local_server() is None
    d = open_device("adb:R58M123ABC")
    assert type(d.conn).__name__ == "AdbConnection"


def test_a_serial_the_server_does_not_have(served):
    phone, serial = served
    with pytest.raises(AmcError) as info:
        open_device("adb:NOSUCHPHONE").fingerprint()
    msg = str(info.value)
    assert msg.startswith("no phone 'NOSUCHPHONE' on the adb server at 127.0.0.1:") and "\n" not in msg
    assert f"(it has: {serial} (device))" in msg and "adb connect HOST:PORT" in msg


def test_an_unauthorised_phone_waits_then_says_what_to_do(adb_home, adb_test_device_factory, adb_server, clean_env,
                                                         capsys):
    refusing = adb_test_device_factory(authorized_keys=[])
    adb_server.run("connect", refusing.serial, timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
            e.state == "unauthorized" for e in hp.list_devices(adb_server.address)):
        time.sleep(0.1)
    t0 = time.monotonic()
    with pytest.raises(AmcError) as info:
        open_device(f"adb-server:127.0.0.1:{adb_server.server_port}/{refusing.serial}?auth_timeout_s=1").fingerprint()
    assert 0.9 < time.monotonic() - t0 < 6
    msg = str(info.value)
    assert "has the phone unauthorized: accept the 'Allow debugging?' prompt on the phone" in msg and "\n" not in msg
    assert "accept the USB debugging prompt" in capsys.readouterr().err  # shown while it waited


# -- everything the direct path does, through the server -------------------------------------------


def test_adb_serial_goes_through_the_running_server_push_only_when_changed(served, fake_runner, tmp_path):
    phone, serial = served
    d = open_device(f"adb:{serial}")
    assert isinstance(d.conn, ServerConnection) and d.uri == f"adb:{serial}"
    assert d.info()["transport"] == f"adb server at 127.0.0.1:{d.conn.address.port}"
    fp = d.fingerprint()
    assert fp.hardware == "AMC AMC Test Phone (SIM8000)" and (fp.threads, fp.affinity) == (1, "80")
    assert d.runner == "/data/local/tmp/amc_mobile/et_bench" and d.conn.pushes == 1
    assert phone.phone_path(d.runner).read_bytes() == fake_runner.read_bytes()
    assert phone.phone_path(d.runner).stat().st_mode & 0o777 == 0o755
    d.close()
    d2 = open_device(f"adb:{serial}")
    d2.runner
    assert d2.conn.pushes == 0  # same sha256: nothing pushed
    d2.close()
    fake_runner.write_text(fake_runner.read_text() + "\n# changed\n")
    d3 = open_device(f"adb:{serial}")
    d3.runner
    assert d3.conn.pushes == 1 and phone.phone_path(d3.runner).read_text().endswith("# changed\n")
    d3.close()
    assert _via_server(phone)


def test_a_batch_through_the_server_pinned_to_the_big_core_and_cleaned(served, fake_runner, tmp_path):
    phone, serial = served
    d = open_device(f"adb:{serial}")
    d.runner
    n_cmd, n_push = d.conn.commands, d.conn.pushes
    res = d.measure_pte(_pte(tmp_path), ["m2", "m0"], MeasureConfig(warmup=1, iterations=3, repeats=2))
    assert [r.name for r in res] == ["m2", "m0"] and all(r.ok for r in res)
    assert res[0].n == 6 and res[0].samples_ms[:3] == (1.001, 1.101, 1.201)
    assert d.conn.pushes - n_push == 1 and d.conn.commands - n_cmd == 4  # same round-trips as the direct path
    runs = [c.command for c in phone.commands if "et_bench --model_path" in c.command]
    assert len(runs) == 2 and all("taskset 80 " in c and "--methods m2,m0" in c for c in runs)
    assert not list(phone.phone_path(d.session_dir).glob("*"))
    d.close()
    assert _via_server(phone)


def test_a_hung_runner_is_killed_by_pid_through_the_server(served, fake_runner, tmp_path):
    phone, serial = served
    phone.set_faults(hang_program="et_bench")
    d = open_device(f"adb:{serial}?timeout_s=2")
    d.runner
    t0 = time.monotonic()
    res = d.measure_pte(_pte(tmp_path), ["m0", "m1"], CFG)
    assert time.monotonic() - t0 < 12
    assert not any(r.ok for r in res) and "was killed (pid" in res[0].error
    kills = [c for c in phone.commands if "kill $p" in c.command]
    assert len(kills) == 2 and not any("pkill" in c.command or "killall" in c.command for c in phone.commands)
    pid = int(res[0].error.split("(pid ")[1].split(";")[0])
    assert _gone(pid)
    phone.set_faults(hang_program=None)
    assert all(r.ok for r in d.measure_pte(_pte(tmp_path), ["m0"], CFG))
    d.close()
    assert _via_server(phone)


def test_the_thermal_guard_waits_through_the_server(adb_home, adb_test_device_factory, adb_server, clean_env,
                                                   fake_runner, tmp_path):
    phone = adb_test_device_factory(thermal_zones=HOT)  # 46 °C: above the default 45 °C
    serial = adb_server.attach(phone)
    d = open_device(f"adb-server:127.0.0.1:{adb_server.server_port}/{serial}?thermal_timeout_s=20&thermal_poll_s=0.1")
    d.runner
    threading.Timer(0.5, phone.set_temperature, args=("cpu-2-0", 42_000)).start()
    assert d.measure_pte(_pte(tmp_path), ["m0"], CFG)[0].ok
    rep = d.last_batch_report["thermal"]
    assert not rep["timed_out"] and 0.3 < rep["waited_s"] < 5 and rep["start_cpu_temp_c"] == 46.0
    d.close()


def _after_answer(d, needle: str, action) -> None:
    """Once an answer contains `needle`, run `action` (a real drop: phone or server)."""
    real_run = d.conn.run
    fired = []

    def run(command, *args, **kwargs):
        out = real_run(command, *args, **kwargs)
        if needle in out[0] and not fired:
            fired.append(True)
            action()
        return out

    d.conn.run = run


def test_a_phone_dropped_mid_run_keeps_the_methods_already_received(served, fake_runner, tmp_path):
    phone, serial = served
    d = open_device(f"adb:{serial}")
    d.runner
    d.poll_window_s = 0.2
    _mode(phone, "wait:m2")
    _after_answer(d, '"method": "m1"', phone.device.stop)  # the phone goes away: the cable is pulled
    with pytest.raises(AdbConnectionLost) as info:
        d.measure_pte(_pte(tmp_path), ["m0", "m1", "m2", "m3"], CFG)
    msg = str(info.value)
    assert msg.startswith(f"connection to adb:{serial} lost during run of et_bench") and "\n" not in msg
    assert "everything measured before is kept" in msg and ("left the adb server" in msg or "offline" in msg)
    assert sorted(info.value.partial) == ["m0", "m1"] and all(s.ok for s in info.value.partial.values())
    d.close()


def test_a_server_that_dies_mid_run_keeps_the_methods_already_received(served, adb_server, fake_runner, tmp_path):
    phone, serial = served
    d = open_device(f"adb:{serial}")
    d.runner
    d.poll_window_s = 0.2
    _mode(phone, "wait:m2")
    _after_answer(d, '"method": "m1"', lambda: (adb_server.proc.kill(), adb_server.proc.wait()))
    with pytest.raises(AdbConnectionLost) as info:
        d.measure_pte(_pte(tmp_path), ["m0", "m1", "m2"], CFG)
    msg = str(info.value)
    assert f"the adb server at 127.0.0.1:{adb_server.server_port} went away" in msg and "\n" not in msg
    assert "start-server" in msg and sorted(info.value.partial) == ["m0", "m1"]
    phone.phone_path("/data/local/tmp/amc_mobile/go").write_text("")
    d.close()


# -- `amc-mobile devices` --------------------------------------------------------------------------


def test_devices_lists_every_servers_phones_with_model_soc_and_state(adb_home, adb_test_device_factory, adb_server,
                                                                    clean_env, capsys):
    a = adb_test_device_factory(thermal_zones=COOL)
    b = adb_test_device_factory(thermal_zones=COOL, props={"ro.product.model": "AMC Other Phone",
                                                           "ro.soc.model": "SIM9000"})
    refusing = adb_test_device_factory(authorized_keys=[])
    sa, sb = adb_server.attach(a), adb_server.attach(b)
    adb_server.run("connect", refusing.serial, timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(e.serial == refusing.serial and e.state == "unauthorized"
                                                  for e in hp.list_devices(adb_server.address)):
        time.sleep(0.1)
    # the local server through the variable adb reads...
    clean_env.setenv(hp.ENV_PORT, str(adb_server.server_port))
    found = dict(discover())
    where = f"(via the adb server at 127.0.0.1:{adb_server.server_port})"
    assert found[f"adb:{sa}"] == f"AMC AMC Test Phone (SIM8000), Android 14, arm64-v8a, 8 cores {where}"
    assert found[f"adb:{sb}"].startswith("AMC AMC Other Phone (SIM9000), Android 14")
    assert found[f"adb:{refusing.serial}"].startswith("unauthorized: accept the 'Allow debugging?' prompt")
    # ...and a lab's servers from AMC_ADB_SERVERS, with one that is down said so in one line
    dead = _free_port()
    clean_env.delenv(hp.ENV_PORT)
    clean_env.setenv("AMC_ADB_SERVERS", f"127.0.0.1:{adb_server.server_port}, 127.0.0.1:{dead}")
    from amc_mobile.cli import main

    assert main(["devices"]) == 0
    lines = capsys.readouterr().out.splitlines()
    remote = f"adb-server:127.0.0.1:{adb_server.server_port}/{sb}"
    assert any(l.startswith(remote) and "AMC Other Phone (SIM9000)" in l for l in lines), lines
    assert any(l.startswith(f"adb-server:127.0.0.1:{dead}") and "not reachable" in l for l in lines), lines


# -- real runner, real models ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not HOST_RUNNER.is_file(), reason="build/host/et_bench is not built (make runner)")
def test_bench_and_a_small_table_build_through_the_server(adb_home, adb_test_device_factory, adb_server, clean_env,
                                                          tmp_path, capsys):
    from amc_mobile.cli import main

    phone = adb_test_device_factory(props={"ro.product.cpu.abi": "x86_64"}, thermal_zones=COOL)
    serial = adb_server.attach(phone)
    clean_env.setenv(hp.ENV_PORT, str(adb_server.server_port))
    clean_env.setenv("AMC_TABLES_DIR", str(tmp_path / "tables"))
    clean_env.delenv("AMC_ANDROID_RUNNER", raising=False)
    fast = ["--iterations", "5", "--warmup", "2", "--repeats", "1", "--min-time-ms", "0"]
    rc = main(["bench", "--model", "resnet20", "--device", f"adb-server:127.0.0.1:{adb_server.server_port}/{serial}",
               "--json", *fast])
    bench = json.loads(capsys.readouterr().out)
    assert rc == 0 and bench["results"][0]["n"] == 5 and bench["fingerprint"]["hardware"].startswith("AMC AMC Test")
    rc = main(["table", "build", "--model", "resnet20", "--device", f"adb:{serial}", "--grid", "64", "--coarse-step",
               "100", "--no-refine", "--no-calibrate", "--batch-size", "8", "--quiet", *fast])
    out = capsys.readouterr().out
    assert rc == 0 and "16 measured, 0 failed" in out, out
    folders = [p for p in (tmp_path / "tables").iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.startswith("adb-amc-amc-test-phone-sim8000-xnnpack-t1-")
    with open(folders[0] / "units.csv") as f:
        assert len(f.read().splitlines()) == 1 + 16
    assert _via_server(phone)
    assert phone.phone_path("/data/local/tmp/amc_mobile/et_bench").read_bytes() == HOST_RUNNER.read_bytes()


def test_a_phone_without_shell_v2_gets_v1_with_the_exit_status_marked(adb_home, adb_test_device_factory, adb_server,
                                                                      clean_env, fake_runner, tmp_path):
    phone = adb_test_device_factory(thermal_zones=COOL, features=("cmd", "stat_v2", "ls_v2", "fixed_push_mkdir"))
    serial = adb_server.attach(phone)
    d = open_device(f"adb-server:127.0.0.1:{adb_server.server_port}/{serial}")
    # (as on the direct path, the command runs in the shell itself: a bare `exit` would skip the marker)
    assert d.conn.run("echo hi; echo err >&2; sh -c 'exit 3'") == ("hi\nerr\n", 3)
    assert all(r.ok for r in d.measure_pte(_pte(tmp_path), ["m0", "m1"], CFG))
    assert phone.commands and all(c.service == "shell" for c in phone.commands)
    d.close()
