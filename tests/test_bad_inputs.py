"""Every bad input is a one-line error and a non-zero exit, never a traceback (issue 18).

One parametrised test runs the real CLI (`main(argv)` in this process, as the other CLI tests do)
over a corpus of bad inputs: every file the CLI reads missing, empty, a folder, of the wrong JSON
type, truncated or from another version; every number NaN, infinite, zero or negative. Each case
gives the command, the exit code, a fragment of the message (on the last line of stderr for an
error) and, where it matters, text that must NOT appear. Nearly every case fails before anything
is measured; the few that must measure (a program whose method names are empty or hold a comma,
locally and over ADB) run one tiny program for a few iterations and are marked `slow`.
"""

from __future__ import annotations

import json
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from amc_mobile.cli import main

REPO = Path(__file__).resolve().parent.parent
STORED_TABLE = next(p for p in (REPO / "latency_tables").iterdir() if (p / "meta.json").is_file())
FAST = ["--iterations", "3", "--warmup", "1", "--repeats", "1"]


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # "{d}" is the corpus folder, "{pte}" the awkward program, "{phone}" a test phone's URI
    code: int
    fragment: str  # in the last line of stderr (an error) or in stdout (exit 0 or 1)
    absent: tuple[str, ...] = ()  # must appear nowhere in the output
    env: dict = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # "pte", "phone", "unauthorised_phone"
    also: tuple[str, ...] = ()  # more fragments of stdout (exit 0 or 1)


def C(id, argv, code, fragment, absent=(), env=None, needs=(), also=()):
    return Case(id, tuple(argv.split()) if isinstance(argv, str) else tuple(argv), code, fragment, tuple(absent),
                env or {}, tuple(needs), tuple(also))


