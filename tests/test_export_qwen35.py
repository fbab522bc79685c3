"""Qwen3.5 end to end on real Megatron-Core models (CPU): dense, MoE, and both image-text types.

Every model has one MTP layer and LoRA with random non-zero A and B on every target
(attention, Gated DeltaNet, dense MLP, shared and routed experts, MTP, vision tower).
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from bridge_ext import export_hf_weights, save_hf_pretrained
from bridge_ext_testing import tiny_models
from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
from bridge_ext_testing.forward import megatron_logits
from bridge_ext.engine import PEFT_PREFIX, ExportError
from bridge_ext.hf_keys import hf_checkpoint_keys
from bridge_ext.live import LiveModelSource
from bridge_ext.ops import SplitGroupedRows
from bridge_ext.reverse import hf_to_megatron
from bridge_ext.verify import Report, check_model_folder, compare_logits, hf_logits, load_adapter_strict, load_hf_model
from bridge_ext.tables import table_for

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")
MODELS = {
    "qwen3_5_text": lambda d: tiny_models.tiny_qwen35_dense(d),
    "qwen3_5_moe_text": lambda d: tiny_models.tiny_qwen35_moe(d),
    "qwen3_5": lambda d: tiny_models.tiny_qwen35_vl(d),
    "qwen3_5_moe": lambda d: tiny_models.tiny_qwen35_vl(d, moe=True),
}
MOE = {"qwen3_5_moe_text", "qwen3_5_moe"}
VL = {"qwen3_5", "qwen3_5_moe"}
PEFT_EXPERT_KEY = re.compile(r"\.mlp\.experts\.(base_layer\.)?lora_[AB]\.weight$")


@pytest.fixture(scope="module", params=list(MODELS))
def built(request, megatron_cpu, tmp_path_factory):
    hf_dir = MODELS[request.param](tmp_path_factory.mktemp(request.param))
    model = build_megatron_model(hf_dir, lora=LoraSettings(target_modules=TARGETS))
    randomize_lora(model.chunks, seed=3, std=0.1)
    model.model_type = request.param
    return model


def source_file_tensors(hf_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def model_inputs(model_type: str) -> tuple[torch.Tensor, dict]:
    if model_type in VL:
        inputs = tiny_models.tiny_vl_inputs(batch=2)
        return inputs.pop("input_ids"), inputs
    return torch.randint(0, 120, (2, 40), generator=torch.Generator().manual_seed(1)), {}


def megatron_reference_logits(built, input_ids: torch.Tensor, extra: dict) -> torch.Tensor:
    """The Megatron model's own logits.

    Known upstream difference, pinned in tests/cpu/test_qwen35_models.py: Megatron-Bridge's
    vision patch merger uses tanh-approximate GELU where Hugging Face's uses the exact one;
    for comparing weights both sides must compute the same function.
    """
    vision = {k: v for k, v in extra.items() if k != "mm_token_type_ids"}
    if built.model_type not in VL:
        return megatron_logits(built.chunks, input_ids)
    merger = built.chunks[0].vision_model.merger
    approximate, merger.activation_func = merger.activation_func, torch.nn.functional.gelu
    try:
        return megatron_logits(built.chunks, input_ids, **vision)
    finally:
        merger.activation_func = approximate


def test_base_weights_are_bit_exact_with_the_source_files_mtp_included(built):
    original = source_file_tensors(built.hf_dir)
    assert any(name.startswith("mtp.") for name in original)
    base = {n: t for n, t in export_hf_weights(built.chunks) if not n.startswith(PEFT_PREFIX)}
    assert sorted(base) == sorted(original)  # the source's own (per-expert) layout is followed
    assert [name for name in original if not torch.equal(base[name], original[name])] == []


@pytest.mark.parametrize("built", sorted(MOE), indirect=True)
def test_fused_expert_layout_holds_the_same_experts(built):
    original = source_file_tensors(built.hf_dir)
    fused = dict(export_hf_weights(built.chunks, peft=False, expert_layout="fused"))
    prefix = "model.language_model." if built.model_type in VL else "model."
    for layer_prefix in (f"{prefix}layers.0.", "mtp.layers.0."):
        gate_up, down = fused[f"{layer_prefix}mlp.experts.gate_up_proj"], fused[f"{layer_prefix}mlp.experts.down_proj"]
        assert gate_up.shape[0] == down.shape[0] == 4
        for expert in range(4):
            per_expert = f"{layer_prefix}mlp.experts.{expert}."
            assert not torch.equal(gate_up[expert], torch.cat([original[per_expert + "gate_proj.weight"],
                                                               original[per_expert + "up_proj.weight"]]))  # merged LoRA
    base = dict(export_hf_weights(built.chunks, expert_layout="fused"))
    gate_up = base[f"{prefix}layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(gate_up[2], torch.cat([original[f"{prefix}layers.0.mlp.experts.2.gate_proj.weight"],
                                              original[f"{prefix}layers.0.mlp.experts.2.up_proj.weight"]]))


@pytest.mark.parametrize("built", ["qwen3_5_moe_text"], indirect=True)
def test_a_folder_without_its_weight_files_still_exports(built, tmp_path):
    """config.json and the index only (a download without weights): the source's layout is
    followed, the shapes of the MTP weights are simply not checked against files."""
    import json
    import shutil

    original = source_file_tensors(built.hf_dir)
    shutil.copy(built.hf_dir / "config.json", tmp_path / "config.json")
    index = {"weight_map": {name: "model-00001-of-00002.safetensors" for name in original}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    exported = dict(export_hf_weights(built.chunks, hf_config=tmp_path))
    assert sorted(n for n in exported if not n.startswith(PEFT_PREFIX)) == sorted(original)


def test_every_name_is_in_the_hf_key_set_and_clean(built):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(built.hf_dir))
    # PEFT's fused expert adapters (the text-only MoE class's live default is vLLM's per-expert one)
    names = [name for name, _ in export_hf_weights(built.chunks, expert_layout="fused", expert_adapter_layout="fused")]
    keys = hf_checkpoint_keys(config, expert_layout="fused")
    base = [n for n in names if not n.startswith(PEFT_PREFIX)]
    assert [n for n in base if n not in keys and not n.startswith("mtp.")] == []
    assert {n for n in keys} <= set(base)
    in_memory_modules = {k.rsplit(".", 1)[0] for k in keys}
    for name in names:
        if name.startswith(PEFT_PREFIX):
            module = re.sub(r"\.(base_layer\.)?lora_[AB]\.weight$", "", name.removeprefix(PEFT_PREFIX))
            assert module in in_memory_modules or module.startswith("mtp.") or module.endswith(".experts"), name
        assert ".to_wrap" not in name and "decoder." not in name
        assert "base_layer" not in name or PEFT_EXPERT_KEY.search(name), name
    if built.model_type in VL:
        assert any(".visual." in n and "lora_B" in n for n in names)


def test_adapter_loads_strictly_in_peft_and_logits_equal_megatron(built, tmp_path):
    save_hf_pretrained(built.chunks, tmp_path / "model", tmp_path / "adapter")
    report = Report()
    check_model_folder(tmp_path / "model", report)
    peft_model = load_adapter_strict(load_hf_model(tmp_path / "model"), tmp_path / "adapter", report)
    input_ids, extra = model_inputs(built.model_type)
    reference = megatron_reference_logits(built, input_ids, extra)
    relative = compare_logits(hf_logits(peft_model, input_ids, **extra), reference, report,
                              what=built.model_type, relative_tolerance=1e-4)
    without = hf_logits(load_hf_model(tmp_path / "model"), input_ids, **extra)
    assert (without - reference).abs().max() / reference.abs().max() > 100 * max(relative, 1e-7)


def _merge_adapters_into(model, pairs: dict[str, torch.Tensor], scale: float) -> None:
    """Merge per-module and per-expert adapters into a transformers model by hand."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in [k for k in pairs if k.endswith("lora_A.weight")]:
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            if module.startswith("mtp."):
                continue
            delta = scale * pairs[key.replace("lora_A", "lora_B")] @ pairs[key]
            expert = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj$", module)
            if expert is None:
                params[f"{module}.weight"].add_(delta)
                continue
            experts, index, kind = expert.group(1), int(expert.group(2)), expert.group(3)
            if kind == "down":
                params[f"{experts}.down_proj"][index].add_(delta)
            else:
                half = params[f"{experts}.gate_up_proj"].shape[1] // 2
                rows = slice(0, half) if kind == "gate" else slice(half, 2 * half)
                params[f"{experts}.gate_up_proj"][index][rows].add_(delta)


