"""``bridge-ext convert --quantize fp8``: the FP8 folder is the bf16 conversion, block-quantized."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from bridge_ext.cli import main
from bridge_ext.fp8 import quantize_blocks


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["convert", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_fp8_folder_is_the_bf16_conversion_quantized(qwen3_ckpts, qwen3_hf, tmp_path):
    common = (qwen3_ckpts / "lora", "--hf-base", qwen3_hf, "--merge", "--dtype", "bfloat16")
    assert invoke(*common, "--model-out", tmp_path / "bf16")[0] == 0
    code, text = invoke(*common, "--model-out", tmp_path / "fp8", "--quantize", "fp8", "--engine-tp-size", "none")
    assert code == 0, text
    bf16, fp8 = load_file(str(tmp_path / "bf16" / "model.safetensors")), load_file(str(tmp_path / "fp8" / "model.safetensors"))
    quantized = [name for name in fp8 if name + "_scale_inv" in fp8]
    assert len(quantized) == 2 * 7 and set(fp8) == set(bf16) | {name + "_scale_inv" for name in quantized}
    for name, tensor in bf16.items():
        if name in quantized:
            q, scale = quantize_blocks(tensor)
            assert torch.equal(fp8[name].view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(fp8[name + "_scale_inv"], scale), name
        else:
            assert torch.equal(fp8[name], tensor), name
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["modules_to_not_convert"] == ["lm_head"]
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())


def test_fp8_refusals_exit_before_writing(qwen3_ckpts, qwen3_hf, tmp_path):
    common = (qwen3_ckpts / "lora", "--hf-base", qwen3_hf, "--merge", "--quantize", "fp8")
    code, text = invoke(*common, "--model-out", tmp_path / "m")  # vLLM's block check at engine TP 1
    assert code == 4 and "q_proj.weight" in text and "validate_fp8_block_shape" in text, text
    code, text = invoke(*common, "--model-out", tmp_path / "m", "--verify")
    assert code == 2 and "--quantize needs --model-out and no --verify" in text, text
    code, text = invoke(*common, "--model-out", tmp_path / "m", "--engine-tp-size", "0")
    assert code == 2, text
    assert not (tmp_path / "m").exists()
