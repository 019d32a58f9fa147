"""The retry rules of device/runner_driver.py, shared by `local` and `adb`.

`invoke` is scripted: each step checks what the driver asked to run and answers with the
`RunResult` that `device.runner` makes of et_bench's own output (JSON lines on stdout in the
format tests/test_runner.py checks, a one-line stderr error, an exit code), so these are tests
of the driver's decisions on real runner results, not a stand-in for the runner.
"""

from __future__ import annotations

import json

import pytest

from device import MeasureConfig
from device.errors import AmcError
from device.runner import EXIT_EXEC, EXIT_LOAD, EXIT_USAGE, RunResult, failed_method, parse_output, runner_error
from device.runner_driver import MethodResults, RunnerDriver


def line(method: str, us: list[float], **extra) -> str:
    rec = {"method": method, "iterations_us": us, "load_ms": 1.5, "threads": 1, "affinity": None, "warmup": 1,
           "runtime_version": "1.4.1", **extra}
    return json.dumps(rec) + "\n"


def result(stdout: str = "", returncode: int | None = 0, stderr: str = "") -> RunResult:
    """What et_bench's output reads as (run_runner's rules; None: killed after a timeout)."""
    records = parse_output(stdout)
    if returncode is None:
        return RunResult(records, None, AmcError("et_bench did not finish within 9s and was killed"), stderr)
    if returncode == 0:
        return RunResult(records, 0, None, stderr)
    culprit = failed_method(stdout)
    return RunResult(records, returncode, runner_error(returncode, stderr), stderr, culprit[0] if culprit else None)


class Script:
    """invoke(todo, config): checks each call against the next step and answers its result."""

    def __init__(self, *steps: tuple[list[str], RunResult]):
        self.steps = list(steps)
        self.configs: list[MeasureConfig] = []

    def __call__(self, todo: list[str], config: MeasureConfig) -> RunResult:
        assert self.steps, f"an invocation more than scripted: {todo}"
        want, res = self.steps.pop(0)
        assert todo == want
        self.configs.append(config)
        return res


def drive(names, config, script, where=""):
    ticks: list[int] = []
    driver = RunnerDriver(MethodResults(config.repeats, ticks.append), config, where=where)
    out = driver.run(names, script)
    assert not script.steps, "scripted invocations left over"
    return out, driver, ticks


def test_a_crash_keeps_earlier_methods_and_restarts_after_the_culprit():
    script = Script(
        (["a", "b", "c"], result(line("a", [10.0, 20.0]), EXIT_EXEC, "method b: execution failed (0x12)\n")),
        (["c"], result(line("c", [30.0]))),
    )
    out, driver, ticks = drive(["a", "b", "c"], MeasureConfig(), script)
    assert out["a"].ok and out["a"].n == 2 and out["c"].ok
    assert not out["b"].ok and out["b"].error == "et_bench failed on 'b': method b: execution failed (0x12)"
    assert len(ticks) == 3 and driver.reference_error is None


def test_repeats_pool_and_a_failed_method_is_not_run_again():
    script = Script(
        (["a", "b"], result(line("a", [10.0]), EXIT_EXEC, "method b: boom\n")),
        (["a"], result(line("a", [12.0, 14.0]))),
    )
    out, _, ticks = drive(["a", "b"], MeasureConfig(repeats=2), script)
    assert out["a"].n == 3 and not out["b"].ok
    assert len(ticks) == 2  # a once, when its last repeat is in; b once, when it failed


def test_an_interleaved_run_names_its_culprit():
    stdout = line("a", [1.0]) + json.dumps({"failed_method": "c", "error": "boom"}) + "\n"
    script = Script(
        (["a", "b", "c", "d"], result(stdout, EXIT_EXEC, "method c: boom\n")),
        (["b", "d"], result(line("b", [2.0]) + line("d", [3.0]))),
    )
    out, _, _ = drive(["a", "b", "c", "d"], MeasureConfig(interleave=True), script)
    assert [n for n, s in out.items() if not s.ok] == ["c"]


