"""``bridge-ext convert`` of a full checkpoint with a Hugging Face base runs no megatron code.

The command runs in a fresh interpreter where executing any ``megatron.*`` module raises (finding
one still works), so it cannot depend on the installed megatron versions, nor on bridge_ext.compat's
hook; the configuration cross-check reads the tables' field list, not Megatron-Bridge.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
REFUSE_MEGATRON_AND_RUN_CLI = """
import importlib.abc, importlib.machinery, sys

class Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError(f"{module.__name__} was executed")

class RefuseMegatron(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path) if name.startswith("megatron.") else None
        if spec is not None:
            spec.loader = Refuse()
        return spec

sys.meta_path.insert(0, RefuseMegatron())
from bridge_ext.cli import main
main()
"""


def test_convert_runs_where_megatron_cannot_be_imported(qwen3_ckpts, qwen3_hf, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", REFUSE_MEGATRON_AND_RUN_CLI, "convert", str(qwen3_ckpts / "lora"),
               "--hf-base", str(qwen3_hf), "--model-out", str(tmp_path / "model"),
               "--adapter-out", str(tmp_path / "adapter")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    written = {k: v for f in (tmp_path / "model").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    original = load_file(str(qwen3_hf / "model.safetensors"))
    assert sorted(written) == sorted(original)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
