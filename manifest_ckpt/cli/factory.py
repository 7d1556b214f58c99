"""Build a module from a ``pkg.module:factory`` or ``path/to/file.py:factory`` spec (CLI)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from manifest_ckpt.errors import ManifestCkptError


class ModelSpecError(ManifestCkptError, ValueError):
    """A ``--model`` spec cannot be imported or does not build an ``nn.Module``."""


def build_model(spec: str) -> nn.Module:
    """Import ``module:attr`` and call it (without arguments) if it is not a module already.

    Raises:
        ModelSpecError: bad spec, import failure, or a result that is not an ``nn.Module``.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ModelSpecError(f"--model {spec!r}: expected pkg.module:factory or path/to/file.py:factory")
    try:
        module = _import(target)
    except ModelSpecError:
        raise
    except Exception as exc:
        raise ModelSpecError(f"--model {spec!r}: importing {target!r} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"--model {spec!r}: {target!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        try:
            obj = obj()
        except Exception as exc:
            raise ModelSpecError(f"--model {spec!r}: calling {attr}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, nn.Module):
        raise ModelSpecError(f"--model {spec!r}: {attr} gave a {type(obj).__name__}, expected an nn.Module")
    return obj


def _import(target: str) -> Any:
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelSpecError(f"--model: file {target!r} does not exist")
        name = f"_manifest_ckpt_model_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ModelSpecError(f"--model: cannot import {target!r}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
        return module
    # Like `python -m`, find modules in the working directory too.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(target)
