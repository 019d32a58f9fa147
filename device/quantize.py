"""Per-layer int8 quantization for XNNPACK: a policy (conv/linear module name -> int8 or fp32) -> a
quantized module that `lowering.lower_to_pte` lowers like any other candidate.

PT2E, as ExecuTorch deploys it: `torch.export` (batch dimension dynamic, so calibration runs in
batches) -> `prepare_pt2e` with ExecuTorch's `XNNPACKQuantizer` (symmetric per-channel int8
weights, asymmetric per-tensor int8 activations, static ranges) -> calibration on real images ->
`convert_pt2e`. The result is a torch.fx GraphModule with quantize/dequantize pairs around every
int8 op; XNNPACK's partitioner folds those into int8 kernels.

Which ops are int8: a conv or linear node takes its layer's precision from the policy; every other
op (BN, activation, add, pool, cat, ...) follows the ops that feed it, and is int8 when any of them
is. So a layer's fused units (conv+BN+act) go with it, and an add joining an int8 and an fp32 branch
is int8, its fp32 input quantized on the edge. (The stricter "all inputs int8" would make one fp32
layer turn the whole residual stream after it fp32, identity adds and all.) A q/dq boundary sits on
each edge between an fp32 and an int8 op, never inside a fused unit.

A layer asked to be int8 that the quantizer leaves unannotated, or whose int8 form XNNPACK does not
delegate (it would then need quantized portable kernels the runner does not register), stays fp32,
with the reason in `QuantizedModel.layers`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from .errors import AmcError

PRECISIONS = ("fp32", "int8")
# Fewer images than this give activation ranges from a handful of samples: a min/max observer over
# 8 Fashion-MNIST images already sees every class at least once in expectation; below it, refuse.
MIN_CALIBRATION_IMAGES = 8
CALIBRATION_BATCH = 32

_CONV_OPS = {"aten.conv2d.default", "aten.conv1d.default", "aten.convolution.default",
             "aten.conv_transpose2d.input", "aten.conv_transpose1d.default"}
_LINEAR_OPS = {"aten.linear.default"}
_LAYER_OPS = _CONV_OPS | _LINEAR_OPS
_DEQUANT_OPS = ("dequantize_per_tensor", "dequantize_per_channel")


@dataclass(frozen=True)
class QuantPolicy:
    """Precision per layer (module name of a conv/linear, as `amc-mobile inspect` names layers)."""

    default: str = "int8"
    layers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, p in [("default", self.default), *self.layers.items()]:
            if p not in PRECISIONS:
                raise AmcError(f"quantization policy: precision {p!r} for {name!r} is not one of "
                               f"{', '.join(PRECISIONS)}")

    def precision_of(self, layer: str) -> str:
        return self.layers.get(layer, self.default)

    @property
    def all_fp32(self) -> bool:
        return self.default == "fp32" and all(p == "fp32" for p in self.layers.values())

    def label(self) -> str:
        """Short row label: int8, fp32, or mixed(k int8 overrides) for a per-layer policy."""
        if not self.layers:
            return self.default
        odd = sum(1 for p in self.layers.values() if p != self.default)
        return self.default if odd == 0 else f"{self.default}+{odd}x{'fp32' if self.default == 'int8' else 'int8'}"

    def to_dict(self) -> dict:
        return {"default": self.default, "layers": dict(self.layers)}

    @classmethod
    def from_dict(cls, d: object, where: str = "quantization policy") -> "QuantPolicy":
        if not isinstance(d, dict):
            raise AmcError(f"{where}: expected a JSON object {{\"default\": ..., \"layers\": {{...}}}}")
        unknown = set(d) - {"default", "layers"}
        if unknown:
            raise AmcError(f"{where}: unknown key(s) {sorted(unknown)}; expected default and layers")
        layers = d.get("layers", {})
        if not isinstance(layers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in layers.items()):
            raise AmcError(f"{where}: `layers` must map layer names to \"int8\" or \"fp32\"")
        return cls(default=d.get("default", "fp32"), layers=dict(layers))

    @classmethod
    def parse(cls, text: str) -> "QuantPolicy":
        """`int8`, `fp32`, or a JSON policy file."""
        if text in PRECISIONS:
            return cls(default=text)
        path = Path(text)
        if path.suffix != ".json" and not path.exists():
            raise AmcError(f"--quantize {text!r}: expected int8, fp32 or a policy .json file")
        from .files import read_json

        return cls.from_dict(read_json(path, dict, "a policy is {\"default\": \"int8\", \"layers\": {\"LAYER\": \"fp32\"}}"), str(path))


class QuantizedModule(nn.Module):
    """The converted graph as a module to evaluate and lower. The graph refuses train()/eval() (its BN is
    folded, its observers gone), so it is held outside the module tree and those are no-ops here."""

    def __init__(self, graph: fx.GraphModule, input_shape: tuple[int, ...]):
        super().__init__()
        object.__setattr__(self, "graph_module", graph)
        self.input_shape = input_shape

    def forward(self, x):
        return self.graph_module(x)


@dataclass
class LayerPrecision:
    """One conv/linear layer: the precision asked for, the one it got, and why they differ."""

    layer: str
    op: str
    requested: str
    actual: str
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizedModel:
    """A module ready to lower (`Candidate(name, qm.module, qm.example_input)`) and what it holds."""

    module: nn.Module
    example_input: torch.Tensor
    policy: QuantPolicy
    layers: list[LayerPrecision]
    calibration_images: int

    @property
    def int8_layers(self) -> list[str]:
        return [l.layer for l in self.layers if l.actual == "int8"]

    @property
    def fallbacks(self) -> list[LayerPrecision]:
        return [l for l in self.layers if l.requested != l.actual]

    def to_dict(self) -> dict:
        return {"policy": self.policy.to_dict(), "calibration_images": self.calibration_images,
                "layers": [l.to_dict() for l in self.layers]}


def check_calibration(images: torch.Tensor | None, example_input: torch.Tensor,
                      min_images: int = MIN_CALIBRATION_IMAGES) -> torch.Tensor:
    """The calibration images as a float tensor of the model's input shape, or a one-line error."""
    n = 0 if images is None else len(images)
    if n == 0:
        raise AmcError("int8 calibration set is empty: give at least "
                       f"{min_images} training images (--calib-images)")
    if n < min_images:
        raise AmcError(f"int8 calibration set has {n} image(s): at least {min_images} are needed for "
                       f"activation ranges (--calib-images)")
    if not isinstance(images, torch.Tensor) or tuple(images.shape[1:]) != tuple(example_input.shape[1:]):
        shape = tuple(images.shape[1:]) if isinstance(images, torch.Tensor) else type(images).__name__
        raise AmcError(f"int8 calibration images have shape {shape}; the model takes "
                       f"{tuple(example_input.shape[1:])}")
    images = images.float()
    if not torch.isfinite(images).all():
        raise AmcError("int8 calibration images hold NaN or infinite values")
    return images


