"""MiniMax-M2, Kimi-K2.5 and Nemotron-H on real Megatron-Core models (CPU), cut down from the published configs.

Each tiny Hugging Face model (:mod:`bridge_ext_testing.tiny_frontier`) is built once per module through
Megatron-Bridge's provider with megatron-core's local spec, with LoRA (random non-zero A and B) on
every target Megatron-Bridge offers for it. The Hugging Face forward (transformers + PEFT) judges
the exported folders; Megatron-Bridge's own export is compared tensor by tensor. Kimi-K2.5's
vision tower is Megatron-Bridge's remote-code module: here its parameters stand in under their
checkpoint names (:mod:`bridge_ext_testing.frontier`), exported bit for bit; only text runs forward.
Nemotron-H builds and loads in Megatron on CPU, but its Mamba mixers cannot run forward there
(``NO_MEGATRON_FORWARD``).
"""

from __future__ import annotations

import json

import pytest
import torch

from bridge_ext import export_hf_weights, save_hf_pretrained
from bridge_ext_testing import tiny_frontier as tiny
from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
from bridge_ext_testing.forward import megatron_logits
from bridge_ext.hf_keys import hf_checkpoint_keys
from bridge_ext.peft_keys import PEFT_PREFIX
from bridge_ext.verify import Report, check_model_folder, compare_logits, hf_logits, load_adapter_strict
from test_conformance_deepseek_family import hf_base_model, input_ids, source_tensors

GQA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
MLA_TARGETS = ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj",
               "linear_proj", "linear_fc1", "linear_fc2")
MODELS = {
    "minimax_m2": (tiny.tiny_minimax_m2, GQA_TARGETS),
    "kimi_k25": (tiny.tiny_kimi_k25, MLA_TARGETS),
    # Mamba's out_proj: PEFT refuses LoRA there (test_peft_refuses_mamba_out_proj_adapters)
    "nemotron_h": (tiny.tiny_nemotron_h, GQA_TARGETS + ("in_proj",)),
}
# Megatron cannot run these forward on CPU: the reference is transformers' forward of the merged
# export instead (whose every tensor test_comparison_with_megatron_bridge checks against
# Megatron-Bridge's own merge). tests/gpu/test_nemotron_h_forward.py runs Megatron's forward.
NO_MEGATRON_FORWARD = {"nemotron_h": "megatron-core's Mamba mixer runs only with mamba_ssm's CUDA kernels"}
LORA = dict(dim=4, alpha=8)


@pytest.fixture(scope="module", params=list(MODELS))
def built(request, megatron_cpu, tmp_path_factory):
    make, targets = MODELS[request.param]
    hf_dir = make(tmp_path_factory.mktemp(request.param))
    model = build_megatron_model(hf_dir, lora=LoraSettings(target_modules=targets, **LORA))
    randomize_lora(model.chunks, seed=3, std=0.1)
    model.family = request.param
    return model


def reference_logits(built) -> torch.Tensor:
    if built.family in NO_MEGATRON_FORWARD:
        if not hasattr(built, "merged_logits"):
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory() as folder:
                save_hf_pretrained(built.chunks, Path(folder) / "merged", merge=True)
                built.merged_logits = hf_logits(hf_base_model(Path(folder) / "merged"), input_ids())
        return built.merged_logits
    return megatron_logits(built.chunks, input_ids())


def test_base_is_bit_exact_and_names_are_transformers_keys(built):
    from transformers import AutoConfig

    original = source_tensors(built.hf_dir)
    base = {n: t for n, t in export_hf_weights(built.chunks) if not n.startswith(PEFT_PREFIX)}
    assert sorted(base) == sorted(original)
    assert [n for n in original if not torch.equal(base[n], original[n])] == []
    assert sorted(base) == sorted(hf_checkpoint_keys(AutoConfig.from_pretrained(str(built.hf_dir))))


@pytest.mark.parametrize("built", ["minimax_m2"], indirect=True)
def test_minimax_m2_declares_mtp_but_neither_side_builds_it(built):
    """The published config declares 3 MTP modules; no MTP tensor is built, loaded or written."""
    config = json.loads((built.hf_dir / "config.json").read_text())
    assert (config["use_mtp"], config["num_mtp_modules"]) == (True, 3)
    assert not any(".mtp" in n or n.startswith("mtp") for chunk in built.chunks for n, _ in chunk.named_parameters())
    assert not any(n.startswith(f"model.layers.{config['num_hidden_layers']}.")
                   for n, _ in export_hf_weights(built.chunks))


