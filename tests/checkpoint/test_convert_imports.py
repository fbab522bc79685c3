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