def _op_name(node: fx.Node) -> str:
    return str(node.target).replace("::", ".") if node.op == "call_function" else node.op


def _layer_of(node: fx.Node) -> str | None:
    """The module name that owns a conv/linear node (the innermost entry of its module stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path[len("L['self']."):] if path.startswith("L['self'].") else path


def node_precisions(gm: fx.GraphModule, policy: QuantPolicy, forced_fp32: set[str] = frozenset()) -> dict[str, str]:
    """{node name: precision} for every op node (see the module doc for the rule)."""
    prec: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if _op_name(node) in _LAYER_OPS:
            layer = _layer_of(node) or node.name
            prec[node.name] = "fp32" if layer in forced_fp32 else policy.precision_of(layer)
            continue
        fed = [prec[a.name] for a in node.all_input_nodes if a.name in prec]
        prec[node.name] = "int8" if "int8" in fed else "fp32"
    return prec


def check_layers(gm: fx.GraphModule, policy: QuantPolicy) -> None:
    """A policy that names a layer the model does not have is a typo, not a no-op."""
    names = [_layer_of(n) or n.name for n in gm.graph.nodes if _op_name(n) in _LAYER_OPS]
    unknown = sorted(set(policy.layers) - set(names))
    if unknown:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise AmcError(f"quantization policy names layer(s) the model does not have: {', '.join(unknown)} "
                       f"(its conv/linear layers: {shown}; `amc-mobile inspect` lists them)")


def _export(module: nn.Module, example_input: torch.Tensor) -> tuple[fx.GraphModule, bool]:
    """The model as an ATen graph; the batch dimension dynamic when the model allows (True)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    two = example_input.expand(2, *example_input.shape[1:]).clone()
    with torch.no_grad():
        try:
            return torch.export.export(module, (two,), dynamic_shapes=({0: batch},), strict=False).module(), True
        except Exception:
            pass
        try:
            return torch.export.export(module, (example_input,), strict=False).module(), False
        except Exception as exc:
            from .lowering import _short_reason

            raise AmcError(f"model does not export for quantization: {_short_reason(exc)}") from exc


def _calibrate(prepared: fx.GraphModule, images: torch.Tensor, batched: bool) -> None:
    step = CALIBRATION_BATCH if batched else 1
    with torch.no_grad():
        for i in range(0, len(images), step):
            prepared(images[i:i + step])