def test_adapter_loads_strictly_in_peft_and_logits_equal_megatron(built, tmp_path):
    save_hf_pretrained(built.chunks, tmp_path / "model", tmp_path / "adapter")
    report = Report()
    check_model_folder(tmp_path / "model", report)
    peft_model = load_adapter_strict(hf_base_model(tmp_path / "model"), tmp_path / "adapter", report)
    reference = reference_logits(built)
    relative = compare_logits(hf_logits(peft_model, input_ids()), reference, report, what=built.family,
                              relative_tolerance=1e-4)
    without = hf_logits(hf_base_model(tmp_path / "model"), input_ids())
    assert (without - reference).abs().max() / reference.abs().max() > 100 * max(relative, 1e-7)


@pytest.mark.parametrize("expert_layout", ["per_expert", "fused"])
def test_merged_export_gives_megatron_logits_in_both_expert_layouts(built, expert_layout, tmp_path):
    save_hf_pretrained(built.chunks, tmp_path / "merged", merge=True, expert_layout=expert_layout)
    compare_logits(hf_logits(hf_base_model(tmp_path / "merged"), input_ids()), reference_logits(built), Report(),
                   what=f"merged export, {expert_layout} experts", relative_tolerance=1e-4)


def test_comparison_with_megatron_bridge(built):
    """Megatron-Bridge 0.6.2's merged export and adapters equal ours (per-expert layout) name for
    name and tensor for tensor."""
    from transformers import AutoConfig

    from bridge_ext.tables import table_for

    if built.family == "kimi_k25":
        compare_kimi_k25_with_megatron_bridge(built)
        return
    ours_merged = dict(export_hf_weights(built.chunks, peft=False, expert_layout="per_expert"))
    theirs_merged = dict(built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=False))
    assert sorted(ours_merged) == sorted(theirs_merged)
    assert [n for n in ours_merged if not torch.allclose(ours_merged[n], theirs_merged[n], rtol=0, atol=1e-6)] == []
    ours = {n.removeprefix(PEFT_PREFIX): t for n, t in
            export_hf_weights(built.chunks, adapters_only=True, expert_adapter_layout="per_expert")}
    # Megatron-Bridge keys adapters by checkpoint names, PEFT (and ours) by the in-memory ones
    table = table_for(AutoConfig.from_pretrained(str(built.hf_dir)))
    theirs = {table.in_memory_name(n): t for n, t in
              built.bridge.export_adapter_weights(built.chunks, cpu=True, show_progress=False)}
    assert sorted(ours) == sorted(theirs)
    assert [n for n in ours if not torch.equal(ours[n], theirs[n])] == []


def test_config_fields_are_compared_and_a_changed_one_is_named(built):
    """Every field that changes the arithmetic agrees with the built model; one changed is named
    (MiniMax-M2: the routing bias, the rotary fraction read from ``rotary_dim``)."""
    from transformers import AutoConfig

    from bridge_ext.config_compare import Attributes, compare
    from bridge_ext.tables import config_fields_for, table_for

    config = AutoConfig.from_pretrained(str(built.hf_dir))
    fields = config_fields_for(table_for(config))
    settings = Attributes(built.chunks[0].config)
    same = compare(config, settings, fields)
    assert same.differences == []
    holder, name, value, megatron, also = {
        "minimax_m2": ("", "use_routing_bias", False, "moe_router_enable_expert_bias", ["rotary_percent"]),
        "kimi_k25": ("text_config", "routed_scaling_factor", 1.0, "moe_router_topk_scaling_factor",
                     ["kv_lora_rank", "qk_pos_emb_head_dim"]),
        "nemotron_h": ("", "n_groups", 4, "mamba_num_groups",
                       ["mamba_num_heads", "mamba_state_dim", "hybrid_layer_pattern", "activation_func"]),
    }[built.family]
    assert {megatron, *also} <= set(same.compared)
    setattr(getattr(config, holder) if holder else config, name, value)
    assert [line for line in compare(config, settings, fields).differences if megatron in line] != []


