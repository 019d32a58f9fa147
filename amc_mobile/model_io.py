"""Load a model from whatever a user points at: a registry name, a pruned-model folder, a checkpoint
folder, a `.pte` file, or (only with an explicit flag) a fully pickled module."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from amc_mobile.errors import AmcError
from device.base import example_input


@dataclass
class LoadedModel:
    """A model ready to measure. `pte_path` is set (and `module` None) for an ExecuTorch program."""

    label: str
    module: nn.Module | None
    example_input: torch.Tensor | None
    source: str  # "registry", "pruned", "checkpoint", "pte", "quantized" (a quantize folder: .pte + its report), "pickle"
    pte_path: Path | None = None
    meta: dict | None = None

    @property
    def params(self) -> int | None:
        return None if self.module is None else sum(p.numel() for p in self.module.parameters())

    def size_mb(self) -> float | None:
        if self.pte_path is not None:
            return self.pte_path.stat().st_size / 1e6
        if self.module is None:
            return None
        return sum(t.numel() * t.element_size() for t in self.module.state_dict().values()) / 1e6


class _ProgramModule(nn.Module):
    """A loaded torch.export program as a module to measure: the program refuses train()/eval(), so it is
    held outside the module tree (its weights are constants of the graph)."""

    def __init__(self, program_module: nn.Module):
        super().__init__()
        object.__setattr__(self, "program", program_module)

    def forward(self, x):
        return self.program(x)


def _example(module: nn.Module) -> torch.Tensor:
    shape = getattr(module, "input_shape", None)
    if not shape:
        raise AmcError(f"{type(module).__name__} has no `input_shape`; cannot make an example input")
    return example_input(shape)


@dataclass(frozen=True)
class ModelOptions:
    """What every command accepts next to a model reference."""

    kwargs: dict | None = None  # keyword arguments of a FILE.py:FACTORY (or registry) builder
    weights: str | None = None  # a state_dict file, loaded with weights_only=True
    input_shape: tuple[int, ...] | None = None  # C,H,W when the model has no `input_shape`

    @property
    def empty(self) -> bool:
        return not (self.kwargs or self.weights or self.input_shape)


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise AmcError(f"--input-shape {text!r}: expected positive integers C,H,W (e.g. 3,224,224)")
    return shape


def parse_kwargs(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        kw = json.loads(text)
    except ValueError as exc:
        raise AmcError(f"--model-kwargs {text!r} is not JSON: {exc}") from exc
    if not isinstance(kw, dict):
        raise AmcError(f"--model-kwargs must be a JSON object like '{{\"width\": 0.5}}', not {type(kw).__name__}")
    return kw


def apply_options(module: nn.Module, options: ModelOptions | None) -> nn.Module:
    if options is None:
        return module
    if options.input_shape is not None:
        module.input_shape = tuple(options.input_shape)
    if options.weights:
        load_weights(module, options.weights)
    return module


def load_weights(module: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict (also inside {"state_dict": ...} / {"model": ...}) without pickle; every missing,
    unexpected or mis-shaped key is named in one error."""
    path = Path(path)
    if not path.is_file():
        raise AmcError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AmcError(f"--weights {path} is not a state_dict that loads without pickle: "
                       f"{(str(exc).splitlines() or [''])[0][:160]}") from exc
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AmcError(f"--weights {path} holds a {type(state).__name__}, not a state_dict (name -> tensor)")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", shapes)):
            if keys:
                parts.append(f"{len(keys)} {what}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}")
        raise AmcError(f"--weights {path} does not match {type(module).__name__}: {'; '.join(parts)}")
    module.load_state_dict(state)
    return module


