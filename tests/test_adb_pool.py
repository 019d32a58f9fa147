"""Several phones at once: `table build -d adb:A -d adb:B` through Google's adb server (real server,
real test phones, the fake et_bench of test_adb_device.py; lowering is real). resnet20 at a
64-channel grid without refinement is 16 unit configurations, in programs of 4. Slow: lowering
the 16 units and starting the lowering workers take most of each test's half minute."""

from __future__ import annotations

import csv

import pytest

from amc_mobile.errors import AmcError
from device import open_device
from device.adb import host_protocol as hp
from amc_mobile.tables import build_table, build_tables
from latency_tables.store import TableStore

from test_adb_device import CFG, COOL
from test_adb_server import _after_answer, clean_env, fake_runner  # noqa: F401 (fixtures)

KW = dict(grid=64, coarse_step=100, refine=False, calibrate=False, batch_size=4, workers=2, progress=False,
          config=CFG)


@pytest.fixture
def pool(adb_home, adb_test_device_factory, adb_server, clean_env, fake_runner):  # noqa: F811
    """Two phones of one model and one of another, on one private adb server ($ANDROID_ADB_SERVER_PORT)."""
    a = adb_test_device_factory(thermal_zones=COOL)
    b = adb_test_device_factory(thermal_zones=COOL)
    other = adb_test_device_factory(thermal_zones=COOL, props={"ro.product.model": "AMC Other Phone"})
    serials = [adb_server.attach(p) for p in (a, b, other)]
    clean_env.setenv(hp.ENV_PORT, str(adb_server.server_port))
    return (a, b, other), serials


def _rows(folder) -> list[str]:
    with open(folder / "units.csv", newline="") as f:
        return [r["key"] for r in csv.DictReader(f)]


def _asked(phone) -> list[str]:
    """The configurations a phone was asked to time (the drift reference, in every program, is not one)."""
    from latency_tables.reference import REFERENCE_NAME

    runs = [c.command for c in phone.commands if "et_bench --model_path" in c.command]
    return [m for c in runs for m in c.split("--methods ")[1].split()[0].split(",") if m != REFERENCE_NAME]


@pytest.mark.slow
def test_two_phones_of_one_model_share_one_table_and_each_row_names_its_phone(pool, tmp_path):
    (a, b, _), (sa, sb, _) = pool
    report = build_table("resnet20", [f"adb:{sa}", f"adb:{sb}"], table_dir=tmp_path / "t", **KW)
    assert (report.measured, report.failed) == (16, 0)
    keys = _rows(tmp_path / "t")
    assert len(keys) == len(set(keys)) == 16
    origins = TableStore(tmp_path / "t").origins()
    assert set(origins) == set(keys) and set(origins.values()) == {f"adb:{sa}", f"adb:{sb}"}
    assert report.devices == {f"adb:{sa}": len(_asked(a)), f"adb:{sb}": len(_asked(b))}
    assert sorted(_asked(a) + _asked(b)) == sorted(set(_asked(a) + _asked(b)))  # nothing measured twice
    assert all(c.service.startswith("shell,v2") for c in a.commands + b.commands)  # through the server
    # the rerun finds everything: nothing is measured again
    na, nb = len(_asked(a)), len(_asked(b))
    again = build_table("resnet20", [f"adb:{sa}", f"adb:{sb}"], table_dir=tmp_path / "t", **KW)
    assert (again.measured, again.present) == (0, 16)
    assert (len(_asked(a)), len(_asked(b))) == (na, nb)


@pytest.mark.slow
def test_a_phone_dropped_mid_build_hands_its_work_to_the_other(pool, tmp_path):
    (a, b, _), (sa, sb, _) = pool
    da, db = open_device(f"adb:{sa}"), open_device(f"adb:{sb}")
    db.poll_window_s = 0.2
    _after_answer(db, '"method": "u00', b.device.stop)  # b's first answer with a measured unit: cable pulled
    report = build_table("resnet20", [da, db], table_dir=tmp_path / "t", **KW)
    assert (report.measured, report.failed) == (16, 0)
    assert list(report.lost) == [f"adb:{sb}"] and "lost" in report.lost[f"adb:{sb}"]
    keys = _rows(tmp_path / "t")
    assert len(keys) == len(set(keys)) == 16  # no row lost, none twice
    origins = TableStore(tmp_path / "t").origins()
    assert set(origins) == set(keys)
    from_b = [k for k, u in origins.items() if u == f"adb:{sb}"]
    assert 1 <= len(from_b) <= 4 and report.devices[f"adb:{sb}"] == len(from_b)  # what b finished is kept
    da.close(), db.close()
    # rerun with the phone back: nothing left to measure
    again = build_table("resnet20", [f"adb:{sa}"], table_dir=tmp_path / "t", **KW)
    assert again.measured == 0 and again.present == 16


@pytest.mark.slow
def test_when_every_phone_is_gone_the_rows_are_kept_and_the_rerun_resumes(pool, adb_server, tmp_path):
    (a, b, _), (sa, sb, _) = pool
    da, db = open_device(f"adb:{sa}"), open_device(f"adb:{sb}")
    _after_answer(da, '"method": "u00', a.device.stop)
    _after_answer(db, '"method": "u00', b.device.stop)
    with pytest.raises(AmcError, match="every device of the pool is gone") as info:
        build_table("resnet20", [da, db], table_dir=tmp_path / "t", **KW)
    assert "\n" not in str(info.value)
    kept = _rows(tmp_path / "t")
    assert 2 <= len(kept) < 16 and len(set(kept)) == len(kept)
    da.close(), db.close()
    a.device.start(), b.device.start()  # the same ports
    adb_server.attach(a)
    rest = build_table("resnet20", [f"adb:{sa}"], table_dir=tmp_path / "t", **KW)
    assert rest.measured == 16 - len(kept) and rest.present == len(kept)
    keys = _rows(tmp_path / "t")
    assert len(keys) == len(set(keys)) == 16


