"""``import bridge_ext`` changes nothing; megatron is patched only where, and when, it needs it.

Each case runs in a fresh interpreter (imports cannot be undone in this one). "Transformer Engine
installed" is played by a stub package on the path (every ``transformer_engine.*`` name exists);
this machine has neither Transformer Engine nor Triton, which is the other case.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bridge_ext import compat

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for an installed Transformer Engine: any submodule imports, any name resolves to a
# class (megatron-core subclasses some at import) and a lone callable argument is returned as is
# (decorators).
TE_STUB = '''
import importlib, importlib.abc, importlib.machinery, sys, types

__version__ = "2.8.0"
__path__ = []


class _Anything(type):
    def __getattr__(cls, name):
        return _Anything(name, (), {})

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return _Anything("instance", (), {})


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return importlib.import_module(f"{__name__}.{name}")


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return _Module(spec.name)

    def exec_module(self, module):
        module.__path__ = []


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("transformer_engine."):
            return importlib.machinery.ModuleSpec(name, _Loader(), is_package=True)
        return None


sys.meta_path.append(_Finder())
'''


# Each case's code; they run side by side (each imports megatron, which takes seconds).
CASES = {
    # No megatron, TE, Triton or transformers module after importing bridge_ext and what
    # ``convert`` loads; typing untouched; one finder added, which finds nothing itself.
    "import bridge_ext": """
        import sys, typing
        before_path, before_override = list(sys.meta_path), hasattr(typing, "override")
        import bridge_ext
        from bridge_ext import compat
        # transformers is not imported (it would register its own finders; bridge_ext registers
        # the tables' configs with it only where it reads one): ours is the one finder added.
        assert "transformers" not in sys.modules
        added = [f for f in sys.meta_path if f not in before_path]
        assert len(added) == 1 and isinstance(added[0], compat.MegatronImportPatches), sys.meta_path
        assert sys.meta_path[1:] == before_path
        assert all(added[0].find_spec(name) is None for name in ("json", "megatron", "megatron.core", "triton"))
        assert hasattr(typing, "override") == before_override
        import bridge_ext.cli, bridge_ext.convert, bridge_ext.checkpoint  # everything `convert` loads
        foreign = [m for m in sys.modules
                   if m.split(".")[0] in ("megatron", "transformer_engine", "triton", "fla", "transformers")]
        assert not foreign, foreign
        assert compat.patched_modules() == ()
    """,
    # TE installed (stub): no TE patch, typing untouched; Triton, missing, is named alone.
    "TE installed": """
        import sys, typing
        from bridge_ext import compat
        supported = dict(compat.SUPPORTED_VERSIONS)
        compat.SUPPORTED_VERSIONS.update({"megatron-core": "0.0.0", "megatron-bridge": "0.0.0"})
        try:
            import megatron.core
        except compat.CompatibilityError as error:
            message = str(error)
        else:
            raise AssertionError("the paged-stash patch did not check the version")
        assert message.startswith("Triton is not installed, so bridge_ext.compat patches "
                                  "megatron.core.transformer.moe.ops.paged_stash"), message
        assert "Transformer Engine" not in message and "megatron-core 0.0.0" in message, message

        compat.SUPPORTED_VERSIONS.update(supported)
        import megatron.core, megatron.core.models.gpt.gpt_model
        assert sys.modules["transformer_engine"].__version__ == "2.8.0"  # megatron-core sees the stub
        assert compat.missing_dependencies() == ("Triton",), compat.missing_dependencies()
        assert compat.patched_modules() == (compat.PAGED_STASH_OPS,), compat.patched_modules()
        assert not hasattr(typing, "override") or sys.version_info >= (3, 12)
    """,
    # TE and Triton missing: importing megatron.bridge applies exactly the patches it needs.
    "TE missing": """
        import sys, typing
        import bridge_ext
        from bridge_ext import compat
        assert compat.missing_dependencies() == ("Transformer Engine", "Triton")
        import megatron.bridge
        from megatron.bridge.peft.lora import LoRA
        from megatron.bridge.peft import module_matcher, utils
        from megatron.core.transformer.moe.ops import paged_stash
        expected = {compat.PAGED_STASH_OPS, compat.LORA_LAYERS, *compat.TE_FLAGS}
        if sys.version_info < (3, 12):
            expected |= set(compat.TYPING_OVERRIDE_USERS)
        assert set(compat.patched_modules()) == expected, compat.patched_modules()
        assert not hasattr(typing, "override") or sys.version_info >= (3, 12)
        assert utils.HAVE_TE is False and module_matcher.HAVE_TE_COL_LINEAR is False
        assert "transformer_engine" not in sys.modules and "triton" not in sys.modules
        assert paged_stash.GLOBAL_BLOCK_SIZE == 1024
        try:
            paged_stash.paged_stash_copy_kernel()
        except compat.CompatibilityError as error:
            assert "need Triton" in str(error)
        else:
            raise AssertionError("the placeholder kernel ran")
    """,
    # TE and Triton missing, other megatron-core version: the error names both and the versions.
    "TE missing, other versions": """
        from bridge_ext import compat
        compat.SUPPORTED_VERSIONS["megatron-core"] = "0.0.0"
        try:
            import megatron.bridge
        except compat.CompatibilityError as error:
            message = str(error)
        else:
            raise AssertionError("megatron.bridge imported without a version check")
        assert message.startswith("Transformer Engine and Triton are not installed"), message
        assert "written for megatron-core 0.0.0" in message and "megatron-core==0.0.0" in message, message
    """,
}


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> dict[str, subprocess.Popen]:
    te_stub = tmp_path_factory.mktemp("te_stub")
    (te_stub / "transformer_engine").mkdir()
    (te_stub / "transformer_engine" / "__init__.py").write_text(TE_STUB)
    started = {case: start_python(code, extra_path=te_stub if case == "TE installed" else None)
               for case, code in CASES.items()}
    yield started
    for process in started.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def start_python(code: str, *, extra_path: Path | None = None) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter with this checkout first on the path."""
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else []) + [os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@pytest.mark.parametrize("case", list(CASES))
def test_import_case(processes, case):
    stdout, stderr = processes[case].communicate(timeout=300)
    assert processes[case].returncode == 0, stdout[-3000:] + stderr[-6000:]


@pytest.mark.parametrize(("missing", "text"), [
    (("Transformer Engine",), "Transformer Engine is not installed"),
    (("Triton",), "Triton is not installed"),
    (("Transformer Engine", "Triton"), "Transformer Engine and Triton are not installed"),
])
def test_message_names_what_is_missing(missing, text):
    assert compat.missing_text(missing) == text


# -- every public module imports on its own --------------------------------------------------
# One interpreter that has imported the third-party libraries (none of ours; they are slow to
# import) forks a child per module: each child imports that one module first of bridge_ext's
# (the tables' included), as a user's `python -c "import <module>"` would.
EACH_ALONE = """
    import importlib, os, sys, traceback
    import click, numpy, rich, safetensors.torch, torch, transformers, yaml  # noqa: F401
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            failed.append(name)
    assert not failed, f"these modules do not import on their own: {failed}"
"""


def public_modules() -> list[str]:
    """Every module of the installed package whose name has no leading underscore."""
    names = []
    for path in sorted((ROOT / "bridge_ext").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not any(part.startswith("_") for part in parts):
            names.append(".".join(parts))
    return names


def test_public_modules_are_found():
    modules = public_modules()
    assert {"bridge_ext", "bridge_ext.tables", "bridge_ext.tables.deepseek", "bridge_ext.checkpoint.reader"} <= set(modules)


def test_the_library_does_not_import_the_test_support_package():
    """The harness (testing/bridge_ext_testing) is not in the wheel: only the demo command reaches
    it, inside its function."""
    import ast

    found = []
    for path in sorted((ROOT / "bridge_ext").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno}" for name in names
                      if name.split(".")[0] == "bridge_ext_testing"]
    assert {where.split(":")[0] for where in found} == {"bridge_ext/cli.py"}, found
    assert not (ROOT / "bridge_ext" / "cpu").exists() and not (ROOT / "bridge_ext" / "demo.py").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the check forks one child per module")
def test_each_public_module_imports_alone_in_a_fresh_interpreter():
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(EACH_ALONE), *public_modules()],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_the_library_has_one_error_root():
    import bridge_ext
    from bridge_ext import errors

    families = {name: value for name, value in vars(errors).items()
                if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == errors.__name__}
    assert "BridgeExtError" in families and "TableError" in families
    for name, family in families.items():
        assert getattr(bridge_ext, name) is family and name in bridge_ext.__all__, name
        assert issubclass(family, bridge_ext.BridgeExtError), name
