"""XNNPACK's delegate passes run once per batch (device/merged_preprocess.py) instead of once per
unit. The `.pte` must be the same, byte for byte, as with XNNPACK's per-partition preprocessing,
and anything the merge cannot handle must go XNNPACK's own way."""

from __future__ import annotations

import pytest
import torch
from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

from device.base import Candidate
from device.merged_preprocess import _merge, merged_passes
from device.shared_lowering import lower_shared
from latency_tables.units import UnitSpec

pytestmark = pytest.mark.slow

# every unit kind and activation a table holds, with odd channel counts and strides among them
SPECS = [
    UnitSpec("conv", 14, 14, 16, 24, 3, 1, 1, 1, "relu6"),
    UnitSpec("conv", 7, 7, 40, 64, 1, 1, 0, 1, "none"),
    UnitSpec("conv", 9, 9, 13, 21, 3, 2, 1, 1, "relu"),
    UnitSpec("conv", 8, 8, 16, 16, 3, 1, 1, 1, "hardswish"),
    UnitSpec("dwconv", 14, 14, 24, 24, 3, 2, 1, 24, "relu6"),
    UnitSpec("dwconv", 7, 7, 40, 40, 5, 1, 2, 40, "hardswish"),
    UnitSpec("add", 14, 14, 24, 24, 1, 1, 0, 1, "relu"),
    UnitSpec("add", 7, 7, 32, 32, 1, 1, 0, 1, "none"),
    UnitSpec("pool", 4, 4, 64, 64, 0, 1, 0, 1, "none"),
    UnitSpec("pool", 8, 8, 16, 16, 2, 2, 0, 1, "none"),
    UnitSpec("linear", 1, 1, 64, 10, 1, 1, 0, 1, "none"),
    UnitSpec("linear", 1, 1, 24, 8, 1, 1, 0, 1, "relu"),
]


def _candidates(specs=SPECS) -> list[Candidate]:
    return [Candidate(f"u{i}", *spec.build(seed=i)) for i, spec in enumerate(specs)]


def test_same_pte_bytes_as_per_partition_passes():
    cands = _candidates()
    merged = lower_shared(cands)
    per_partition = lower_shared(cands, merge_passes=False)
    assert merged is not None and per_partition is not None
    assert merged == per_partition


def test_merged_passes_really_run_once(monkeypatch):
    """The merge is taken, not silently fallen back from: XNNPACK's pass manager runs once per chunk."""
    import executorch.backends.xnnpack._passes as passes

    runs = []
    original = passes.XNNPACKPassManager.transform
    monkeypatch.setattr(passes.XNNPACKPassManager, "transform", lambda self: runs.append(1) or original(self))
    cands = _candidates()[:6]
    assert lower_shared(cands, chunk=3) is not None
    assert len(runs) == 2  # two chunks of three units: one pass run each
    runs.clear()
    assert lower_shared(cands, chunk=3, merge_passes=False) is not None
    assert len(runs) == 6


def test_names_that_collide_are_not_merged():
    from executorch.backends.xnnpack.xnnpack_preprocess import get_xnnpack_edge_compile_config
    from executorch.exir.verification.verifier import EXIREdgeDialectVerifier

    module, x = SPECS[0].build()
    program = torch.export.export(module, (x,), strict=False).run_decompositions({})
    verifier = EXIREdgeDialectVerifier(edge_compile_config=get_xnnpack_edge_compile_config(), class_only=True)
    assert _merge([program, program], verifier) is None  # the same node names twice: XNNPACK's own way


def test_single_partition_methods_take_xnnpack_own_path(tmp_path):
    """A whole-model method (one partition) is preprocessed exactly as without the context."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    module, x = SPECS[2].build()

    def lower():
        program = torch.export.export(module, (x,), strict=False)
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer

    plain = lower()
    with merged_passes():
        assert lower() == plain


def test_context_restores_xnnpack_backend_even_on_error():
    assert "preprocess_multimethod" not in XnnpackBackend.__dict__
    with pytest.raises(RuntimeError, match="boom"):
        with merged_passes():
            assert "preprocess_multimethod" in XnnpackBackend.__dict__
            raise RuntimeError("boom")
    assert "preprocess_multimethod" not in XnnpackBackend.__dict__


def test_passes_are_left_out_only_over_graphs_without_their_ops():
    from executorch.backends.xnnpack._passes import XNNPACKPassManager
    from executorch.exir import to_edge

    from device.merged_preprocess import _passes_for

    class CatConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 4, 3)

        def forward(self, x):
            return torch.cat([self.conv(x), x[..., 2:]], dim=1)

    x = torch.randn(1, 4, 8)
    edge = to_edge(torch.export.export(CatConv().eval(), (x,), strict=False)).exported_program()
    every = XNNPACKPassManager(edge).passes
    names = {p.__name__ for p in _passes_for(edge.graph, every)}
    # cat and a 1-d convolution: their passes run
    assert {"DecomposeConcatenate", "Conv1dUnsqueezePass"} <= names
    unit = _merge_input_program(SPECS[0])
    names = {p.__name__ for p in _passes_for(unit.graph, every)}
    assert not names & {"DecomposeConcatenate", "Conv1dUnsqueezePass", "PReLUReshapePass", "ConvertToSDPAPass"}
    assert {"FuseBatchNormPass", "ChannelsLastTaggedReshapePass", "ConvertToLinearPass"} <= names  # always run

    class NewPass:  # a pass this module does not know about is never left out
        pass

    assert NewPass in _passes_for(unit.graph, [NewPass])


def test_no_pass_is_left_out_on_another_executorch(monkeypatch):
    """The op lists were read from one ExecuTorch's passes; another version runs every pass."""
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    import device.merged_preprocess as mp

    unit = _merge_input_program(SPECS[0])
    every = XNNPACKPassManager(unit).passes
    assert len(mp._passes_for(unit.graph, every)) < len(every)
    monkeypatch.setattr(mp, "_executorch_version", lambda: "9.9.9")
    assert mp._passes_for(unit.graph, every) == list(every)


def _merge_input_program(spec):
    from executorch.exir import to_edge

    module, x = spec.build()
    return to_edge(torch.export.export(module, (x,), strict=False)).exported_program()
