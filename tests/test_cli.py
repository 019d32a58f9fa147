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