def load_model(ref: str, allow_pickle: bool = False, label: str | None = None,
               options: ModelOptions | None = None, trained: bool = False) -> LoadedModel:
    """Resolve `ref` to a model (with `options` applied). Order: existing path (folder/.pte/.pt),
    FILE.py:FACTORY / package.module:FACTORY, then registry name. A registry name gets random weights
    (all that latency needs), or with `trained` the shipped or cached trained weights (trained now
    when there are none: what a search's accuracy needs)."""
    loaded = _load_model(ref, allow_pickle, label, options, trained)
    if loaded.module is not None and options is not None and not options.empty:
        apply_options(loaded.module, options)
        loaded = LoadedModel(loaded.label, loaded.module, _example(loaded.module), loaded.source, meta=loaded.meta)
    elif loaded.module is None and options is not None and not options.empty:
        raise AmcError(f"{ref} is a compiled .pte: --weights, --model-kwargs and --input-shape do not apply to it")
    return loaded


def _load_model(ref: str, allow_pickle: bool, label: str | None, options: ModelOptions | None,
                trained: bool = False) -> LoadedModel:
    from amc_mobile.models import MODEL_NAMES, TORCHVISION_PREFIX, build_model

    path = Path(ref)
    if path.exists():
        label = label or path.name
        if path.is_dir() or path.name == "architecture.json":
            folder = path if path.is_dir() else path.parent
            from amc_mobile.quantization import PTE_NAME, REPORT_NAME, is_quantized_folder

            if is_quantized_folder(folder):  # `quantize` / a joint search's quantized/: the program as it deploys
                from amc_mobile.files import read_json

                _check_pte(folder / PTE_NAME)
                meta = read_json(folder / REPORT_NAME, dict, "it is written by `amc-mobile quantize`")
                return LoadedModel(label, None, None, "quantized", pte_path=folder / PTE_NAME, meta=meta)
            if (folder / "architecture.json").exists():
                from amc_mobile.pruning.slicing import load_pruned

                module, spec = load_pruned(folder)
                return LoadedModel(label, module, _example(module), "pruned", meta=spec)
            if (folder / "config.json").exists() and (folder / "model.pt").exists():
                from amc_mobile.train import load_checkpoint

                module, meta = load_checkpoint(folder)
                return LoadedModel(label, module.eval(), _example(module), "checkpoint", meta=meta)
            raise AmcError(f"{folder} is neither a pruned model (architecture.json + model.pt) "
                           f"nor a checkpoint (config.json + model.pt)")
        if path.suffix == ".pt2":  # a torch.export program: measurable; its layers are aten ops, not modules
            try:
                program = torch.export.load(path)
            except Exception as exc:
                raise AmcError(f"{path} is not a torch.export program file: {(str(exc).splitlines() or [''])[0][:160]}") \
                    from exc
            module = _ProgramModule(program.module())
            inputs = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"
                      and n.name in program.graph_signature.user_inputs]
            if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() < 2:
                raise AmcError(f"{path}: the program takes {len(inputs)} inputs; amc-mobile measures one image tensor")
            module.input_shape = tuple(inputs[0].shape[1:])
            module.amc_program = True  # the pruning graph sees aten ops here, not prunable modules
            return LoadedModel(label, module, _example(module), "program")
        if path.suffix == ".pte":
            _check_pte(path)
            return LoadedModel(label, None, None, "pte", pte_path=path)
        if path.suffix in (".pt", ".pth"):
            if not allow_pickle:
                raise AmcError(f"{path} is a pickled file: loading a whole pickled module runs arbitrary code; "
                               f"pass --allow-pickle if you trust it, or save a pruned-model folder instead")
            try:
                module = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc:
                raise AmcError(f"{path} is not a loadable torch file: {str(exc).splitlines()[0][:200]}") from exc
            if not isinstance(module, nn.Module):
                raise AmcError(f"{path} holds a {type(module).__name__}, not an nn.Module "
                               f"(a state_dict needs its architecture: use a pruned-model folder)")
            return LoadedModel(label, module.eval(), _example(module), "pickle")
        raise AmcError(f"{path} is not a model: expected a pruned-model folder, a checkpoint folder, "
                       f"a .pte, or a .pt with --allow-pickle")
    kwargs = (options.kwargs if options else None) or {}
    if is_factory_ref(ref):
        module = load_factory(ref, kwargs)
        if options is not None and options.input_shape is not None:
            module.input_shape = tuple(options.input_shape)
        return LoadedModel(label or ref, module, _example(module), "factory")
    if trained and ref in MODEL_NAMES:
        from amc_mobile.train import get_or_train

        module, _ = get_or_train(ref, kwargs or None, device="cpu")
        return LoadedModel(label or ref, module.eval(), _example(module), "registry")
    if ref in MODEL_NAMES or ref.startswith(TORCHVISION_PREFIX):
        module = build_model(ref, **kwargs).eval()
        return LoadedModel(label or ref, module, _example(module), "registry")
    raise AmcError(f"model {ref!r} not found: not a file or folder, and not one of {', '.join(MODEL_NAMES)}")


