"""Qwen3.5 export checked with the real flash-linear-attention kernels (GPU only).

On CPU machines the Megatron model's Gated DeltaNet runs bridge_ext's pure-torch stand-in;
this test repeats the logits check with fla's Triton kernels. It needs a CUDA GPU and the
flash-linear-attention package: run ``python scripts/gpu/check_qwen35_with_fla.py`` there.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

GPU_AND_FLA = torch.cuda.is_available() and importlib.util.find_spec("fla") is not None
pytestmark = pytest.mark.skipif(
    not GPU_AND_FLA,
    reason="needs a CUDA GPU and flash-linear-attention (fla); on a GPU machine run "
    "scripts/gpu/check_qwen35_with_fla.py",
)


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3_5_moe_text", "qwen3_5", "qwen3_5_moe"])
def test_megatron_with_fla_kernels_matches_transformers_and_peft(model_type, megatron_cpu, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "gpu"))
    from check_qwen35_with_fla import check_model_type

    torch.backends.cuda.matmul.allow_tf32 = False
    result = check_model_type(model_type, tmp_path)
    # Folders exported from GPU tensors reproduce the same Megatron model run on the CPU.
    assert result["megatron_cpu_relative_difference"] <= 1e-4
    # The GPU forward (fla's kernels) differs from the CPU one by its rounding only.
    assert result["relative_logit_difference"] <= 2e-2
