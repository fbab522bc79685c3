"""Every export of the project's tiny models, judged by vLLM 0.34's own loaders (judge.py).

One module: the tables' tiny models x (base stream, merged stream, live adapters, saved adapter
folders for PEFT and for vLLM, MTP drafter fed both streams). The exports are made here (main
environment), then one judge process in the consumer environment loads them all; each test
reads its verdict. ``ok`` means: every parameter of vLLM's class written (NaN-poisoned first,
vLLM's own loaded set), base values equal to what vLLM loads from the source files, and for
adapters ``B @ A`` in vLLM's LoRA buffers equal to the trained delta for every adapted weight.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from exports import CASES, write_exports

HERE = Path(__file__).parent
# vLLM's refusal of a folder in PEFT's fused expert layout on a class it wraps per expert
FUSED_ON_2D = "contains fused 3D MoE weights"
PER_EXPERT_CLASSES = {"qwen3_moe", "qwen3_5_moe_text", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "qwen2_moe",
                      "qwen3_next"}
# per-expert classes that do not refuse PEFT's fused folder but leave its expert adapters
# unapplied: vLLM has no module under the in-memory name (MiniMax-M2: mlp.experts, vLLM's
# block_sparse_moe.experts); the weights so left zero, by name
ZEROED_ON_2D = {"minimax_m2": ".block_sparse_moe.experts."}
# classes vLLM 0.34 builds without LoRA support (no SupportsLoRA): the engine refuses enable_lora,
# so only the base and merged streams can reach them (the judge never gets to the saved folders)
NO_LORA = {"kimi_k25": "LoRA is not supported for KimiK25ForConditionalGeneration"}
# adapters vLLM leaves unapplied with its default engine options, by design: vision-tower ones
# need enable_tower_connector_lora (docs/consumers.md)
DROPPED = {"qwen3_5_moe_vl": "visual."}
KINDS = ("base", "merged", "live", "saved_vllm", "saved_peft", "mtp_base", "mtp_merged")


def expected(case: str, kind: str) -> str | None:
    """None: loads fully and exactly; else the start of vLLM's refusal."""
    if kind == "saved_peft" and case in PER_EXPERT_CLASSES:
        return FUSED_ON_2D
    return None


PAIRS = [(case, kind) for case in CASES for kind in KINDS
         if (not kind.startswith("mtp") or CASES[case].drafter) and not (case in NO_LORA and kind.startswith("saved"))]