NAN = "is not a finite number"
CORPUS = [
    # 1 + 6: a legal program whose method names are empty or hold a comma; rows labelled by method
    C("pte-awkward-method-names-local", ["bench", "-m", "{pte}", *FAST], 0, 'awkward.pte:"a,b"', needs=("pte",),
      also=('awkward.pte:""', "awkward.pte:plain")),
    C("pte-awkward-method-names-adb", ["bench", "-m", "{pte}", "-d", "{phone}", *FAST], 0, 'awkward.pte:"a,b"',
      needs=("pte", "phone"), also=('awkward.pte:""', "awkward.pte:plain")),
    # 2: measure options
    C("bench-min-time-nan", "bench --min-time-ms nan", 2, NAN),
    C("bench-min-time-inf", "bench --min-time-ms inf", 2, NAN),
    C("bench-min-time-negative", "bench --min-time-ms -1", 2, "--min-time-ms must be between 0 and"),
    C("bench-min-time-huge", "bench --min-time-ms 2e9", 2, "--min-time-ms must be between 0 and"),
    C("bench-iterations-zero", "bench --iterations 0", 2, "--iterations and --repeats must be >= 1"),
    C("bench-repeats-negative", "bench --repeats -2", 2, "--iterations and --repeats must be >= 1"),
    C("bench-warmup-negative", "bench --warmup -1", 2, "--warmup >= 0"),
    C("bench-threads-zero", "bench --threads 0", 2, "--threads must be >= 1"),
    C("bench-affinity-zero", "bench --affinity 0", 2, "is not a non-zero hex CPU mask"),
    C("bench-iterations-not-a-number", "bench --iterations many", 2, "invalid int value: 'many'"),
    C("compare-min-time-nan", "compare mobilenet_v2 --min-time-ms nan", 2, NAN),
    C("compare-accuracy-images-zero", "compare mobilenet_v2 --accuracy-images 0", 2, "--accuracy-images must be >= 1"),
    # 3 + 4: table folders
    C("table-meta-list", "table show --no-model --table-dir {d}/t_meta_list", 2,
      "meta.json holds a list where an object belongs"),
    C("table-meta-null", "table show --no-model --table-dir {d}/t_meta_null", 2,
      "meta.json holds null where an object belongs"),
    C("table-meta-empty", "table show --no-model --table-dir {d}/t_meta_empty", 2, "meta.json is empty"),
    C("table-meta-folder", "table show --no-model --table-dir {d}/t_meta_folder", 2, "meta.json is a folder"),
    C("table-meta-truncated", "table show --no-model --table-dir {d}/t_meta_truncated", 2,
      "meta.json is not valid JSON"),
    C("table-meta-other-format", "table show --no-model --table-dir {d}/t_meta_format", 2, "format 99"),
    C("table-meta-fingerprint-null", "table show --no-model --table-dir {d}/t_meta_fingerprint", 2,
      "the fingerprint is not an object"),
    C("table-meta-builds-number", "table show --no-model --table-dir {d}/t_meta_builds", 2, "builds is not a list"),
    C("table-units-folder", "table show --no-model --table-dir {d}/t_units_folder", 2, "units.csv is a folder"),
    C("table-units-empty", "table show --no-model --table-dir {d}/t_units_empty", 2, "the header is missing"),
    C("table-units-truncated", "table show --no-model --table-dir {d}/t_units_truncated", 2, "truncated row"),
    C("table-units-other-version", "table show --no-model --table-dir {d}/t_units_header", 2, "unexpected header"),
    C("table-units-binary", "table show --no-model --table-dir {d}/t_units_binary", 2, "is not a text file"),
    C("table-calibration-folder", "table show --no-model --table-dir {d}/t_calibration_folder", 2,
      "calibration.csv is a folder"),
    C("table-failures-folder", "table show --no-model --table-dir {d}/t_failures_folder", 2, "failures.csv is a folder"),
    C("table-dir-missing", "table show --no-model --table-dir {d}/nowhere", 2, "meta.json is missing"),
    C("table-show-threads-zero", "table show --no-model --threads 0", 2, "--threads must be >= 1"),
    C("table-show-affinity-bad", "table show --no-model --affinity zz", 2, "is not a non-zero hex CPU mask"),
    C("table-plot-bad-regex", ["table", "plot", "--layers", "("], 2, "is not a regular expression"),
    C("table-calibrate-passes-zero", "table calibrate --passes 0", 2, "--passes must be >= 1"),
    # numbers of table build / validate: refused before any device work
    C("table-build-grid-zero", "table build --dry-run --grid 0", 2, "--grid must be >= 1"),
    C("table-build-coarse-step-zero", "table build --dry-run --coarse-step 0", 2, "--coarse-step must be >= 1"),
    C("table-build-tolerance-negative", "table build --dry-run --tolerance -1", 2, "--tolerance must be positive"),
    C("table-build-tolerance-nan", "table build --dry-run --tolerance nan", 2, NAN),
    C("table-build-batch-size-zero", "table build --batch-size 0", 2, "--batch-size must be >= 1"),
    C("table-build-workers-zero", "table build --workers 0", 2, "--workers must be >= 1"),
    C("table-build-max-configs-negative", "table build --max-configs -1", 2, "--max-configs must be >= 1"),
    C("table-build-budget-zero", "table build --budget-minutes 0", 2, "--budget-minutes must be positive"),
    C("table-build-budget-inf", "table build --budget-minutes inf", 2, NAN),
    C("table-build-calibration-variants-zero", "table build --calibration-variants 0", 2,
      "--calibration-variants must be >= 1"),
    C("table-build-min-time-inf", "table build --min-time-ms inf", 2, NAN),
    C("table-validate-samples-zero", "table validate --samples 0", 2, "--samples must be >= 1"),
    C("table-validate-passes-zero", "table validate --passes 0", 2, "--passes must be >= 1"),
    C("table-validate-batch-size-zero", "table validate --batch-size 0", 2, "--batch-size must be >= 1"),
    # 4: run folders
    C("report-run-json-folder", "report {d}/run_json_folder", 2, "run.json is a folder"),
    C("report-run-json-list", "report {d}/run_json_list", 2, "run.json holds a list where an object belongs"),
    C("report-run-json-empty", "report {d}/run_json_empty", 2, "run.json is empty"),
    C("report-run-json-truncated", "report {d}/run_json_truncated", 2, "run.json is not valid JSON"),
    C("report-not-a-folder", "report {d}/nowhere", 2, "is not a folder"),
    C("table-validate-samples-folder", "table validate -n 1 --allow-fingerprint-mismatch --table-dir {d}/t_ok "
      "--out {d}/validate_out", 2, "samples.csv is not a samples file"),
    C("search-plots-episodes-folder", "search-plots {d}/plots_episodes_folder", 2, "episodes.csv is a folder"),
    C("search-plots-best-policy-list", "search-plots {d}/plots_best_list", 2,
      "best_policy.json holds a list where an object belongs"),
    C("search-plots-bad-row", "search-plots {d}/plots_bad_row", 2, "episodes.csv line 2: not an episode row"),
    C("search-resume-config-list", "search --resume {d}/resume_list", 2,
      "config.json holds a list where an object belongs"),
    C("search-resume-config-folder", "search --resume {d}/resume_folder", 2, "config.json is a folder"),
    C("search-resume-config-truncated", "search --resume {d}/resume_truncated", 2, "config.json is not valid JSON"),
    C("search-resume-missing", "search --resume {d}/nowhere", 2, "not a search run folder"),
    # models the CLI reads
    C("bench-pruned-spec-list", "bench -m {d}/pruned_list", 2, "architecture.json holds a list"),
    C("bench-pruned-spec-folder", "bench -m {d}/pruned_folder", 2, "architecture.json is a folder"),
    C("bench-pruned-spec-other-version", "bench -m {d}/pruned_base", 2, "unknown model 'nosuch'"),
    C("bench-pruned-spec-bad-shape", "bench -m {d}/pruned_shape", 2, "bad shape for module 'stem.conv'"),
    C("bench-checkpoint-config-list", "bench -m {d}/checkpoint_list", 2, "no model config in it"),
    C("bench-checkpoint-config-folder", "bench -m {d}/checkpoint_folder", 2, "unreadable checkpoint config"),
    C("bench-pte-empty", "bench -m {d}/empty.pte", 2, "is not an ExecuTorch program (.pte): bad header"),
    C("finetune-pruned-spec-list", "finetune {d}/pruned_list", 2, "architecture.json holds a list"),
    # numbers of search, baseline, train, finetune, demo
    C("search-target-zero", "search --target 0", 2, "--target must be a fraction in (0, 1]"),
    C("search-target-nan", "search --target nan", 2, NAN),
    C("search-tau-zero", "search --tau 0", 2, "--tau must be in (0, 1]"),
    C("search-discount-negative", "search --discount -1", 2, "--discount must be in [0, 1]"),
    C("search-lr-actor-negative", "search --lr-actor -1", 2, "--lr-actor, --lr-critic and --init-w must be positive"),
    C("search-hidden-zero", "search --hidden1 0", 2, "must be at least 1"),
    C("search-noise-negative", "search --init-noise -0.5", 2, "--init-noise must be >= 0"),
    C("search-threads-zero", "search --threads 0", 2, "--threads must be >= 1"),
    C("search-checkpoint-every-negative", "search --checkpoint-every -1", 2, "--checkpoint-every must be >= 0"),
    C("baseline-tolerance-nan", "baseline uniform --tolerance nan", 2, NAN),
    C("baseline-tolerance-zero", "baseline uniform --tolerance 0", 2, "--tolerance must be positive"),
    C("train-lr-nan", "train --lr nan", 2, NAN),
    C("train-stem-stride-zero", "train -m mobilenet_v2 --stem-stride 0", 2, "--stem-stride must be >= 1"),
    C("train-weight-decay-negative", "train --weight-decay -1", 2, "--weight-decay must be >= 0"),
    C("train-label-smoothing-one", "train --label-smoothing 1", 2, "--label-smoothing must be below 1"),
    C("train-train-limit-zero", "train --train-limit 0", 2, "--train-limit must be >= 1"),
    C("finetune-lr-inf", "finetune {d}/pruned_list --lr inf", 2, NAN),
    C("search-seed-negative", "search --seed -1", 2, "argument --seed: -1 is not between 0 and 4294967295"),
    C("table-validate-seed-huge", "table validate --seed 4294967296", 2, "is not between 0 and"),
    C("train-seed-negative", "train --seed -5", 2, "is not between 0 and"),
    C("demo-target-zero", "demo --target 0", 2, "--target must be a fraction in (0, 1]"),
    C("demo-budget-negative", "demo --table-budget-minutes -1", 2, "--table-budget-minutes must be positive"),
    C("demo-finetune-epochs-zero", "demo --finetune-epochs 0", 2, "--finetune-epochs must be at least 1"),
    # 5: devices named in AMC_ADB_TCP; device URIs
    C("devices-bad-adb-tcp-entry", "devices", 2, "bad AMC_ADB_TCP entry 'host:notaport': expected HOST:PORT",
      absent=("timeout_s",), env={"AMC_ADB_TCP": "host:notaport,127.0.0.1:1"}),
    C("devices-unreachable-phone-listed", "devices", 0, "adb-tcp:127.0.0.1:1  cannot reach adb-tcp:127.0.0.1:1",
      absent=("timeout_s",), env={"AMC_ADB_TCP": "127.0.0.1:1"}),
    C("devices-adb-tcp-option-nan", "devices", 2, "must be a positive number",
      env={"AMC_ADB_TCP": "127.0.0.1:1?connect_timeout_s=nan"}),
    C("device-info-port-zero", "device-info adb-tcp:127.0.0.1:0", 2, "expected 1..65535"),
    C("device-info-timeout-negative", "device-info adb-tcp:127.0.0.1:1?timeout_s=-1", 2, "must be a positive number"),
    C("device-info-unknown-scheme", "device-info phone:1", 2, "unknown device URI"),
    C("device-info-cuda-batch-nan", "device-info cuda:0?batch=nan", 2, "must be a whole number"),
    C("device-info-adb-key-is-a-folder", "device-info adb-tcp:127.0.0.1:1", 2, "cannot create an ADB key at",
      env={"HOME": "{d}/home_key_folder", "ANDROID_USER_HOME": "{d}/home_key_folder/.android"}),
    # 7: the authorisation prompt of a TCP phone does not speak of USB
    C("device-info-tcp-unauthorised", ["device-info", "{phone}?auth_timeout_s=1"], 2,
      "accept the debugging prompt on the phone's screen", absent=("USB",), needs=("unauthorised_phone",)),
    # output folders that cannot be made
    C("table-build-table-dir-is-a-file", "table build --no-calibrate --table-dir {d}/a_file", 2,
      "cannot make the table folder"),
    C("train-out-is-a-file", "train --epochs 1 --out {d}/a_file", 2, "cannot make the checkpoint folder"),
    C("compare-out-is-a-file", "compare mobilenet_v2 --out {d}/a_file/run", 2, "cannot make the run folder"),
    C("search-out-is-a-file", "search --cost flops --out {d}/a_file", 2, "cannot make the run folder"),
    C("runner-env-is-a-folder", "bench --iterations 1", 2, "AMC_ET_BENCH=", env={"AMC_ET_BENCH": "{d}"}),
]


