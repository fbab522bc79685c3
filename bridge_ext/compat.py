"""Lets megatron-core and megatron-bridge import where Transformer Engine, Triton or Python 3.12 is missing.

``import bridge_ext`` only puts :class:`MegatronImportPatches` on ``sys.meta_path``: it answers "not
mine" for every module except the few megatron modules below, and for those only when what they
need is missing; each is then patched as it is first imported. Details: docs/compatibility.md.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

from bridge_ext.errors import CompatibilityError

#: The versions the patches below were written for and checked against (line by line).
SUPPORTED_VERSIONS = {"megatron-core": "0.19.2", "megatron-bridge": "0.6.2"}
TRANSFORMER_ENGINE = "Transformer Engine"
TRITON = "Triton"

LORA_LAYERS = "megatron.bridge.peft.lora_layers"
# Modules that lora_layers imports besides TE; loaded before the placeholder appears, so that
# nothing but lora_layers' own ``import transformer_engine.pytorch`` can see it.
LORA_LAYERS_DEPENDENCIES = (
    "megatron.core.extensions.transformer_engine",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.bridge.peft.adapter_wrapper",
    "megatron.bridge.peft.lora_merge",
)
PAGED_STASH_OPS = "megatron.core.transformer.moe.ops.paged_stash"
PAGED_STASH_BLOCK_SIZE = 1024
PAGED_STASH_KERNELS = ("paged_stash_copy_kernel", "paged_stash_pop_kernel")
# Module -> the TE availability flags it computes at import time (True without TE, see the doc).
TE_FLAGS = {
    "megatron.bridge.peft.utils": (
        "HAVE_TE",
        "HAVE_TE_COL_LINEAR",
        "HAVE_TE_LN_COL_LINEAR",
        "HAVE_TE_ROW_LINEAR",
        "HAVE_TE_LINEAR",
        "HAVE_TE_COL_GRP_LINEAR",
        "HAVE_TE_ROW_GRP_LINEAR",
        "HAVE_TE_FP8_GLOBAL_STATE_MANAGER",
        "HAVE_TE_PYTORCH_GROUPED_LINEAR",
        "HAVE_TE_PYTORCH_GROUPED_LINEAR_AUTOGRAD",
        "HAVE_TE_PYTORCH_CPU_OFFLOAD_STATUS",
    ),
    "megatron.bridge.peft.module_matcher": (
        "HAVE_TE",
        "HAVE_TE_COL_LINEAR",
        "HAVE_TE_LN_COL_LINEAR",
        "HAVE_TE_ROW_LINEAR",
    ),
}
# Modules that do ``from typing import ..., override`` (a Python 3.12 name).
TYPING_OVERRIDE_USERS = ("megatron.training.models.gpt", "megatron.training.models.hybrid")


def have_module(name: str) -> bool:
    """True when the top-level package ``name`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@cache
def missing_dependencies() -> tuple[str, ...]:
    """What of Transformer Engine and Triton is not installed (asked once, when first needed)."""
    return tuple(name for name, module in ((TRANSFORMER_ENGINE, "transformer_engine"), (TRITON, "triton"))
                 if not have_module(module))


def missing_text(missing: tuple[str, ...]) -> str:
    """``"Triton is not installed"``, ``"Transformer Engine and Triton are not installed"``..."""
    return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed"


_patched: list[str] = []


def patched_modules() -> tuple[str, ...]:
    """The megatron modules patched in this process so far, in import order."""
    return tuple(_patched)


# --------------------------------------------------------------------------------------------
# Checks made before a patch is applied
# --------------------------------------------------------------------------------------------
def _distribution(module_name: str) -> str:
    return "megatron-bridge" if module_name.startswith("megatron.bridge.") else "megatron-core"


def _check_version(module_name: str, needs: str) -> None:
    package = _distribution(module_name)
    wanted = SUPPORTED_VERSIONS[package]
    try:
        found = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError as error:
        raise CompatibilityError(f"{package} is not installed, but {module_name} is being imported") from error
    if found != wanted:
        raise CompatibilityError(
            f"{missing_text(missing_dependencies())}, so bridge_ext.compat patches {module_name} (which "
            f"needs {needs}) as it is imported; that patch was written for {package} {wanted}, but "
            f"{package} {found} is installed. Install {needs}, or {package}=={wanted}."
        )


def _require_lines(module_name: str, spec: importlib.machinery.ModuleSpec, lines: tuple[str, ...], needs: str) -> None:
    """Fail unless each of ``lines`` begins a line of the module's source."""
    path = spec.origin or module_name
    if not (path and os.path.isfile(path)):
        raise CompatibilityError(f"cannot read the source of {module_name} to check it before patching it")
    with open(path, encoding="utf-8") as handle:
        present = [line.strip() for line in handle]
    for line in lines:
        if not any(candidate.startswith(line) for candidate in present):
            raise CompatibilityError(
                f"{path} no longer contains {line!r}, which bridge_ext.compat works around because {needs} "
                f"is not installed; it was written for {SUPPORTED_VERSIONS} and must be reviewed for this version."
            )


# --------------------------------------------------------------------------------------------
# Transformer Engine: lora_layers' import, and the HAVE_TE flags
# --------------------------------------------------------------------------------------------
class _Unavailable:
    """A Transformer Engine name: can be looked up (upstream annotations do), not used."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> _Unavailable:
        return _Unavailable(f"{self._name}.{attribute}")

    def __call__(self, *args, **kwargs):
        raise CompatibilityError(
            f"{self._name} was called, but Transformer Engine is not installed; this code "
            "path needs a GPU machine with Transformer Engine."
        )


class _PlaceholderTE(types.ModuleType):
    """Stands in for ``transformer_engine.pytorch`` inside lora_layers only.

    ``Linear`` and ``LayerNormLinear`` are classes nothing is an instance of, so lora_layers'
    ``isinstance`` checks answer False; any other name (``te.ops.Linear``...) raises if called.
    """

    class Linear:  # noqa: D106 - placeholder
        pass

    class LayerNormLinear:  # noqa: D106 - placeholder
        pass

    def __getattr__(self, name: str) -> _Unavailable:
        return _Unavailable(f"transformer_engine.pytorch.{name}")


@contextmanager
def _modules_in_place(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    """``sys.modules`` holds ``modules`` inside the block; what was there before comes back."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def _exec_lora_layers(exec_module: Callable[[types.ModuleType], None], module: types.ModuleType) -> None:
    for dependency in LORA_LAYERS_DEPENDENCIES:
        importlib.import_module(dependency)
    te_package = types.ModuleType("transformer_engine")
    te_pytorch = _PlaceholderTE("transformer_engine.pytorch")
    te_package.pytorch = te_pytorch
    with _modules_in_place({"transformer_engine": te_package, "transformer_engine.pytorch": te_pytorch}):
        exec_module(module)


def _exec_clearing_te_flags(exec_module: Callable[[types.ModuleType], None], module: types.ModuleType) -> None:
    exec_module(module)
    for flag in TE_FLAGS[module.__name__]:
        if not hasattr(module, flag):
            raise CompatibilityError(f"{module.__name__} no longer defines {flag}; bridge_ext.compat must be reviewed")
        setattr(module, flag, False)


# --------------------------------------------------------------------------------------------
# Python 3.11: typing.override while the two modules that import it execute
# --------------------------------------------------------------------------------------------
def _exec_with_typing_override(exec_module: Callable[[types.ModuleType], None], module: types.ModuleType) -> None:
    import typing_extensions

    typing.override = typing_extensions.override
    try:
        exec_module(module)
    finally:
        del typing.override


# --------------------------------------------------------------------------------------------
# Triton: a placeholder for the MoE paged-stash kernels
# --------------------------------------------------------------------------------------------
class _PagedStashPlaceholder(importlib.abc.Loader):
    """Loads a module with paged_stash's names; its kernels raise when called (they need a GPU)."""

    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        def kernel_needs_triton(*args, **kwargs):
            raise CompatibilityError("MoE paged-stash kernels need Triton and a GPU.")

        module.__doc__ = "Placeholder made by bridge_ext.compat: Triton is not installed."
        module.GLOBAL_BLOCK_SIZE = PAGED_STASH_BLOCK_SIZE
        for name in PAGED_STASH_KERNELS:
            setattr(module, name, kernel_needs_triton)
        module.__all__ = ["GLOBAL_BLOCK_SIZE", *PAGED_STASH_KERNELS]
        _patched.append(module.__name__)


# --------------------------------------------------------------------------------------------
# The patches and the finder that applies them
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Patch:
    """How one megatron module is patched, when what it ``needs`` is missing."""

    needs: str
    is_missing: Callable[[], bool]
    required_lines: tuple[str, ...] = ()  # its source must still hold these (checked first)
    check_version: bool = True
    run: Callable[[Callable[[types.ModuleType], None], types.ModuleType], None] | None = None  # None: placeholder


def _te_missing() -> bool:
    return TRANSFORMER_ENGINE in missing_dependencies()


def _triton_missing() -> bool:
    return TRITON in missing_dependencies()


def _typing_override_missing() -> bool:
    return not hasattr(typing, "override")


PATCHES: dict[str, _Patch] = {
    PAGED_STASH_OPS: _Patch(
        TRITON, _triton_missing,
        ("import triton", f"GLOBAL_BLOCK_SIZE = {PAGED_STASH_BLOCK_SIZE}", *(f"def {k}(" for k in PAGED_STASH_KERNELS)),
    ),
    LORA_LAYERS: _Patch(TRANSFORMER_ENGINE, _te_missing, ("import transformer_engine.pytorch as te",),
                        run=_exec_lora_layers),
    **{name: _Patch(TRANSFORMER_ENGINE, _te_missing, (f"{flags[0]} = all(",), run=_exec_clearing_te_flags)
       for name, flags in TE_FLAGS.items()},
    **{name: _Patch("Python 3.12 (typing.override)", _typing_override_missing, check_version=False,
                    run=_exec_with_typing_override)
       for name in TYPING_OVERRIDE_USERS},
}


class _PatchingLoader(importlib.abc.Loader):
    """Wraps a module's own loader; the patch runs the module's execution."""

    def __init__(self, loader: importlib.abc.Loader, patch: _Patch):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._patch.run(self._loader.exec_module, module)
        _patched.append(module.__name__)

    def __getattr__(self, name: str):  # get_source, get_filename... for tracebacks and inspect
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._loader, name)


class MegatronImportPatches(importlib.abc.MetaPathFinder):
    """Meta-path hook: finds nothing itself except the megatron modules of :data:`PATCHES`, and
    those only when what they need is missing."""

    def find_spec(self, fullname, path=None, target=None):
        patch = PATCHES.get(fullname)
        if patch is None or not patch.is_missing():
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        if patch.check_version:
            _check_version(fullname, patch.needs)
        _require_lines(fullname, spec, patch.required_lines, patch.needs)
        if patch.run is None:
            return importlib.util.spec_from_loader(fullname, _PagedStashPlaceholder())
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def install() -> None:
    """Put :class:`MegatronImportPatches` first on ``sys.meta_path`` (once). ``import bridge_ext`` calls it."""
    if not any(isinstance(finder, MegatronImportPatches) for finder in sys.meta_path):
        sys.meta_path.insert(0, MegatronImportPatches())