@pytest.mark.parametrize("built", sorted(MOE), indirect=True)
def test_per_expert_adapter_layout_gives_the_same_model(built, tmp_path):
    pairs = dict(export_hf_weights(built.chunks, adapters_only=True, expert_adapter_layout="per_expert"))
    assert any(re.search(r"\.experts\.3\.up_proj\.lora_B\.weight$", k) for k in pairs)
    assert not any(PEFT_EXPERT_KEY.search(k) for k in pairs)
    hf_model = load_hf_model(built.hf_dir)
    _merge_adapters_into(hf_model, pairs, scale=8 / 4)
    input_ids, extra = model_inputs(built.model_type)
    reference = megatron_reference_logits(built, input_ids, extra)
    compare_logits(hf_logits(hf_model, input_ids, **extra), reference, Report(), what="per-expert adapters merged",
                   relative_tolerance=1e-4)


def _interleave_per_head(fused_qkv_rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Hugging Face [Q; K; V] rows back to Megatron's per-head [q_h; k_h; v_h] order."""
    return SplitGroupedRows(head_dim, head_dim, head_dim).reverse(list(fused_qkv_rows.chunk(3)), None)[0]


def test_comparison_with_megatron_bridge_exports(built):
    """Merged weights and adapters agree with Megatron-Bridge except the vision ``attn.qkv``.

    Megatron-Bridge emits the vision ``attn.qkv`` lora_B in Megatron's per-head row order, and
    its merged export adds that (wrongly ordered) delta to the de-interleaved base; ours
    de-interleave lora_B like the base, and reproduce the Megatron logits (tests above and
    below). Megatron-Bridge writes fused experts' adapters per expert; ours are PEFT's 3-D ones
    by default, so the per-expert layout is compared.
    """
    ours_merged = dict(export_hf_weights(built.chunks, peft=False))
    theirs_merged = dict(built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=False))
    assert sorted(theirs_merged) == sorted(ours_merged)
    merged_different = sorted(n for n in ours_merged if not torch.allclose(ours_merged[n], theirs_merged[n], rtol=0, atol=1e-6))
    assert merged_different == sorted(n for n in ours_merged if re.search(r"visual\.blocks\.\d+\.attn\.qkv\.weight$", n))

    ours = {n.removeprefix(PEFT_PREFIX): t for n, t in
            export_hf_weights(built.chunks, adapters_only=True, expert_adapter_layout="per_expert")}
    theirs = dict(built.bridge.export_adapter_weights(built.chunks, cpu=True, show_progress=False))
    assert sorted(ours) == sorted(theirs)
    different = sorted(n for n in ours if not torch.equal(ours[n], theirs[n]))
    expected_different = sorted(n for n in ours if ".visual.blocks." in n and n.endswith("attn.qkv.lora_B.weight"))
    assert different == expected_different
    config = built.bridge.hf_pretrained.config
    head_dim = table_for(config).dims(config)["vision_head_dim"] if different else 0
    base = dict(export_hf_weights(built.chunks, peft=True)) if different else {}
    for name in different:
        assert torch.equal(theirs[name], _interleave_per_head(ours[name], head_dim))
        weight = name.replace("lora_B.weight", "weight")
        their_delta = theirs_merged[weight] - base[weight]
        lora_a = ours[name.replace("lora_B", "lora_A")]
        assert torch.allclose(their_delta, (8 / 4) * theirs[name] @ lora_a, atol=1e-6)


