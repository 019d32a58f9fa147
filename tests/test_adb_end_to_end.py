"""End to end through the CLI (`main([...])`) against the ADB test device as `adb-tcp:127.0.0.1:PORT`.

The phone reports ABI x86_64, so the adb device pushes the host-built build/host/et_bench and runs
real lowered programs on it (the fake phone runs commands on this machine). Lowering dominates the
cost (ADB is ~5% of a table build here), so the models and grids are kept coarse.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="the ADB test phone signs with cryptography: pip install -e '.[dev]'")

from amc_mobile.cli import main
from device.adb import AdbDevice
from latency_tables.reference import REFERENCE_NAME

# the host runner is built by the session fixture `et_bench` (tests/conftest.py), or the test fails
needs_runner = pytest.mark.usefixtures("et_bench")

COOL = [("cpu-0-0", 38_000), ("cpu-1-0", 39_000), ("cpu-2-0", 40_000), ("gpu", 37_000), ("battery", 31_000)]
FAST_MEASURE = ["--iterations", "5", "--warmup", "2", "--repeats", "1", "--min-time-ms", "0"]


@pytest.fixture
def x86_phone(adb_home, adb_test_device_factory, monkeypatch, tmp_path):
    """A cool test phone whose ABI makes the bridge push the host runner; tables in a temp folder."""
    monkeypatch.delenv("AMC_ANDROID_RUNNER", raising=False)
    monkeypatch.setenv("AMC_TABLES_DIR", str(tmp_path / "tables"))
    return adb_test_device_factory(props={"ro.product.cpu.abi": "x86_64"}, thermal_zones=COOL)


def _table_folder(tmp_path) -> Path:
    folders = [p for p in (tmp_path / "tables").iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    assert folders[0].name.startswith("adb-amc-amc-test-phone-sim8000-xnnpack-t1-")
    return folders[0]


def _unit_keys(folder: Path) -> list[str]:
    with open(folder / "units.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["key"] for r in rows]


@needs_runner
@pytest.mark.slow
def test_table_build_validate_and_search_on_the_phone(x86_phone, tmp_path, runs_dir, capsys):
    """The three steps a user takes with a phone, through the CLI. ResNet-20, not a bigger family: the
    adb path is under test (every unit kind runs through the same batches), and whole-model lowerings
    of MobileNet-V2 were most of this test's minutes."""
    uri = x86_phone.uri
    # 1. the table: ResNet-20's units at a 16-channel grid, both ends of each range only
    rc = main(["table", "build", "--model", "resnet20", "--device", uri, "--grid", "16", "--coarse-step", "100",
               "--no-refine", "--no-calibrate", "--batch-size", "8", "--quiet", *FAST_MEASURE])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "22 measured, 0 failed" in out
    folder = _table_folder(tmp_path)
    keys = _unit_keys(folder)
    assert len(keys) == len(set(keys)) == 22
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["fingerprint"]["kind"] == "adb" and meta["fingerprint"]["affinity"] == "80"
    assert meta["builds"][-1]["device"] == uri
    runs = [c.command for c in x86_phone.commands if "et_bench --model_path" in c.command]
    assert runs and all(c.startswith("{ ( trap '' HUP; taskset 80 ") for c in runs)

    # 2. validation: two random pruned variants, predicted from the table and measured on the phone
    rc = main(["table", "validate", "--model", "resnet20", "--device", uri, "-n", "2", "--passes", "1", "--out",
               str(tmp_path / "validate"), "--quiet", *FAST_MEASURE])
    out = capsys.readouterr().out
    assert rc == 0, out
    with open(tmp_path / "validate" / "samples.csv", newline="") as f:
        samples = list(csv.DictReader(f))
    assert len(samples) == 2

    # 3. a short search under a latency budget on the same phone (untrained weights: the pipeline,
    # not the accuracy, is under test; a budget relative to the prediction keeps it reachable whatever
    # the noise, and spares a whole-model lowering: the phone measures the pruned and original models
    # at the end, in one batch)
    from amc_mobile.models import build_model
    from amc_mobile.train import save_checkpoint

    ckpt = save_checkpoint(build_model("resnet20"), tmp_path / "ckpt")
    run = tmp_path / "search"
    rc = main(["search", "--model", str(ckpt), "--device", uri, "--table-dir", str(folder), "--channel-round", "16",
               "--latency-reference", "predicted", "--target", "0.9", "--episodes", "2", "--warmup", "2", "--val-images", "100", "--eval-batch", "100",
               "--calib-images", "20", "--no-reconstruct", "--no-progress", "--out", str(run),
               # the pipeline, not the session refit or the final wall's choice, is under test here (both have
               # their own tests on `local`): no re-timed calibration models, one final candidate
               "--no-recalibrate", "--final-candidates", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    summary = json.loads((run / "summary.json").read_text())
    measured = summary["measured"]
    assert f"measured on {uri}" in out
    assert measured["fingerprint"]["kind"] == "adb"
    assert measured["original"]["median_ms"] > 0 and measured["pruned"]["median_ms"] > 0


@needs_runner
@pytest.mark.slow
def test_connection_dropped_mid_build_keeps_rows_and_resume_completes(x86_phone, tmp_path, monkeypatch, capsys):
    """resnet20 at a 64-channel grid: 16 unit configs in batches of 4, lowered in-process (--workers 1:
    `AdbDevice.measure` per batch). The connection drops during the 2nd batch's push (run 1), then
    during the 2nd batch's runner invocation (run 2: the methods it had finished by the poll before
    the drop, if any, are kept too); run 3 completes the table."""
    uri = x86_phone.uri
    original = AdbDevice.measure
    calls = {"n": 0, "fault_at": None, "fault": None}
    measured: list[str] = []  # candidates of every batch that came back

    def measure(self, candidates, config=None, progress=None):
        calls["n"] += 1
        if calls["n"] == calls["fault_at"]:
            x86_phone.set_faults(**calls["fault"])
            self.poll_window_s = 0.01  # the launch returns at once: a drop comes while the runner runs
        res = original(self, candidates, config, progress)
        measured.extend(r.name for r in res if r.ok and r.name != REFERENCE_NAME)  # the drift reference is no row
        return res

    monkeypatch.setattr(AdbDevice, "measure", measure)
    build = ["table", "build", "--model", "resnet20", "--device", uri, "--grid", "64", "--coarse-step", "100",
             "--no-refine", "--no-calibrate", "--batch-size", "4", "--workers", "1", "--quiet", *FAST_MEASURE]

    # run 1: the push of the 2nd batch drops, after the 1st batch's 4 rows were written
    calls.update(n=0, fault_at=2, fault={"drop_push_after_bytes": 2000})
    assert main(build) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"connection to {uri} lost during push of batch" in err and "reconnect and rerun" in err
    folder = _table_folder(tmp_path)
    keys1 = _unit_keys(folder)
    assert len(keys1) == 4 and len(measured) == 4  # exactly the rows measured before the drop

    # run 2 resumes; the 2nd shell command of a batch launches the runner: the connection drops after it
    measured.clear()
    calls.update(n=0, fault_at=2, fault={"drop_after_shell_commands": 2})
    assert main(build) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"connection to {uri} lost during run of et_bench" in err
    keys2 = _unit_keys(folder)
    assert keys2[:4] == keys1 and 8 <= len(keys2) < 12 and len(measured) == 4

    # run 3 completes the coarse pass, with no duplicates; the runner left by run 2 was cleaned up
    calls.update(n=0, fault_at=None)
    assert main(build) == 0
    out = capsys.readouterr().out
    keys3 = _unit_keys(folder)
    assert len(keys3) == len(set(keys3)) == 16, out
    assert keys3[:len(keys2)] == keys2
    assert f"{16 - len(keys2)} measured, 0 failed, {len(keys2)} already present" in out
    assert not list(x86_phone.phone_path("/data/local/tmp/amc_mobile/runs").glob("*/*"))


@needs_runner
def test_missing_runner_fails_before_lowering(adb_home, adb_test_device_factory, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("AMC_ANDROID_RUNNER", raising=False)
    monkeypatch.setenv("AMC_TABLES_DIR", str(tmp_path / "tables"))
    phone = adb_test_device_factory(thermal_zones=COOL)  # arm64-v8a: needs build/android/et_bench
    assert main(["table", "build", "--model", "resnet20", "--device", phone.uri, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no et_bench runner for" in err and "android_bench/README.md" in err


def test_unauthorised_phone_is_one_line_and_does_not_hang(adb_home, adb_test_device_factory, tmp_path, capsys):
    from conftest_adb import make_adb_key

    phone = adb_test_device_factory(authorized_keys=[make_adb_key(tmp_path / "other").public_key])
    assert main(["device-info", phone.uri + "?auth_timeout_s=1"]) == 2
    err = capsys.readouterr().err
    assert "accept the debugging prompt on the phone's screen (key ~/.android/adbkey)..." in err
    assert "did not accept the key" in err.splitlines()[-1]


def test_devices_lists_local_and_the_phones_named_in_amc_adb_tcp(adb_home, adb_test_device, monkeypatch, capsys):
    """`amc-mobile devices`: this CPU, the test phone (asked for its model over ADB), a named phone that does
    not answer with the reason, no CUDA line without a GPU; a malformed entry is a one-line error."""
    import torch

    monkeypatch.setenv("AMC_ADB_TCP", f"{adb_test_device.host}:{adb_test_device.port}, 127.0.0.1:1")
    assert main(["devices"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "local" and "executorch 1.4.1 xnnpack" in lines[0]
    phone = [line for line in lines if line.split()[0] == adb_test_device.uri]
    assert len(phone) == 1 and ", Android " in phone[0] and phone[0].endswith(" cores"), lines
    silent = [line for line in lines if line.startswith("adb-tcp:127.0.0.1:1")]
    assert len(silent) == 1 and "?" not in silent[0].split()[0] and len(silent[0].split()) > 1, lines
    assert any(line.startswith("cuda:") for line in lines) == torch.cuda.is_available()
    monkeypatch.setenv("AMC_ADB_TCP", "127.0.0.1:notaport")
    assert main(["devices"]) == 2
    err = capsys.readouterr().err
    assert "bad AMC_ADB_TCP entry '127.0.0.1:notaport'" in err and err.count("\n") == 1