@pytest.mark.slow
def test_phones_of_different_fingerprints_get_one_table_each(pool, tmp_path, caplog):
    (a, b, other), (sa, sb, so) = pool
    with caplog.at_level("WARNING", logger="latency_tables"):
        reports = build_tables("resnet20", [f"adb:{sa}", f"adb:{so}", f"adb:{sb}"], tables_dir=tmp_path / "tables",
                               **KW)
    assert "the devices disagree on the fingerprint: 2 tables" in caplog.text
    assert [r.measured for r in reports] == [16, 16]
    names = sorted(r.folder.name for r in reports)
    assert names[0].startswith("adb-amc-amc-other-phone") and names[1].startswith("adb-amc-amc-test-phone")
    assert set(TableStore(reports[0].folder).origins().values()) == {f"adb:{sa}", f"adb:{sb}"}
    assert set(TableStore(reports[1].folder).origins().values()) == {f"adb:{so}"}
    with pytest.raises(AmcError, match="cannot share a table with"):
        build_table("resnet20", [f"adb:{sa}", f"adb:{so}"], table_dir=tmp_path / "x", **KW)


@pytest.mark.slow
def test_the_cli_takes_several_devices(pool, tmp_path, capsys):
    from amc_mobile.cli import main

    (a, b, _), (sa, sb, _) = pool
    rc = main(["table", "build", "--model", "resnet20", "-d", f"adb:{sa}", "-d", f"adb:{sb}", "--grid", "64",
               "--coarse-step", "100", "--no-refine", "--no-calibrate", "--batch-size", "4", "--quiet",
               "--iterations", "3", "--warmup", "1", "--repeats", "1", "--min-time-ms", "0",
               "--tables-dir", str(tmp_path / "tables")])
    out = capsys.readouterr().out
    assert rc == 0 and "16 measured, 0 failed" in out, out
    # both phones did work, listed in the order they were named (not the order their batches finished)
    line = next(x for x in out.splitlines() if x.startswith("devices: "))
    assert [p.split()[0] for p in line[len("devices: "):].split(", ")] == [f"adb:{sa}", f"adb:{sb}"], line


@pytest.mark.slow
def test_a_table_built_on_one_phone_is_validated_on_another_of_its_model(pool, tmp_path, capsys):
    """The honest test of a per-model table: measured on A, its predictions checked on B."""
    from amc_mobile.cli import main

    (a, b, _), (sa, sb, so) = pool
    common = ["--model", "resnet20", "--tables-dir", str(tmp_path / "tables"), "--quiet", "--iterations", "3",
              "--warmup", "1", "--repeats", "1", "--min-time-ms", "0"]
    assert main(["table", "build", "-d", f"adb:{sa}", "--grid", "64", "--coarse-step", "100", "--no-refine",
                 "--no-calibrate", "--batch-size", "4", *common]) == 0
    capsys.readouterr()
    on_a = len(_asked(a))
    assert _asked(b) == []
    rc = main(["table", "validate", "-d", f"adb:{sb}", "-n", "2", "--passes", "1", "--out", str(tmp_path / "v"),
               *common])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert _asked(b) and len(_asked(a)) == on_a  # measured on B, against A's table
    with open(tmp_path / "v" / "samples.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
    # a phone of another model has no table to validate
    assert main(["table", "validate", "-d", f"adb:{so}", "-n", "2", "--passes", "1", "--out",
                 str(tmp_path / "v2"), *common]) == 2
    assert "no latency table for this device configuration" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_measures_several_phones_in_parallel(pool, tmp_path):
    """Each phone's runner waits before its first model until BOTH phones have started one: measured one
    phone after the other, the first would time out (30 s) and its cell fail."""
    import threading
    import time

    from amc_mobile.compare import run_compare

    from test_adb_device import _mode

    (a, b, _), (sa, sb, _) = pool
    for p in (a, b):
        _mode(p, "wait:m0")

    def release() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if all(any("et_bench --model_path" in c.command for c in p.commands) for p in (a, b)):
                for p in (a, b):
                    p.phone_path("/data/local/tmp/amc_mobile/go").write_text("")
                return
            time.sleep(0.05)

    threading.Thread(target=release, daemon=True).start()
    res = run_compare(["resnet20", "resnet20"], [f"adb:{sa}?timeout_s=30", f"adb:{sb}?timeout_s=30"], CFG,
                      out=tmp_path / "c", labels=["a", "b"], report=False, log=None)
    assert res.exit_code == 0, [(c.device, c.error) for d in res.devices for c in d.cells]
    assert [d.uri for d in res.devices] == [f"adb:{sa}?timeout_s=30", f"adb:{sb}?timeout_s=30"]
    assert all(c.status == "ok" for d in res.devices for c in d.cells)
    assert all("shell,v2" in c.service for p in (a, b) for c in p.commands)
