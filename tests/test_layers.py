"""The three packages import in one direction: device <- latency_tables <- amc_mobile. An upward
import (also one inside a function) fails here with the file and line."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the packages above it, which it must not import
ABOVE = {"device": ("latency_tables", "amc_mobile"), "latency_tables": ("amc_mobile",)}


def upward_imports(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] in ABOVE[package]:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_no_upward_imports(package):
    assert upward_imports(package) == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "x.py").write_text("def f():\n    from amc_mobile.errors import AmcError\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert upward_imports("device") == ["device/x.py:2: imports amc_mobile.errors"]
