"""``bridge-ext convert`` of a full checkpoint with a Hugging Face base never imports megatron.

The command runs in a fresh interpreter in which importing any ``megatron`` module fails, so it
cannot depend on the installed megatron versions, nor on the import hook of bridge_ext.compat.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
BLOCK_MEGATRON_AND_RUN_CLI = (
    "import sys; sys.modules['megatron'] = None; "  # None in sys.modules: `import megatron...` raises
    "from bridge_ext.cli import main; main()"
)


def test_convert_runs_where_megatron_cannot_be_imported(qwen3_ckpts, qwen3_hf, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", BLOCK_MEGATRON_AND_RUN_CLI, "convert", str(qwen3_ckpts / "lora"),
               "--hf-base", str(qwen3_hf), "--model-out", str(tmp_path / "model"),
               "--adapter-out", str(tmp_path / "adapter")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    written = {k: v for f in (tmp_path / "model").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    original = load_file(str(qwen3_hf / "model.safetensors"))
    assert sorted(written) == sorted(original)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