@pytest.fixture(scope="module")
def verdicts(consumer_python, megatron_cpu, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("consumers")
    manifests = []
    for case in CASES:
        out = root / case
        out.mkdir()
        write_exports(case, out)
        manifests.append(str(out / "manifest.json"))
    manifests.append(str(_mutant(root / "qwen3", root / "qwen3_mutant")))
    result = root / "verdicts.json"
    run = subprocess.run([str(consumer_python), str(HERE / "judge.py"), *manifests, "--out", str(result)],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(result.read_text())


MUTATED_B = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"


def _mutant(folder, out):
    """qwen3's exports with the final norm left out of the base stream and one lora_B negated:
    the judge must see both."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    base = load_file(str(out / "base.safetensors"))
    del base["model.norm.weight"]
    save_file(base, str(out / "base.safetensors"))
    adapters = load_file(str(out / "adapters.safetensors"))
    adapters[MUTATED_B] = -adapters[MUTATED_B]
    save_file(adapters, str(out / "adapters.safetensors"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(case="qwen3_mutant", saved={})
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out / "manifest.json"


def test_the_judge_sees_a_missing_tensor_and_a_wrong_adapter(verdicts):
    mutant = verdicts["qwen3_mutant"]
    assert mutant["base"]["nan"] == ["model.norm.weight"] and not mutant["base"]["ok"]
    wrong = mutant["live"]["wrong"]
    assert len(wrong) == 1 and wrong[0].startswith("model.layers.1.self_attn.o_proj.weight: max |B@A - trained|")


@pytest.mark.parametrize(("case", "kind"), PAIRS, ids=[f"{c}-{k}" for c, k in PAIRS])
def test_vllm_loads_the_export(verdicts, case, kind):
    verdict = verdicts[case][kind]
    refusal = expected(case, kind)
    if kind == "live" and case in NO_LORA:
        assert not verdict["ok"] and NO_LORA[case] in verdict.get("trace", ""), verdict
    elif kind == "saved_peft" and case in ZEROED_ON_2D:
        zero = verdict.get("zero", [])
        assert not verdict["ok"] and zero and all(ZEROED_ON_2D[case] in name for name in zero), verdict
        assert not verdict.get("wrong"), verdict
    elif refusal is None:
        shown = {key: value for key, value in verdict.items() if key != "trace"}
        unexplained = [name for name in verdict.get("dropped", []) if not name.startswith(DROPPED.get(case, "\0"))]
        fine = verdict["ok"] or ("dropped" in verdict and not (verdict["wrong"] or verdict["zero"] or unexplained))
        assert fine, f"{case} {kind}: {shown}\n{verdict.get('trace', '')}"
    else:  # documented in docs/consumers.md; a vLLM that starts loading it shows here
        assert not verdict["ok"] and refusal in verdict.get("error", ""), verdict


IGNORED = "ignored"  # vLLM skips the fused expert tensors silently and loads no expert
# The fact behind the tables' vllm_expert_layouts (adapter_for="vllm" refuses expert_layout="fused"
# for these classes): per stream, None where vLLM loads it fully, else the start of its error.
FUSED_BASE = {
    "deepseek_v3": {"base_fused": "KeyError: 'layers.1.mlp.experts.down_proj'",
                    "mtp_base_fused": "KeyError: 'model.layers.3.mtp_block.mlp.experts.down_proj'"},
    # Glm4MoeForCausalLM loads them; its MTP drafter, fed the same stream, does not
    "glm4_moe": {"base_fused": None,
                 "mtp_base_fused": "KeyError: 'model.layers.3.mtp_block.mlp.experts.down_proj'"},
    "glm4_moe_lite": {"base_fused": "KeyError: 'layers.1.mlp.experts.down_proj'",
                      "mtp_base_fused": "KeyError: 'model.layers.3.mtp_block.mlp.experts.down_proj'"},
    "kimi_k25": {"base_fused": "KeyError: 'layers.1.mlp.experts.down_proj'"},
    # MiniMaxM2ForCausalLM ignores them without an error: its experts are left unloaded
    "minimax_m2": {"base_fused": IGNORED},
}


@pytest.mark.parametrize("case", sorted(FUSED_BASE))
def test_vllm_loads_fused_base_experts_only_where_the_table_says_so(verdicts, case):
    assert {name for name, each in CASES.items() if each.fused_base} == set(FUSED_BASE)
    for kind, error in FUSED_BASE[case].items():
        verdict = verdicts[case][kind]
        if error is None:
            assert verdict["ok"], f"{case} {kind}: {verdict}"
        elif error == IGNORED:
            ignored = verdict.get("ignored", [])
            assert not verdict["ok"] and ignored and all(n.endswith((".gate_up_proj", ".down_proj")) for n in ignored)
            assert verdict.get("nan") and all(".experts." in n for n in verdict["nan"]), f"{case} {kind}: {verdict}"
        else:
            assert not verdict["ok"] and verdict.get("error", "").startswith(error), f"{case} {kind}: {verdict}"


def test_what_vllm_ignores_is_explained(verdicts):
    """The main classes skip only MTP tensors (their drafter loads them); the drafters skip
    only the main model's tensors."""
    mtp = {"qwen3_5_moe_text": ("mtp.",), "qwen3_5_moe_vl": ("mtp.",), "qwen3_next": ("mtp.",),
           "deepseek_v3": ("model.layers.3.",), "glm4_moe": ("model.layers.3.",),
           "glm4_moe_lite": ("model.layers.3.",)}
    for case, checks in verdicts.items():
        if case not in CASES:
            continue
        for kind in ("base", "merged"):
            ignored = checks[kind].get("ignored", [])
            unexplained = [name for name in ignored if not name.startswith(mtp.get(case, ("\0",)))]
            assert not unexplained, f"{case} {kind}: vLLM ignores {unexplained}"
            if f"mtp_{kind}" in checks:
                drafter_ignored = checks[f"mtp_{kind}"].get("ignored", [])
                assert not [name for name in drafter_ignored if name.startswith(mtp[case])], (case, kind)