def compare_kimi_k25_with_megatron_bridge(built) -> None:
    """Megatron-Bridge 0.6.2 cannot merge Kimi-K2.5's LoRA: in the first MoE layer it adds a
    ``[32, 64]`` delta to a ``[32, 8]`` tensor and fails (``lora_merge.py``). Unmerged, its names
    keep ``.base_layer`` on every LoRA-wrapped module (the base weights equal ours once it is
    removed, except the routed experts, which it writes as INT4), and its adapters are keyed by the checkpoint's spelling (``language_model.model.``)
    where PEFT keys the model in memory (``model.language_model.``, ours): equal tensor for
    tensor once renamed."""
    from megatron.bridge.models.conversion.quantization_utils import dequantize_int4
    from transformers import AutoConfig

    from bridge_ext.tables import table_for

    with pytest.raises(RuntimeError, match="must match the size"):
        dict(built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=False))
    theirs = dict(built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=False,
                                                 merge_adapter_weights=False))
    wrapped = sorted(n for n in theirs if ".base_layer." in n)
    assert wrapped and all(".self_attn." in n or ".mlp." in n for n in wrapped)
    theirs = {n.replace(".base_layer.", "."): t for n, t in theirs.items()}
    ours = {n: t for n, t in export_hf_weights(built.chunks, expert_layout="per_expert") if not n.startswith(PEFT_PREFIX)}
    # and it writes every routed expert of the MoE layers as INT4 (compressed-tensors' packed
    # triplets, kimi_k25_vl_bridge.py), whatever the source held: close to ours, not equal
    experts = sorted(n for n in ours if ".mlp.experts." in n)
    assert experts and all(f"{n}_packed" in theirs for n in experts)
    for name in experts:
        back = dequantize_int4(theirs.pop(f"{name}_packed"), theirs.pop(f"{name}_scale"), theirs.pop(f"{name}_shape"))
        assert (back.float() - ours[name]).abs().max() <= ours[name].abs().max() / 7, name
    assert sorted(set(ours) - set(experts)) == sorted(theirs)
    assert [n for n in theirs if not torch.equal(ours[n], theirs[n])] == []
    table = table_for(AutoConfig.from_pretrained(str(built.hf_dir)))
    ours = {n.removeprefix(PEFT_PREFIX): t for n, t in
            export_hf_weights(built.chunks, adapters_only=True, expert_adapter_layout="per_expert")}
    theirs = {table.in_memory_name(n): t for n, t in
              built.bridge.export_adapter_weights(built.chunks, cpu=True, show_progress=False)}
    assert sorted(ours) == sorted(theirs)
    assert [n for n in ours if not torch.equal(ours[n], theirs[n])] == []


def test_kimi_k25_saved_name_fixes_are_what_transformers_save_gets_wrong(tmp_path):
    """transformers 5.23's own save_pretrained of Kimi-K2.5 differs from the published names
    (which its loader reads, and vLLM and Megatron-Bridge use) exactly where the table fixes it."""
    import re

    from safetensors import safe_open
    from transformers import AutoConfig, Kimi_K25ForConditionalGeneration

    from bridge_ext.tables.kimi_k25 import SAVED_NAME_FIXES

    published = tiny.tiny_kimi_k25(tmp_path / "published")
    config = AutoConfig.from_pretrained(str(published))
    Kimi_K25ForConditionalGeneration(config).save_pretrained(str(tmp_path / "raw"))
    with safe_open(str(tmp_path / "raw" / "model.safetensors"), "pt") as raw:
        written = sorted(raw.keys())
    expected = sorted(hf_checkpoint_keys(config))
    assert written != expected
    fixed = written
    for pattern, replacement in SAVED_NAME_FIXES:
        assert any(re.search(pattern, name) for name in fixed), pattern  # each fix is needed
        fixed = [re.sub(pattern, replacement, name) for name in fixed]
    assert sorted(fixed) == expected
    assert {"language_model.model.layers.0.self_attn.q_a_proj.weight", "vision_tower.patch_embed.proj.weight",
            "mm_projector.pre_norm.weight", "vision_tower.encoder.blocks.0.wqkv.weight"} <= set(expected)


def test_peft_refuses_mamba_out_proj_adapters(megatron_cpu, tmp_path):
    """Megatron-Bridge's LoRA offers Mamba's ``out_proj``; PEFT 0.21.2 refuses LoRA on it for
    Mamba models (at load, naming it): exported all the same (live streams, vLLM folders), the
    PEFT folder of such a run does not load."""
    model = build_megatron_model(tiny.tiny_nemotron_h(tmp_path / "hf"), lora=LoraSettings(target_modules=("out_proj",)))
    randomize_lora(model.chunks, seed=3, std=0.1)
    adapters = [n for n, _ in export_hf_weights(model.chunks, adapters_only=True)]
    assert adapters and all(".mixer.out_proj.lora_" in n for n in adapters)
    save_hf_pretrained(model.chunks, tmp_path / "model", tmp_path / "adapter")
    with pytest.raises(ValueError, match="'out_proj' is incompatible with Mamba-based models"):
        load_adapter_strict(hf_base_model(tmp_path / "model"), tmp_path / "adapter", Report())