def _copy_table(root: Path, name: str) -> Path:
    dst = root / name
    shutil.copytree(STORED_TABLE, dst)
    return dst


def _edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


def _folder_instead(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The bad files, made once: tables copied from the stored one and broken, run folders, models."""
    d = tmp_path_factory.mktemp("bad-inputs")
    (_copy_table(d, "t_meta_list") / "meta.json").write_text("[]")
    (_copy_table(d, "t_meta_null") / "meta.json").write_text("null")
    (_copy_table(d, "t_meta_empty") / "meta.json").write_text("")
    _folder_instead(_copy_table(d, "t_meta_folder") / "meta.json")
    meta = (STORED_TABLE / "meta.json").read_text()
    (_copy_table(d, "t_meta_truncated") / "meta.json").write_text(meta[: len(meta) // 2])
    _edit_meta(_copy_table(d, "t_meta_format"), format=99)
    _edit_meta(_copy_table(d, "t_meta_fingerprint"), fingerprint=None)
    _edit_meta(_copy_table(d, "t_meta_builds"), builds=3)
    _folder_instead(_copy_table(d, "t_units_folder") / "units.csv")
    (_copy_table(d, "t_units_empty") / "units.csv").write_text("")
    units = (STORED_TABLE / "units.csv").read_text()
    (_copy_table(d, "t_units_truncated") / "units.csv").write_text(units[:3001])
    (_copy_table(d, "t_units_header") / "units.csv").write_text("key,kind,latency\nx,conv,1.0\n")
    (_copy_table(d, "t_units_binary") / "units.csv").write_bytes(b"\xff\xfe\x00binary\n")
    _folder_instead(_copy_table(d, "t_calibration_folder") / "calibration.csv")
    _folder_instead(_copy_table(d, "t_failures_folder") / "failures.csv")

    for name, text in {"run_json_list": "[1]", "run_json_empty": "", "run_json_truncated": '{"kind": "sea'}.items():
        (d / name).mkdir()
        (d / name / "run.json").write_text(text)
    (d / "run_json_folder" / "run.json").mkdir(parents=True)

    (d / "plots_episodes_folder" / "episodes.csv").mkdir(parents=True)
    (d / "plots_episodes_folder" / "best_policy.json").write_text("{}")
    (d / "plots_best_list").mkdir()
    (d / "plots_best_list" / "episodes.csv").write_text("episode,reward\n1,0.5\n")
    (d / "plots_best_list" / "best_policy.json").write_text("[3]")
    (d / "plots_bad_row").mkdir()
    (d / "plots_bad_row" / "episodes.csv").write_text("episode,reward,channels\nxx,0.5,{}\n")
    (d / "plots_bad_row" / "best_policy.json").write_text("{}")
    for name, text in {"resume_list": "[]", "resume_truncated": '{"mod'}.items():
        (d / name).mkdir()
        (d / name / "config.json").write_text(text)
    (d / "resume_folder" / "config.json").mkdir(parents=True)

    specs = {"pruned_list": "[1, 2]", "pruned_base": json.dumps({"base_model": {"name": "nosuch"}, "modules": {}}),
             "pruned_shape": json.dumps({"base_model": {"name": "resnet20"}, "modules": {"stem.conv": {"in": 3}}})}
    for name, text in specs.items():
        (d / name).mkdir()
        (d / name / "architecture.json").write_text(text)
        (d / name / "model.pt").write_bytes(b"")
    (d / "pruned_folder" / "architecture.json").mkdir(parents=True)
    (d / "pruned_folder" / "model.pt").write_bytes(b"")
    (d / "checkpoint_list").mkdir()
    (d / "checkpoint_list" / "config.json").write_text("[]")
    (d / "checkpoint_list" / "model.pt").write_bytes(b"x")
    (d / "checkpoint_folder" / "config.json").mkdir(parents=True)
    (d / "checkpoint_folder" / "model.pt").write_bytes(b"x")
    (d / "empty.pte").write_bytes(b"")
    (d / "a_file").write_text("not a folder\n")
    (d / "home_key_folder" / ".android" / "adbkey").mkdir(parents=True)
    _copy_table(d, "t_ok")
    (d / "validate_out" / "samples.csv").mkdir(parents=True)
    return d


@pytest.fixture(scope="module")
def awkward_pte(tmp_path_factory) -> Path:
    """A legal program with methods named "", "a,b" and "plain" (our own lowering only makes identifiers)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    class Tiny(torch.nn.Module):
        def __init__(self, n: int):
            super().__init__()
            self.fc = torch.nn.Linear(8, n)

        def forward(self, x):
            return self.fc(x).relu()

    programs = {name: torch.export.export(Tiny(4 + i), (torch.randn(1, 8),))
                for i, name in enumerate(("", "a,b", "plain"))}
    program = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()]).to_executorch()
    path = tmp_path_factory.mktemp("awkward") / "awkward.pte"
    path.write_bytes(program.buffer)
    return path


