"""Load a model from whatever a user points at: a registry name, a pruned-model folder, a checkpoint
folder, a `.pte` file, or (only with an explicit flag) a fully pickled module."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from amc_mobile.errors import AmcError


@dataclass
class LoadedModel:
    """A model ready to measure. `pte_path` is set (and `module` None) for an ExecuTorch program."""

    label: str
    module: nn.Module | None
    example_input: torch.Tensor | None
    source: str  # "registry", "pruned", "checkpoint", "pte", "pickle"
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


def _example(module: nn.Module) -> torch.Tensor:
    shape = getattr(module, "input_shape", None)
    if not shape:
        raise AmcError(f"{type(module).__name__} has no `input_shape`; cannot make an example input")
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))


def load_model(ref: str, allow_pickle: bool = False, label: str | None = None) -> LoadedModel:
    """Resolve `ref` to a model. Order: existing path (folder/.pte/.pt), then registry name."""
    from amc_mobile.models import MODEL_NAMES, TORCHVISION_PREFIX, build_model

    path = Path(ref)
    if path.exists():
        label = label or path.name
        if path.is_dir() or path.name == "architecture.json":
            folder = path if path.is_dir() else path.parent
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
    if is_factory_ref(ref):
        module = load_factory(ref)
        return LoadedModel(label or ref, module, _example(module), "factory")
    if ref in MODEL_NAMES or ref.startswith(TORCHVISION_PREFIX):
        module = build_model(ref).eval()
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
