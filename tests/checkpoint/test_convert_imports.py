"""A plain ``bridge-ext convert`` loads only what a conversion uses: no megatron, no live-model or
parallel-export modules (those load for a live model, ``--model-type`` or ``--verify``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# bridge_ext modules only a live (or distributed) export needs
LIVE_ONLY = ("bridge_ext.live", "bridge_ext.distributed", "bridge_ext.sync", "bridge_ext.trained_forward",
             "bridge_ext.packing", "bridge_ext_testing.demo", "bridge_ext_testing.convert_demo", "bridge_ext_testing")
RUN_CLI_AND_LIST_MODULES = """
import atexit, json, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted(sys.modules))))
from bridge_ext.cli import main
main()
"""


def test_a_plain_conversion_imports_no_megatron_and_no_live_code(qwen3_ckpts, qwen3_hf, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", RUN_CLI_AND_LIST_MODULES, "convert", str(qwen3_ckpts / "lora"),
               "--hf-base", str(qwen3_hf), "--model-out", str(tmp_path / "model"), "--merge"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    modules = json.loads(result.stdout.rsplit("MODULES ", 1)[1])
    assert (tmp_path / "model" / "model.safetensors").is_file()
    # the bare namespace package "megatron" may be there: finding Megatron-Bridge's source (the config
    # cross-check reads it) imports the namespace, which runs no code
    assert not [name for name in modules if name.startswith(("megatron.", "transformer_engine", "triton"))]
    assert not [name for name in modules if name in LIVE_ONLY or name.startswith(tuple(f"{m}." for m in LIVE_ONLY))]


def _module_level_imports(module: str) -> set[str]:
    """The bridge_ext modules ``module`` imports when it is imported (not in functions, not under
    TYPE_CHECKING), each import of a submodule counted with its packages."""
    import ast

    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.parse(path.read_text()).body:  # the module's own statements only
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(2, len(parts) + 1) if parts[0] == "bridge_ext"}
            if isinstance(node, ast.ImportFrom) and parts[0] == "bridge_ext":  # from package import submodule
                found |= {f"{name}.{alias.name}" for alias in node.names
                          if (ROOT / name.replace(".", "/") / f"{alias.name}.py").exists()}
    return found


def test_the_checkpoint_front_end_does_not_import_the_live_one():
    """``bridge_ext.convert`` and everything it imports at module level reach the plan layer
    (bridge_ext.plan, bridge_ext.expert_layouts), never the live front end or the live and
    parallel code (the conversion's own writer is imported where it runs)."""
    seen, pending = set(), ["bridge_ext.convert"]
    while pending:
        module = pending.pop()
        if module not in seen:
            seen.add(module)
            pending.extend(_module_level_imports(module))
    assert {"bridge_ext.plan", "bridge_ext.expert_layouts", "bridge_ext.checkpoint.reader"} <= seen
    live = {"bridge_ext.export", "bridge_ext.save", *LIVE_ONLY}
    assert not seen & live, sorted(seen & live)
    # and the plan layer imports neither front end
    assert not {"bridge_ext.export", "bridge_ext.convert"} & (
        _module_level_imports("bridge_ext.plan") | _module_level_imports("bridge_ext.expert_layouts"))
