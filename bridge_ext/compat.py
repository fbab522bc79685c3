"""Import megatron-core and megatron-bridge on machines without Transformer Engine or Triton.

Two upstream imports are unconditional although the code behind them is only used on GPUs:

* ``megatron/bridge/peft/lora_layers.py`` does ``import transformer_engine.pytorch as te``
  (used for TE-fused LoRA branches and ``isinstance`` checks against TE modules);
* ``megatron/core/transformer/moe/ops/paged_stash.py`` does ``import triton`` (GPU kernels
  for MoE activation stashing).

And without TE, megatron-core defines its ``TE*`` classes on top of ``MagicMock`` objects, so
megatron-bridge's ``HAVE_TE*`` probes (``peft/utils.py``, ``peft/module_matcher.py``) read
True and the LoRA code then calls ``isinstance(module, <MagicMock instance>)``, which raises.

:func:`install` works around exactly these things, and nothing else:

A fourth: megatron-core 0.19 and megatron-bridge 0.6 declare Python >= 3.12 and use one 3.12
name, ``typing.override`` (``megatron/training/models/{gpt,hybrid}.py``); on 3.11 it is
supplied from ``typing_extensions`` (same decorator, backported).

* it does nothing when Transformer Engine is importable (resp. Triton, for the second);
* it refuses, with a message naming the file, when the installed versions or the lines it
  works around are not the ones it was written for;
* it never edits installed files: a meta-path hook supplies a placeholder ``te`` only while
  ``lora_layers`` itself executes, a placeholder module stands in for the Triton kernels
  (raising if a kernel is ever called), and the ``HAVE_TE*`` flags are set to False right
  after their modules load.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from bridge_ext.errors import CompatibilityError

SUPPORTED_VERSIONS = {"megatron-core": "0.19.2", "megatron-bridge": "0.6.2"}

LORA_LAYERS = "megatron.bridge.peft.lora_layers"
LORA_LAYERS_TE_IMPORT = "import transformer_engine.pytorch as te"
PAGED_STASH_OPS = "megatron.core.transformer.moe.ops.paged_stash"
PAGED_STASH_TRITON_IMPORT = "import triton"
PAGED_STASH_EXPORTS = {"GLOBAL_BLOCK_SIZE": "GLOBAL_BLOCK_SIZE = 1024"}
PAGED_STASH_KERNELS = ("paged_stash_copy_kernel", "paged_stash_pop_kernel")

# Module -> the TE availability flags it computes at import time.
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

# Modules that lora_layers imports besides TE; loaded before the placeholder appears, so
# that nothing but lora_layers' own ``import transformer_engine.pytorch`` can see it.
LORA_LAYERS_DEPENDENCIES = (
    "megatron.core.extensions.transformer_engine",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.bridge.peft.adapter_wrapper",
    "megatron.bridge.peft.lora_merge",
)


def have_module(name: str) -> bool:
    """True when ``name`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _source_of(module_name: str) -> tuple[str, str]:
    """Path and text of a module's source, found without importing its parent packages."""
    top, *rest = module_name.split(".")
    spec = importlib.util.find_spec(top)
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = os.path.join(root, *rest) + ".py"
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                return path, handle.read()
    raise CompatibilityError(f"cannot locate the source of {module_name}; is it installed?")


def _require_lines(module_name: str, lines: list[str]) -> None:
    """Fail unless each of ``lines`` begins a line of the module's source."""
    path, source = _source_of(module_name)
    present = [line.strip() for line in source.splitlines()]
    for line in lines:
        if not any(candidate.startswith(line) for candidate in present):
            raise CompatibilityError(
                f"{path} no longer contains {line!r}; bridge_ext.compat was written for "
                f"{SUPPORTED_VERSIONS} and must be reviewed for this version."
            )


def _check_versions() -> None:
    for package, wanted in SUPPORTED_VERSIONS.items():
        try:
            found = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError as error:
            raise CompatibilityError(f"{package} is not installed") from error
        if found != wanted:
            raise CompatibilityError(
                f"{package} {found} is installed, but bridge_ext.compat (needed because "
                f"Transformer Engine is absent) was written for {package} {wanted}."
            )


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
def modules_in_place(modules: dict[str, types.ModuleType]) -> Iterator[None]:
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


class _AfterExec(importlib.abc.Loader):
    """Wraps a module's own loader; runs hooks around its execution."""

    def __init__(self, loader: importlib.abc.Loader, around: Callable[[types.ModuleType], object]):
        self._loader = loader
        self._around = around

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._around(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Meta-path hook that wraps the loaders of a few named megatron modules."""

    def __init__(self, hooks: dict[str, Callable[[importlib.abc.Loader, types.ModuleType], None]]):
        self._hooks = hooks

    def find_spec(self, fullname, path=None, target=None):
        hook = self._hooks.get(fullname)
        if hook is None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        spec.loader = _AfterExec(loader, lambda module: hook(loader, module))
        return spec


def _exec_lora_layers(loader: importlib.abc.Loader, module: types.ModuleType) -> None:
    for dependency in LORA_LAYERS_DEPENDENCIES:
        importlib.import_module(dependency)
    te_package = types.ModuleType("transformer_engine")
    te_pytorch = _PlaceholderTE("transformer_engine.pytorch")
    te_package.pytorch = te_pytorch
    with modules_in_place({"transformer_engine": te_package, "transformer_engine.pytorch": te_pytorch}):
        loader.exec_module(module)


def _clear_te_flags(loader: importlib.abc.Loader, module: types.ModuleType) -> None:
    loader.exec_module(module)
    for flag in TE_FLAGS[module.__name__]:
        if not hasattr(module, flag):
            raise CompatibilityError(f"{module.__name__} no longer defines {flag}")
        setattr(module, flag, False)


def _paged_stash_placeholder() -> types.ModuleType:
    module = types.ModuleType(PAGED_STASH_OPS, "Placeholder: Triton is not installed.")
    module.GLOBAL_BLOCK_SIZE = 1024

    def kernel_needs_triton(*args, **kwargs):
        raise CompatibilityError("MoE paged-stash kernels need Triton and a GPU.")

    for name in PAGED_STASH_KERNELS:
        setattr(module, name, kernel_needs_triton)
    module.__all__ = ["GLOBAL_BLOCK_SIZE", *PAGED_STASH_KERNELS]
    return module


_installed = False


def _backport_typing_override() -> None:
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


def install() -> None:
    """Make ``import megatron.core`` / ``megatron.bridge`` work without TE and Triton.

    Must run before megatron is imported; ``import bridge_ext`` calls it. Idempotent.
    """
    global _installed
    if _installed:
        return
    _installed = True
    _backport_typing_override()
    te_missing = not have_module("transformer_engine")
    triton_missing = not have_module("triton")
    if not (te_missing or triton_missing):
        return
    _check_versions()
    if triton_missing and PAGED_STASH_OPS not in sys.modules:
        _require_lines(PAGED_STASH_OPS, [PAGED_STASH_TRITON_IMPORT, *PAGED_STASH_EXPORTS.values()])
        sys.modules[PAGED_STASH_OPS] = _paged_stash_placeholder()
    if te_missing:
        if LORA_LAYERS in sys.modules:
            raise CompatibilityError(
                "megatron.bridge was imported before bridge_ext; import bridge_ext first "
                "when Transformer Engine is not installed."
            )
        _require_lines(LORA_LAYERS, [LORA_LAYERS_TE_IMPORT])
        for module_name, flags in TE_FLAGS.items():
            _require_lines(module_name, [f"{flags[0]} = all("])
        hooks = {LORA_LAYERS: _exec_lora_layers}
        hooks.update({name: _clear_te_flags for name in TE_FLAGS})
        sys.meta_path.insert(0, _Finder(hooks))
