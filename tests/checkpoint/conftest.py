"""Checkpoints for the ``convert`` tests, written by megatron-core's own ``dist_checkpointing.save``.

``qwen3_ckpts`` / ``qwen3_ckpts_tp2``: the tiny Qwen3 of :mod:`ckpt_factory` saved at TP=1 (in this
process) and TP=2 (a 2-process gloo torchrun), as a dense, a full LoRA and an adapter-only
checkpoint each. Session-scoped: every convert test module shares them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import bridge_ext  # noqa: F401  (before megatron: works around TE / Triton imports)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import ckpt_factory  # noqa: E402


@pytest.fixture(scope="session")
def qwen3_hf(tmp_path_factory) -> Path:
    return ckpt_factory.tiny_qwen3(tmp_path_factory.mktemp("convert_hf") / "qwen3")


@pytest.fixture(scope="session")
def qwen3_ckpts(qwen3_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert_tp1")
    ckpt_factory.save_all(qwen3_hf, out, tensor_parallel=1)
    return out


@pytest.fixture(scope="session")
def qwen3_ckpts_tp2(qwen3_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert_tp2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "ckpt_factory.py"), str(qwen3_hf), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out