# XNNPACK's conv-bn annotators trace their conv-bn[-relu] patterns with a strict (dynamo) torch.export on
# every prepare_pt2e: 12 traces, ~80 % of a small model's quantization (4.8 of 5.8 s for a 4-layer net on
# this host), the same graphs each time. A joint search quantizes every episode, so the traced patterns
# are kept for the process, keyed by what makes a pattern: its code, its closure (conv function, relu
# flags), the example inputs' shapes, is_cuda. Installed only inside `_pattern_memo()`, the stock function
# restored after; each caller gets its own copy, since the matcher rewrites the pattern's output
# (tests/test_joint_quant.py: the same outputs as without the memo).
_PATTERNS: dict = {}
_pattern_lock = __import__("threading").Lock()


def _pattern_key(pattern, example_inputs, is_cuda, kwargs):
    import types

    from torchao.quantization.pt2e import WrapperModule

    if not isinstance(pattern, WrapperModule) or not isinstance(pattern.fn, types.FunctionType):
        return None
    fn = pattern.fn
    try:
        cells = tuple(c.cell_contents for c in (fn.__closure__ or ()))
        key = (fn.__code__, cells, tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in example_inputs),
               bool(is_cuda), tuple(sorted(kwargs.items())))
        hash(key)
    except (TypeError, ValueError):
        return None
    return key


