"""GLM-5 and DeepSeek-V4: ``convert`` output judged by vLLM 0.34's own loaders (judge.py).

No Megatron model of these classes can be built here, so there is no live stream and no trained
adapter to judge: the folder judged is ``convert`` of the synthetic Megatron-Bridge checkpoint
(tests/checkpoint/synthetic_factory.py). vLLM's class for the folder's architecture
(``GlmMoeDsaForCausalLM``: DeepSeek-V3.2's model; ``DeepseekV4ForCausalLM``: its CPU model) is
built, every parameter poisoned, the folder fed to ``load_weights``: every parameter must be
loaded and equal to what the class loads from the source files, and what it ignores must be
exactly the MTP layer. The MTP drafters are not judged: DeepSeek-V4's CPU drafter raises
``NotImplementedError``; GLM-5's drafter is left for a later change.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "checkpoint"))

import synthetic_factory  # noqa: E402
from bridge_ext.convert import convert_checkpoint  # noqa: E402
from bridge_ext.cpu.tiny_deepseek_v4 import tiny_deepseek_v4  # noqa: E402
from bridge_ext.cpu.tiny_gpt_families import tiny_glm_moe_dsa  # noqa: E402

# case -> (tiny folder, provider's mtp_num_layers override, prefix of the MTP layer's names)
CASES = {"glm_moe_dsa": (tiny_glm_moe_dsa, 1, "model.layers.3."), "deepseek_v4": (tiny_deepseek_v4, None, "mtp.0.")}


@pytest.fixture(scope="module")
def verdicts(consumer_python, tmp_path_factory) -> dict:
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("converted")
    manifests, mtp_names = [], {}
    for case, (make, mtp_layers, prefix) in CASES.items():
        out = root / case
        hf_dir = make(out / "hf")
        checkpoint = synthetic_factory.synthetic_checkpoint(hf_dir, out / "ckpt", mtp_layers=mtp_layers)
        result = convert_checkpoint(checkpoint, model_dir=out / "model", hf_base=hf_dir)
        (written,) = result.model_dir.glob("*.safetensors")
        for kind in ("base", "merged"):  # no adapters: the merged stream is the base
            shutil.copy(written, out / f"{kind}.safetensors")
        mtp_names[case] = sorted(name for name in load_file(str(written)) if name.startswith(prefix))
        manifest = {"case": case, "source": str(hf_dir), "drafter": None, "fused_base": False, "scaling": 1.0,
                    "architectures": json.loads((hf_dir / "config.json").read_text())["architectures"],
                    "streams": {"base": True, "merged": True, "adapters": False}, "saved": {}}
        (out / "manifest.json").write_text(json.dumps(manifest))
        manifests.append(str(out / "manifest.json"))
    result = root / "verdicts.json"
    run = subprocess.run([str(consumer_python), str(HERE / "judge.py"), *manifests, "--out", str(result)],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(result.read_text()), mtp_names


@pytest.mark.parametrize("kind", ["base", "merged"])
@pytest.mark.parametrize("case", list(CASES))
def test_vllm_loads_the_converted_folder(verdicts, case, kind):
    found, mtp_names = verdicts
    verdict = found[case][kind]
    assert verdict["ok"], {key: value for key, value in verdict.items() if key != "trace"}
    assert mtp_names[case] and verdict["ignored"] == mtp_names[case]
