"""The Python entry points: the README's example runs as written there; data in the forms users have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from amc_mobile.api import as_split
from amc_mobile.data import Split
from amc_mobile.errors import AmcError

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- python-api-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "the README lost its Python example"
    return m.group(1)


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AMC_TABLES_DIR", str(tmp_path / "tables"))
    monkeypatch.setenv("AMC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(_readme_example(), str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "x the original's latency" in out and "ms on local" in out
    result = namespace["result"]
    assert result.run_dir.is_dir() and (result.run_dir / "data.json").is_file()
    assert result.measured_ratio is not None and result.pruned_ms > 0
    assert "held out" in (result.run_dir / "data.json").read_text()
    x = torch.zeros(1, 1, 28, 28)
    assert result.model(x).shape == (1, 10)


def test_data_in_the_forms_users_have():
    images, labels = torch.randn(12, 1, 4, 4), torch.arange(12) % 3
    a = as_split((images, labels))
    b = as_split([(images[i], int(labels[i])) for i in range(12)])
    torch.testing.assert_close(a.images, b.images)
    assert isinstance(a, Split) and a.labels.dtype == torch.int64
    with pytest.raises(AmcError, match="empty"):
        as_split([])
    with pytest.raises(AmcError, match="NaN"):
        as_split((torch.full((2, 1, 2, 2), float("nan")), torch.zeros(2)))
    with pytest.raises(AmcError, match="3 images but 2 labels"):
        as_split((torch.zeros(3, 1, 2, 2), torch.zeros(2)))
    with pytest.raises(AmcError, match="expected a Split"):
        as_split(5)