def _fill(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def _param(case: Case):
    # Lowering the awkward program takes seconds: like every lowering test, it is `slow`.
    return pytest.param(case, id=case.id, marks=[pytest.mark.slow] if "pte" in case.needs else [])


@pytest.mark.parametrize("case", [_param(c) for c in CORPUS])
def test_bad_input_is_one_line_and_a_clear_exit(case, corpus, request, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AMC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("AMC_TABLES_DIR", str(tmp_path / "tables"))
    monkeypatch.delenv("AMC_ADB_TCP", raising=False)
    values = {"d": str(corpus)}
    if "pte" in case.needs:
        values["pte"] = str(request.getfixturevalue("awkward_pte"))
    if "phone" in case.needs or "unauthorised_phone" in case.needs:
        from device.runner import find_runner

        request.getfixturevalue("adb_home")
        make = request.getfixturevalue("adb_test_device_factory")
        # An x86_64 "phone" runs the host runner (the one this machine's tests use), pushed by sha256.
        monkeypatch.setenv("AMC_ANDROID_RUNNER", str(find_runner()))
        cool = [("cpu-0-0", 38_000), ("battery", 31_000)]
        if "unauthorised_phone" in case.needs:
            from conftest_adb import make_adb_key

            other = make_adb_key(tmp_path / "other").public_key
            phone = make(authorized_keys=[other], thermal_zones=cool)
        else:
            phone = make(props={"ro.product.cpu.abi": "x86_64"}, thermal_zones=cool)
        values["phone"] = phone.uri
    for key, value in case.env.items():
        monkeypatch.setenv(key, _fill(value, values))
    argv = [_fill(a, values) for a in case.argv]

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    except Exception:
        pytest.fail(f"{argv} raised instead of a one-line error:\n{traceback.format_exc()}")
    out, err = capsys.readouterr()
    assert code == case.code, f"exit {code}, expected {case.code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in out + err
    if case.code == 2:
        last = err.strip().splitlines()[-1]
        assert case.fragment in last, f"{case.fragment!r} not in the last stderr line {last!r}"
        assert last.startswith("amc-mobile"), last  # ours (AmcError) or argparse's, one line with the program name
    else:
        for text in (case.fragment, *case.also):
            assert text in out, out
    for text in case.absent:
        assert text not in out + err, f"{text!r} in the output:\n{out}\n{err}"
