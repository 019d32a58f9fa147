"""Shared lowering (device/shared_lowering.py): one ExecuTorch lowering for a whole batch, split into
one method per candidate. It must give the same program as lowering the methods one by one: same
method names, same outputs bit for bit, and fall back whenever a batch does not split cleanly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from device.base import Candidate
from device.lowering import lower_to_pte
from device.shared_lowering import lower_shared, worth_sharing
from latency_tables.units import UnitSpec

pytestmark = pytest.mark.slow

# one unit of every kind a latency table holds, as MobileNet-V2, ResNet-20 and VGG-16 produce them
SPECS = {
    "conv": UnitSpec("conv", 14, 14, 16, 24, 3, 1, 1, 1, "relu6"),
    "pw": UnitSpec("conv", 7, 7, 40, 64, 1, 1, 0, 1, "none"),
    "dwconv": UnitSpec("dwconv", 14, 14, 24, 24, 3, 2, 1, 24, "relu6"),
    "add": UnitSpec("add", 14, 14, 24, 24, 1, 1, 0, 1, "relu"),
    "gap": UnitSpec("pool", 4, 4, 64, 64, 0, 1, 0, 1, "none"),
    "maxpool": UnitSpec("pool", 8, 8, 16, 16, 2, 2, 0, 1, "none"),
    "linear": UnitSpec("linear", 1, 1, 64, 10, 1, 1, 0, 1, "none"),
}


def _candidates() -> list[Candidate]:
    return [Candidate(name, *spec.build(seed=i)) for i, (name, spec) in enumerate(SPECS.items())]


def _outputs(pte_bytes: bytes, cands: list[Candidate]) -> dict[str, torch.Tensor]:
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(pte_bytes)
    assert sorted(program.method_names) == sorted(c.name for c in cands)
    return {c.name: program.load_method(c.name).execute([c.example_input])[0] for c in cands}


def test_every_unit_kind_splits_into_its_own_method(tmp_path):
    cands = _candidates()
    shared = lower_shared(cands)
    assert shared is not None, "a batch of plain units must take the shared path"
    assert lower_to_pte(cands, tmp_path / "one_by_one.pte", shared=False) == {}
    got = _outputs(shared, cands)
    want = _outputs((tmp_path / "one_by_one.pte").read_bytes(), cands)
    for c in cands:
        # the same XNNPACK blob either way: not close, identical
        assert torch.equal(got[c.name], want[c.name]), c.name
        with torch.no_grad():
            torch.testing.assert_close(got[c.name], c.module(c.example_input), rtol=1e-4, atol=1e-4)


def test_chunks_give_the_same_program(tmp_path):
    cands = _candidates()
    assert lower_to_pte(cands, tmp_path / "one_by_one.pte", shared=False) == {}
    # 7 units in chunks of 3, 3 and 1: each chunk lowered on its own, all methods in one .pte
    got = _outputs(lower_shared(cands, chunk=3), cands)
    want = _outputs((tmp_path / "one_by_one.pte").read_bytes(), cands)
    assert all(torch.equal(got[c.name], want[c.name]) for c in cands)


def test_only_small_units_are_combined():
    from amc_mobile.models import build_model

    units = _candidates()
    assert worth_sharing(units[:2]) and not worth_sharing(units[:1])
    model = build_model("resnet20")
    whole = Candidate("resnet20", model, torch.randn(1, 1, 28, 28))
    assert not worth_sharing(units[:2] + [whole])  # whole models lower faster one per program


def test_lower_to_pte_uses_it_and_writes_the_same_methods(tmp_path):
    cands = _candidates()[:3]
    assert lower_to_pte(cands, tmp_path / "b.pte") == {}
    assert (tmp_path / "b.pte").read_bytes() == lower_shared(cands)  # deterministic, and what it wrote


class _CumSum(nn.Module):
    """An op XNNPACK does not take: this branch is not one delegate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return torch.cumsum(self.conv(x), dim=1)


class _NoExport(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return x
        return -x


def test_a_branch_that_is_not_one_delegate_falls_back(tmp_path):
    cands = _candidates()[:2] + [Candidate("cumsum", _CumSum().eval(), torch.randn(1, 8, 6, 6))]
    assert lower_shared(cands) is None
    assert lower_to_pte(cands, tmp_path / "mixed.pte") == {}
    got = _outputs((tmp_path / "mixed.pte").read_bytes(), cands)
    with torch.no_grad():
        torch.testing.assert_close(got["cumsum"], cands[2].module(cands[2].example_input), rtol=1e-4, atol=1e-4)


def test_shared_parameters_fall_back(tmp_path):
    module, x = SPECS["conv"].build()
    cands = [Candidate("a", module, x), Candidate("b", module, x.clone())]  # one module, two methods
    assert lower_shared(cands) is None
    assert lower_to_pte(cands, tmp_path / "twice.pte") == {}
    got = _outputs((tmp_path / "twice.pte").read_bytes(), cands)
    assert torch.equal(got["a"], got["b"])


def test_a_candidate_that_does_not_export_is_named_and_the_rest_kept(tmp_path):
    cands = _candidates()[:2] + [Candidate("bad", _NoExport(), torch.randn(1, 4))]
    failed = lower_to_pte(cands, tmp_path / "p.pte")
    assert list(failed) == ["bad"] and "does not export" in failed["bad"]
    _outputs((tmp_path / "p.pte").read_bytes(), cands[:2])