def test_merged_export_gives_megatron_logits(built, tmp_path):
    save_hf_pretrained(built.chunks, tmp_path / "merged", merge=True)
    input_ids, extra = model_inputs(built.model_type)
    compare_logits(hf_logits(load_hf_model(tmp_path / "merged"), input_ids, **extra),
                   megatron_reference_logits(built, input_ids, extra), Report(), what="merged export",
                   relative_tolerance=1e-4)


def test_two_mtp_layers_share_one_fc_or_are_refused(megatron_cpu, tmp_path):
    """HF Qwen3.5 has one mtp.fc around N inner layers; Megatron one eh_proj per depth.

    Megatron-Bridge cannot load two MTP layers, so the model is filled through our own table
    (reverse direction). The export writes the shared tensors once and each inner layer at its
    index, bit-exact; if the depths' copies differ it refuses, naming them.
    """
    from transformers import AutoConfig

    hf_dir = tiny_models.tiny_qwen35_dense(tmp_path / "hf", mtp_layers=2)
    config = AutoConfig.from_pretrained(str(hf_dir))
    model = build_megatron_model(hf_dir, load_weights=False)
    source = LiveModelSource(model.chunks)
    table = table_for(config)
    tensors = hf_to_megatron(source_file_tensors(hf_dir), source.base_names(), table, table.dims(config))
    params = dict(model.chunks[0].named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name][: tensor.shape[0]].copy_(tensor)
    exported = dict(export_hf_weights(model.chunks))
    original = source_file_tensors(hf_dir)
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[n], original[n]) for n in original)
    assert {"mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.1.self_attn.q_proj.weight", "mtp.fc.weight"} <= set(exported)
    with torch.no_grad():
        params["mtp.layers.1.eh_proj.weight"].add_(1.0)
    with pytest.raises(ExportError, match=r"mtp\.layers\.0\.eh_proj\.weight and mtp\.layers\.1\.eh_proj\.weight differ"):
        dict(export_hf_weights(model.chunks))