@contextlib.contextmanager
def _pattern_memo():
    try:
        from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils as utils
    except ImportError:
        yield
        return
    stock = utils._get_aten_graph_module_for_pattern

    def memo(pattern, example_inputs, is_cuda=False, **kwargs):
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return stock(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERNS:
            _PATTERNS[key] = stock(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERNS[key])  # the matcher rewrites the pattern's output node

    with _pattern_lock:
        utils._get_aten_graph_module_for_pattern = memo
        try:
            yield
        finally:
            utils._get_aten_graph_module_for_pattern = stock


def _quantize_once(module, example_input, images, policy, forced_fp32):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    gm, batched = _export(module, example_input)
    check_layers(gm, policy)
    prec = node_precisions(gm, policy, forced_fp32)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    # The annotators ask about every node of a pattern, weights and biases (get_attr) included:
    # those follow the op that reads them.
    quantizer.set_filter_function(lambda n: n.op != "call_function" or prec.get(n.name) == "int8")
    with _pattern_memo():
        prepared = prepare_pt2e(gm, quantizer)
    _calibrate(prepared, images, batched)
    converted = convert_pt2e(prepared)
    return QuantizedModule(converted, tuple(example_input.shape[1:]))


def _layer_report(converted: QuantizedModule, policy: QuantPolicy, forced: dict[str, str]) -> list[LayerPrecision]:
    out: list[LayerPrecision] = []
    for node in converted.graph_module.graph.nodes:
        op = _op_name(node)
        if op not in _LAYER_OPS:
            continue
        layer = _layer_of(node) or node.name
        weight = node.args[1] if len(node.args) > 1 else None
        int8 = isinstance(weight, fx.Node) and any(d in _op_name(weight) for d in _DEQUANT_OPS)
        requested = policy.precision_of(layer)
        actual = "int8" if int8 else "fp32"
        reason = None
        if requested == "int8" and not int8:
            reason = forced.get(layer) or (f"the XNNPACK quantizer leaves this {op.rsplit('.', 1)[0]} unquantized "
                                           f"(none of its int8 patterns takes it)")
        out.append(LayerPrecision(layer, op, requested, actual, reason))
    return out


class _WhyNotDelegated(logging.Handler):
    """Collects XNNPACK's `WhyNoPartition` debug records: {node name: reason}."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.reasons: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        why = record.msg
        node, reason = getattr(why, "node", None), getattr(why, "reason", None)
        if node is not None and reason:
            self.reasons.setdefault(node.name, str(reason).strip())


@contextlib.contextmanager
def _partitioner_reasons():
    logger = logging.getLogger("executorch.backends.xnnpack")
    handler = _WhyNotDelegated()
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # the records are for us, not for the user's console
    logger.addHandler(handler)
    try:
        yield handler.reasons
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _undelegated_layers(converted: QuantizedModule, example_input: torch.Tensor) -> dict[str, str]:
    """{layer: reason} for int8 layers that XNNPACK leaves outside its delegate after lowering."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from .lowering import _collector_paused, exporter_speedups

    with torch.no_grad(), _collector_paused(), exporter_speedups(), _partitioner_reasons() as reasons:
        program = torch.export.export(converted.graph_module, (example_input,), strict=False)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    left: dict[str, str] = {}
    for node in edge.exported_program().graph.nodes:
        op = _op_name(node)
        if node.op != "call_function" or not any(k in op for k in ("convolution", "linear", "addmm", "mm")):
            continue
        layer = _layer_of(node)
        if layer is not None:
            why = reasons.get(node.name, "no reason given")
            left[layer] = f"XNNPACK does not delegate its int8 form: {why}"
    return left


_QUANTIZE_OPS = ("quantize_per_tensor",)


def _is_op(node: fx.Node, names: tuple[str, ...]) -> bool:
    return node.op == "call_function" and any(n in _op_name(node) for n in names)


def _strip_io_quantization(gm: fx.GraphModule) -> tuple:
    """Drop the quantize after the graph's input and the dequantize before its output, so that the graph
    takes and returns int8 (ExecuTorch's `quantize_io_pass` does the same on an edge program; here it is
    done before lowering, so XNNPACK's delegate gets int8 at its boundary). Returns the input's
    quantize arguments (scale, zero point, qmin, qmax, dtype)."""
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    for guard in [u for u in (inputs[0].users if len(inputs) == 1 else ()) if u.op == "call_module"]:
        graph.erase_node(guard)  # torch.export's input guards: they were made for the fp32 input
    users = list(inputs[0].users) if len(inputs) == 1 else []
    if len(users) != 1 or not _is_op(users[0], _QUANTIZE_OPS):
        raise AmcError("int8 unit: its input does not feed exactly one quantize op, so it cannot take int8 "
                       "(the XNNPACK quantizer left it unannotated)")
    quant = users[0]
    out = graph.output_node()
    values = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    if len(values) != 1 or not _is_op(values[0], _DEQUANT_OPS):
        raise AmcError("int8 unit: its output is not a dequantize op, so it cannot return int8 "
                       "(the XNNPACK quantizer left its last op unannotated)")
    qargs = tuple(quant.args[1:])
    quant.replace_all_uses_with(inputs[0])
    out.args = ((values[0].args[0],),) if isinstance(out.args[0], (tuple, list)) else (values[0].args[0],)
    graph.eliminate_dead_code()
    gm.recompile()
    return qargs


def quantize_unit(module: nn.Module, example_input: torch.Tensor, calibration: torch.Tensor, *,
                  int8_io: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """One fused unit of a latency table in int8, calibrated on `calibration`: every op int8 (a unit has no
    layer for an add or a pool to follow, so `node_precisions` would leave those fp32).

    `int8_io`: the module takes and returns int8, its input's quantize and its output's dequantize removed:
    the unit as it runs inside an int8 region, where an int8 op hands int8 to the next; the q/dq on the
    edges between fp32 and int8 ops are units of their own (`latency_tables.units`, kinds quantize and
    dequantize). The example input is then the int8 quantization of `example_input`. Otherwise the module
    takes and returns fp32, its own quantize and dequantize included. A unit whose ops the quantizer does
    not annotate is a one-line error."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    module = module.eval()
    images = check_calibration(calibration, example_input, 1)
    gm, batched = _export(module, example_input)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(gm, quantizer)
    _calibrate(prepared, images, batched)
    converted = convert_pt2e(prepared)
    if not int8_io:
        return QuantizedModule(converted, tuple(example_input.shape[1:])), example_input
    qargs = _strip_io_quantization(converted)
    x8 = torch.ops.quantized_decomposed.quantize_per_tensor(example_input, *qargs)
    return QuantizedModule(converted, tuple(example_input.shape[1:])), x8


def quantize_model(module: nn.Module, example_input: torch.Tensor, calibration: torch.Tensor | None,
                   policy: QuantPolicy, *, min_images: int = MIN_CALIBRATION_IMAGES,
                   check_delegation: bool = True) -> QuantizedModel:
    """`module` with each layer at the policy's precision, calibrated on `calibration` images.

    `check_delegation`: lower once to find int8 layers XNNPACK would not delegate and quantize again
    with those fp32 (one extra lowering; off for callers that lower anyway and accept portable ops)."""
    module = module.eval()
    images = check_calibration(calibration, example_input, min_images)
    forced: dict[str, str] = {}
    if policy.all_fp32:
        gm, _ = _export(module, example_input)
        check_layers(gm, policy)
        layers = [LayerPrecision(_layer_of(n) or n.name, _op_name(n), "fp32", "fp32")
                  for n in gm.graph.nodes if _op_name(n) in _LAYER_OPS]
        return QuantizedModel(module, example_input, policy, layers, len(images))
    converted = _quantize_once(module, example_input, images, policy, set())
    if check_delegation:
        forced = _undelegated_layers(converted, example_input)
        if forced:
            converted = _quantize_once(module, example_input, images, policy, set(forced))
    return QuantizedModel(converted, example_input, policy, _layer_report(converted, policy, forced), len(images))

