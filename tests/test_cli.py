"""The `amc-mobile` entry point itself: -v shows what the one-line errors hide."""

from __future__ import annotations

import logging

import pytest

from amc_mobile.cli import main
from amc_mobile.errors import AmcError


def test_verbose_raises_with_the_traceback_and_keeps_library_logs(tmp_path, capsys, monkeypatch):
    torch_log, root = logging.getLogger("torch"), logging.getLogger()
    monkeypatch.setattr(torch_log, "level", logging.NOTSET)  # restored afterwards
    monkeypatch.setattr(root, "level", logging.WARNING)
    argv = ["table", "show", "--model", "resnet20", "--tables-dir", str(tmp_path)]
    with pytest.raises(AmcError, match="no latency table"):  # the whole exception, traceback and all
        main(["-v", *argv])
    assert (torch_log.level, root.level) == (logging.NOTSET, logging.WARNING)  # nothing silenced
    assert main(["--verbose", "devices"]) == 0 and torch_log.level == logging.NOTSET
    capsys.readouterr()
    # without -v: one line, exit 2, and the libraries' chatter is turned down
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("amc-mobile: error: no latency table") and err.count("\n") == 1
    assert (torch_log.level, root.level) == (logging.ERROR, logging.ERROR)


@pytest.mark.parametrize("argv", [["-v", "table", "show"], ["table", "show", "-v"], ["table", "-v", "show"]])
def test_verbose_before_or_after_the_subcommand(tmp_path, argv, monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    with pytest.raises(AmcError, match="no latency table"):  # -v: the exception itself, wherever it stands
        main([*argv, "--model", "resnet20", "--tables-dir", str(tmp_path)])


def _parsed(argv):
    from amc_mobile.cli import build_parser

    return build_parser().parse_args(argv)


@pytest.mark.parametrize("command", [["devices"], ["bench", "-m", "resnet20"], ["search"], ["compare", "resnet20"],
                                     ["table", "build", "-m", "resnet20"], ["inspect", "resnet20"],
                                     ["report", "runs/x"], ["finetune", "runs/x"], ["train"]])
def test_quiet_and_verbose_are_accepted_by_every_subcommand(command):
    for argv in (["-q", *command], [*command, "-q"], [*command, "--quiet", "--verbose"]):
        args = _parsed(argv)
        assert args.quiet is True
    assert _parsed(command).quiet is False and _parsed(command).verbose is False
    assert _parsed(["-q", "-v", *command]).verbose is True  # a subcommand's default does not reset it


def test_quiet_turns_the_search_progress_bar_off():
    from amc_mobile.cli.search import config_from_args

    assert config_from_args(_parsed(["search", "-q"])).progress is False
    assert config_from_args(_parsed(["search"])).progress is True
    assert config_from_args(_parsed(["search", "-q", "--progress"])).progress is True  # said explicitly


def test_devices_json(capsys):
    import json

    assert main(["devices", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert {"uri": "local"}.items() <= found[0].items() and found[0]["description"]
