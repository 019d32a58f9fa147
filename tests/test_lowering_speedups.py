"""The exporter speed-ups in device/lowering.py replace torch internals only while we lower, and
change nothing in what is lowered."""

import torch
import torch._ops as ops
from torch import nn

import device.lowering as lowering
from device.base import Candidate, example_input


def _stock():
    import torch._export.utils as utils

    return ops.OperatorBase.py_impl, utils._collect_all_valid_cia_ops


def test_torch_is_stock_outside_lowering_and_restored_after_an_error():
    before = _stock()
    with lowering.exporter_speedups():
        if lowering.speedups_apply():
            assert ops.OperatorBase.py_impl is lowering._py_impl_without_runtime_annotations
            assert _stock()[1] is not before[1]
        with lowering.exporter_speedups():  # re-entrant: the inner exit restores nothing yet
            pass
        if lowering.speedups_apply():
            assert ops.OperatorBase.py_impl is lowering._py_impl_without_runtime_annotations
    assert _stock() == before
    try:
        with lowering.exporter_speedups():
            raise RuntimeError("lowering failed")
    except RuntimeError:
        pass
    assert _stock() == before


def test_only_the_torch_they_were_read_from(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.14.0")
    before = _stock()
    with lowering.exporter_speedups():
        assert _stock() == before


def test_same_pte_bytes_with_and_without(tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    cand = [Candidate("m", module, example_input((3, 8, 8)))]
    lowering.lower_to_pte(cand, tmp_path / "fast.pte", shared=False)
    monkeypatch.setattr(lowering, "speedups_apply", lambda: False)
    lowering.lower_to_pte(cand, tmp_path / "stock.pte", shared=False)
    assert (tmp_path / "fast.pte").read_bytes() == (tmp_path / "stock.pte").read_bytes()
