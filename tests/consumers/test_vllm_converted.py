"""GLM-5 and DeepSeek-V4: ``convert`` output judged by vLLM 0.34's own loaders (judge.py).

No Megatron model of these classes can be built here, so there is no live stream and no trained
adapter to judge: the folder judged is ``convert`` of the synthetic Megatron-Bridge checkpoint
(tests/checkpoint/synthetic_factory.py). vLLM's class for the folder's architecture
(``GlmMoeDsaForCausalLM``: DeepSeek-V3.2's model; ``DeepseekV4ForCausalLM``: its CPU model) is
built, every parameter poisoned, the folder fed to ``load_weights``: every parameter must be
loaded and equal to what the class loads from the source files, and what it ignores must be
exactly the MTP layer. GLM-5's MTP drafter (``DeepseekV32MTPModel``, what vLLM's speculative
config picks for ``glm_moe_dsa``) is judged the same way and must ignore exactly the main model
but its embedding;
DeepSeek-V4's is not: its CPU drafter raises ``NotImplementedError``.
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
from bridge_ext_testing.tiny_deepseek_v4 import tiny_deepseek_v4  # noqa: E402
from bridge_ext_testing.tiny_gpt_families import tiny_glm_moe_dsa  # noqa: E402

# case -> (tiny folder, provider's mtp_num_layers override, prefix of the MTP layer's names, vLLM's drafter)
CASES = {"glm_moe_dsa": (tiny_glm_moe_dsa, 1, "model.layers.3.", "DeepseekV32MTPModel"),
         "deepseek_v4": (tiny_deepseek_v4, None, "mtp.0.", None)}
KINDS = [(case, kind) for case in CASES for kind in ("base", "merged", "mtp_base", "mtp_merged")
         if CASES[case][3] or not kind.startswith("mtp")]


@pytest.fixture(scope="module")
def verdicts(consumer_python, tmp_path_factory) -> dict:
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("converted")
    manifests, names = [], {}
    for case, (make, mtp_layers, prefix, drafter) in CASES.items():
        out = root / case
        hf_dir = make(out / "hf")
        checkpoint = synthetic_factory.synthetic_checkpoint(hf_dir, out / "ckpt", mtp_layers=mtp_layers)
        result = convert_checkpoint(checkpoint, model_dir=out / "model", hf_base=hf_dir)
        (written,) = result.model_dir.glob("*.safetensors")
        for kind in ("base", "merged"):  # no adapters: the merged stream is the base
            shutil.copy(written, out / f"{kind}.safetensors")
        all_names = sorted(load_file(str(written)))
        names[case] = {"mtp": [n for n in all_names if n.startswith(prefix)],
                       "main": [n for n in all_names if not n.startswith(prefix)]}
        manifest = {"case": case, "source": str(hf_dir), "drafter": drafter, "fused_base": False, "scaling": 1.0,
                    "architectures": json.loads((hf_dir / "config.json").read_text())["architectures"],
                    "streams": {"base": True, "merged": True, "adapters": False}, "saved": {}}
        (out / "manifest.json").write_text(json.dumps(manifest))
        manifests.append(str(out / "manifest.json"))
    result = root / "verdicts.json"
    run = subprocess.run([str(consumer_python), str(HERE / "judge.py"), *manifests, "--out", str(result)],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(result.read_text()), names


@pytest.mark.parametrize(("case", "kind"), KINDS)
def test_vllm_loads_the_converted_folder(verdicts, case, kind):
    found, names = verdicts
    verdict = found[case][kind]
    assert verdict["ok"], {key: value for key, value in verdict.items() if key != "trace"}
    # the main class ignores exactly the MTP layer, the drafter the main model but its embedding
    # (DeepSeek-V3.2's drafter loads model.embed_tokens too: it shares the target's)
    expected = ([n for n in names[case]["main"] if n != "model.embed_tokens.weight"] if kind.startswith("mtp")
                else names[case]["mtp"])
    assert names[case]["mtp"] and sorted(verdict["ignored"]) == expected