def is_factory_ref(ref: str) -> bool:
    head, sep, tail = ref.rpartition(":")
    return bool(sep and head and tail.isidentifier() and not ref.startswith("torchvision:"))


def import_ref(ref: str):
    """The callable `path/to/file.py:NAME` or `package.module:NAME` names."""
    import importlib
    import importlib.util
    import sys

    where, _, name = ref.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise AmcError(f"file {where} does not exist")
            spec = importlib.util.spec_from_file_location(f"amc_user_{abs(hash(str(path.resolve())))}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and pickling look their module up by name
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except AmcError:
        raise
    except Exception as exc:
        raise AmcError(f"cannot import {where}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}") \
            from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AmcError(f"{where} has no callable {name!r}")
    return fn


def load_factory(ref: str, kwargs: dict | None = None) -> nn.Module:
    """`path/to/file.py:factory` or `package.module:factory`: call the factory, which returns an nn.Module."""
    factory = import_ref(ref)
    try:
        model = factory(**(kwargs or {}))
    except Exception as exc:
        raise AmcError(f"{ref} raised {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}") from exc
    if not isinstance(model, nn.Module):
        raise AmcError(f"{ref} returned a {type(model).__name__}, not an nn.Module")
    # how to build it again: a pruned result records this instead of a registry config
    model.amc_reference = factory_reference(ref, kwargs)
    model.amc_label = ref
    return model.eval()


def factory_reference(ref: str, kwargs: dict | None = None) -> dict:
    """{"factory": ref with an absolute file path, "kwargs", "sha256" of the file (None for a package module)}."""
    import hashlib

    where, _, name = ref.rpartition(":")
    digest = None
    if where.endswith(".py"):
        where = str(Path(where).resolve())
        digest = hashlib.sha256(Path(where).read_bytes()).hexdigest()
    return {"factory": f"{where}:{name}", "kwargs": dict(kwargs or {}), "sha256": digest}


def rebuild_reference(base: dict) -> nn.Module:
    """The model a `factory_reference` names, refusing a file that changed since it was recorded."""
    import hashlib

    ref = base["factory"]
    where = ref.rpartition(":")[0]
    if base.get("sha256") and where.endswith(".py") and Path(where).is_file():
        now = hashlib.sha256(Path(where).read_bytes()).hexdigest()
        if now != base["sha256"]:
            raise AmcError(f"{where} changed since this model was saved (sha256 {base['sha256'][:12]} -> {now[:12]}): "
                           f"restore that file, or rerun on the new one")
    return load_factory(ref, base.get("kwargs"))


def _check_pte(path: Path) -> None:
    """Cheap sanity check so a non-.pte fails with a clear message before any device work."""
    head = path.read_bytes()[:8]
    # A .pte is a flatbuffer whose file identifier "ET" + 2 digits sits at bytes 4..8.
    if len(head) < 8 or head[4:6] != b"ET":
        raise AmcError(f"{path} is not an ExecuTorch program (.pte): bad header")


def describe_meta(meta: dict | None) -> str:
    return json.dumps(meta or {}, sort_keys=True)[:200]