def test_a_failing_reference_is_dropped_and_the_rest_measured_without_it():
    stdout = json.dumps({"failed_method": "ref", "error": "boom"}) + "\n"
    script = Script(
        (["a", "ref", "c"], result(stdout, EXIT_EXEC, "method ref: boom\n")),
        (["a", "c"], result(line("a", [1.0]) + line("c", [2.0]))),
    )
    out, driver, ticks = drive(["a", "ref", "c"], MeasureConfig(reference="ref"), script, where=" on adb:X")
    assert script.configs[0].reference == "ref" and script.configs[1].reference is None
    assert out["a"].ok and out["c"].ok and not out["ref"].ok and len(ticks) == 3
    assert driver.reference_error.startswith("the drift reference 'ref' failed on adb:X (method ref: boom)")


def test_a_reference_not_asked_for_as_a_method_is_only_dropped():
    stdout = json.dumps({"failed_method": "ref", "error": "boom"}) + "\n"
    script = Script(
        (["a", "b"], result(stdout, EXIT_EXEC, "method ref: boom\n")),
        (["a", "b"], result(line("a", [1.0]) + line("b", [2.0]))),
    )
    out, driver, _ = drive(["a", "b"], MeasureConfig(reference="ref"), script)
    assert all(s.ok for s in out.values()) and "'ref'" in driver.reference_error


def test_bad_arguments_raise():
    script = Script((["a"], result("", EXIT_USAGE, "--affinity mask selects no CPU: '0'\n")))
    with pytest.raises(AmcError, match="selects no CPU"):
        drive(["a"], MeasureConfig(), script)


def test_a_program_that_does_not_load_fails_every_method():
    script = Script((["a", "b"], result("", EXIT_LOAD, "cannot load program x.pte: InvalidProgram (not a valid .pte?)\n")))
    out, _, ticks = drive(["a", "b"], MeasureConfig(repeats=3), script)
    assert all(not s.ok and "cannot load program" in s.error for s in out.values()) and len(ticks) == 2


def test_a_second_timeout_in_a_row_that_finishes_nothing_gives_up_on_the_rest():
    script = Script(
        (["a", "b", "c", "d", "e"], result(line("a", [1.0]), None)),  # a done, b hung
        (["c", "d", "e"], result("", None)),  # c hung, nothing done: the runner keeps hanging
    )
    out, _, ticks = drive(["a", "b", "c", "d", "e"], MeasureConfig(), script)
    assert out["a"].ok and "did not finish" in out["b"].error and "did not finish" in out["c"].error
    assert all(out[n].error.startswith("not measured: et_bench keeps timing out") for n in "de")
    assert len(ticks) == 5


def test_a_timeout_after_a_crash_is_not_a_second_in_a_row():
    script = Script(
        (["a", "b", "c"], result("", None)),  # a hung
        (["b", "c"], result("", EXIT_EXEC, "method b: boom\n")),
        (["c"], result("", None)),  # c hung: the last try, not given up on the way
    )
    out, _, _ = drive(["a", "b", "c"], MeasureConfig(), script)
    assert "did not finish" in out["a"].error and "boom" in out["b"].error and "did not finish" in out["c"].error


def test_exit_0_without_every_method_is_an_error():
    script = Script((["a", "b"], result(line("a", [1.0]))))
    with pytest.raises(AmcError, match="et_bench on adb:X exited 0 but did not report b"):
        drive(["a", "b"], MeasureConfig(), script, where=" on adb:X")


def test_streamed_records_are_complete_before_the_invocation_ends_and_count_once():
    results = MethodResults(1)
    driver = RunnerDriver(results, MeasureConfig())
    out_a = line("a", [1.0, 2.0])

    def invoke(todo, config):
        driver.record(parse_output(out_a))  # a poll while the runner runs
        assert results.complete["a"].n == 2  # persisted by a caller that loses the connection now
        driver.record(parse_output(out_a))  # the same line in the next poll
        return result(out_a + line("b", [3.0]))

    out = driver.run(["a", "b"], invoke)
    assert out["a"].n == 2 and out["b"].n == 1 and results.runtime_version == "1.4.1"