# DoRA (Megatron-Bridge's megatron.bridge.peft.dora.DoRA) ------------------------------------------

MAGNITUDE = ".lora_magnitude_vector"
#: the routed experts left out (Megatron-Bridge's DoRA cannot run on them, see below)
NON_EXPERT_TARGETS = ("linear_qkv", "linear_proj", "in_proj", "out_proj", "*.shared_experts.linear_fc1",
                      "*.shared_experts.linear_fc2")


@pytest.fixture(scope="module", params=["qwen3_5_text", "qwen3_5_moe_text"])
def dora(request, megatron_cpu, tmp_path_factory):
    hf_dir = MODELS[request.param](tmp_path_factory.mktemp(f"dora_{request.param}"))
    targets = TARGETS if request.param not in MOE else NON_EXPERT_TARGETS
    model = build_megatron_model(hf_dir, lora=LoraSettings(kind="dora", target_modules=targets))
    randomize_lora(model.chunks, seed=5, std=0.1)  # magnitudes too: random, unlike the base rows' norms
    model.model_type = request.param
    return model


def test_dora_adapter_loads_strictly_and_both_exports_give_megatron_logits(dora, tmp_path):
    save_hf_pretrained(dora.chunks, tmp_path / "model", tmp_path / "adapter")
    save_hf_pretrained(dora.chunks, tmp_path / "merged", merge=True)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    fused_modules = ("q_proj", "k_proj", "v_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
    assert {m for m in fused_modules if any(n.endswith(f".{m}{MAGNITUDE}") for n in saved)} == set(fused_modules)
    report = Report()
    peft_model = load_adapter_strict(load_hf_model(tmp_path / "model"), tmp_path / "adapter", report)
    assert peft_model.peft_config["default"].use_dora
    input_ids, extra = model_inputs(dora.model_type)
    reference = megatron_reference_logits(dora, input_ids, extra)
    compare_logits(hf_logits(peft_model, input_ids, **extra), reference, report, what=f"{dora.model_type} + DoRA",
                   relative_tolerance=1e-4)
    compare_logits(hf_logits(load_hf_model(tmp_path / "merged"), input_ids, **extra), reference, report,
                   what=f"{dora.model_type} merged DoRA", relative_tolerance=1e-4)


def test_dora_magnitude_rows_are_split_like_the_weight_rows(dora):
    """Every fused module's magnitude, split and de-interleaved, holds the row norms of its
    own merged Hugging Face weight (which the logits above prove)."""
    adapters = dict(export_hf_weights(dora.chunks, adapters_only=True, dora_adapters=True))
    merged = dict(export_hf_weights(dora.chunks, peft=False))
    magnitudes = {n.removeprefix(PEFT_PREFIX).removesuffix(MAGNITUDE): t for n, t in adapters.items()
                  if n.endswith(MAGNITUDE)}
    assert any(".in_proj_b" in m for m in magnitudes) and any(".q_proj" in m for m in magnitudes)
    for module, magnitude in magnitudes.items():
        norms = torch.linalg.norm(merged[f"{module}.weight"], dim=1)
        assert torch.allclose(norms, magnitude, rtol=1e-5), module
    theirs = dict(dora.bridge.export_adapter_weights(dora.chunks, cpu=True, show_progress=False))
    ours = {n.removeprefix(PEFT_PREFIX): t for n, t in adapters.items() if not n.endswith(MAGNITUDE)}
    assert sorted(ours) == sorted(theirs)  # Megatron-Bridge exports no magnitude
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []


def test_dora_on_routed_experts_is_refused_naming_them(megatron_cpu, tmp_path):
    hf_dir = tiny_models.tiny_qwen35_moe(tmp_path / "hf")
    model = build_megatron_model(hf_dir, lora=LoraSettings(kind="dora", target_modules=("linear_fc1",)))
    randomize_lora(model.chunks, seed=6)
    # Megatron-Bridge 0.6.2's own DoRA forward cannot run on sequential experts (the reason for refusing)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        megatron_logits(model.chunks, torch.randint(0, 120, (1, 8)))
    expected = r"DoRA on routed experts \(decoder\.layers\.0\.mlp\.experts\.local_experts\.0\.linear_fc1, .*more\)"
    for options in (dict(adapters_only=True, dora_adapters=True), dict(peft=False)):
        with pytest.raises(ExportError, match=expected):
            next(export_hf_weights(model.chunks, **options))
    with pytest.raises(ExportError, match=expected):
        save_hf_pretrained(model.chunks, tmp_path / "model", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "model").exists()
