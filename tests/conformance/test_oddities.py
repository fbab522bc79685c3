"""Architecture oddities beside the contract: specific tests that build their own tiny models
(two MTP layers, a bias inside DoRA's product, DoRA refused on routed experts) or check names
only (Moonlight, GLM-5: megatron-core's local spec cannot build them on a CPU)."""

from __future__ import annotations

import pytest
import torch

from bridge_ext import export_hf_weights, save_hf_pretrained
from bridge_ext.engine import ExportError
from bridge_ext.hf_keys import hf_checkpoint_keys
from bridge_ext.live import LiveModelSource
from bridge_ext.reverse import hf_to_megatron
from bridge_ext.tables import table_for
from bridge_ext.verify import Report, compare_logits, hf_logits, load_hf_model
from bridge_ext_testing import tiny_gpt_families as tiny
from bridge_ext_testing import tiny_models
from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
from bridge_ext_testing.forward import megatron_logits
from bridge_ext_testing.tiny_dense import tiny_dense

from .registry import QWEN35_REASON, QWEN35_TRANSFORMERS
from .support import source_tensors


def needs_qwen35_transformers() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(QWEN35_TRANSFORMERS):
        pytest.skip(QWEN35_REASON)


def test_dora_on_a_linear_that_adds_its_bias_inside_merges_its_bias_and_refuses_peft(megatron_cpu, tmp_path):
    """Qwen2's linear_qkv adds its bias inside DoRA's scaled product: Megatron scales the bias,
    PEFT's DoRA would not (refused, naming the module); the merged export scales it too."""
    hf_dir = tiny_dense(tmp_path, "qwen2")
    model = build_megatron_model(hf_dir, lora=LoraSettings(kind="dora", target_modules=("linear_qkv", "linear_fc2")))
    randomize_lora(model.chunks, seed=4)
    with torch.no_grad():  # transformers initialises the biases to zero
        for layer in model.chunks[0].decoder.layers:
            bias = layer.self_attention.linear_qkv.to_wrap.bias
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(5)) * 0.5)
    with pytest.raises(ExportError, match=r"DoRA on decoder\.layers\.0\.self_attention\.linear_qkv, .* PEFT's DoRA "
                                          r"leaves unscaled"):
        next(export_hf_weights(model.chunks, adapters_only=True, dora_adapters=True))
    merged = dict(export_hf_weights(model.chunks, peft=False))
    base = dict(export_hf_weights(model.chunks, base_only=True))
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.bias"], base["model.layers.0.self_attn.q_proj.bias"])
    hf_model = load_hf_model(hf_dir)
    hf_model.load_state_dict(merged, strict=True)
    input_ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(2))
    compare_logits(hf_logits(hf_model, input_ids), megatron_logits(model.chunks, input_ids), Report(),
                   what="merged DoRA with an inside bias", relative_tolerance=1e-5)


def test_qwen3_5_two_mtp_layers_share_one_fc_or_are_refused(megatron_cpu, tmp_path):
    """HF Qwen3.5 has one mtp.fc around N inner layers; Megatron one eh_proj per depth.

    Megatron-Bridge cannot load two MTP layers, so the model is filled through our own table
    (reverse direction). The export writes the shared tensors once and each inner layer at its
    index, bit-exact; if the depths' copies differ it refuses, naming them.
    """
    from transformers import AutoConfig

    needs_qwen35_transformers()
    hf_dir = tiny_models.tiny_qwen35_dense(tmp_path / "hf", mtp_layers=2)
    config = AutoConfig.from_pretrained(str(hf_dir))
    model = build_megatron_model(hf_dir, load_weights=False)
    source = LiveModelSource(model.chunks)
    table = table_for(config)
    tensors = hf_to_megatron(source_tensors(hf_dir), source.base_names(), table, table.dims(config))
    params = dict(model.chunks[0].named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name][: tensor.shape[0]].copy_(tensor)
    exported = dict(export_hf_weights(model.chunks))
    original = source_tensors(hf_dir)
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[n], original[n]) for n in original)
    assert {"mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.1.self_attn.q_proj.weight", "mtp.fc.weight"} <= set(exported)
    with torch.no_grad():
        params["mtp.layers.1.eh_proj.weight"].add_(1.0)
    with pytest.raises(ExportError, match=r"mtp\.layers\.0\.eh_proj\.weight and mtp\.layers\.1\.eh_proj\.weight differ"):
        dict(export_hf_weights(model.chunks))


def test_qwen3_5_moe_dora_on_routed_experts_is_refused_naming_them(megatron_cpu, tmp_path):
    needs_qwen35_transformers()
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


# Where the second MTP layer's tensors live (3 decoder layers in the DeepSeek-style models).
SECOND_MTP_LAYER = {
    "mimo": (tiny.tiny_mimo, "model.mtp_layers.1."),
    "deepseek_v3": (tiny.tiny_deepseek_v3, "model.layers.4."),
    "glm4_moe": (tiny.tiny_glm4_moe, "model.layers.4."),
    "glm4_moe_lite": (tiny.tiny_glm4_moe_lite, "model.layers.4."),
}


@pytest.mark.parametrize("family", sorted(SECOND_MTP_LAYER))
def test_two_mtp_layers_are_bit_exact(family, megatron_cpu, tmp_path):
    """Each MTP depth has its own tensors in every published naming: all map one to one."""
    make, second = SECOND_MTP_LAYER[family]
    hf_dir = make(tmp_path / "hf", mtp_layers=2)
    model = build_megatron_model(hf_dir)
    original = source_tensors(hf_dir)
    exported = dict(export_hf_weights(model.chunks))
    assert sorted(exported) == sorted(original)
    assert [n for n in original if not torch.equal(exported[n], original[n])] == []
    assert sum(n.startswith(second) for n in exported) > 10


def test_moonlight_plain_q_proj_keys_all_have_a_megatron_rule():
    """Moonlight (``deepseek_v3`` with ``q_lora_rank: null``) names ``self_attn.q_proj``.

    megatron-core 0.19.2's local spec cannot build that MLA on CPU (it wants Transformer
    Engine's fused norm+linear ``linear_q_proj``), so only the names are checked here: every
    tensor transformers saves has a rule, and ``q_proj`` comes from ``linear_q_proj``.
    """
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(**{**tiny._deepseek_kwargs(q_lora_rank=None), "num_nextn_predict_layers": 0})
    table = table_for(config)
    variants = frozenset(family.variant("per_expert") for family in table.expert_families)
    keys = hf_checkpoint_keys(config)
    assert "model.layers.0.self_attn.q_proj.weight" in keys and not any("q_a_proj" in k for k in keys)
    unmatched = [key for key in keys if table.match_hf(key, variants) is None]
    assert unmatched == []
    found, _ = table.match_hf("model.layers.2.self_attn.q_proj.weight", variants)
    assert found.rule.megatron == "decoder.layers.{layer}.self_attention.linear_q_proj.weight"


def test_glm5_dsa_names_against_transformers_and_megatron_bridge(tmp_path):
    """GLM-5 (``glm_moe_dsa``): names only, on CPU.

    megatron-core 0.19.2's DSA layer spec asks its backend for ``linear()`` (the indexer's plain
    linears), which only Transformer Engine's spec provider has, so the Megatron model cannot be
    built here: the export, PEFT, merged, Megatron-Bridge, TP2 and ``convert`` checks run in
    tests/gpu/test_glm5_dsa.py. Here: every tensor of the tiny GLM-5 folder (transformers' own
    key set, indexer included, plus the MTP layer) has exactly one rule; each rule's Megatron name
    is the one Megatron-Bridge's ``GLM5Bridge`` loads that Hugging Face tensor into (its mapping
    registry), and the indexer maps one to one (no operation: the shapes are transformers').
    """
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.23"):
        pytest.skip("GLM-5 needs transformers 5.23+ (docs/compatibility.md): 5.9's GlmMoeDsa gives every layer "
                    "its own indexer, so its key set is not the published checkpoint's and the export refuses "
                    "it; the compatibility job's newest step runs this test")
    from transformers import AutoConfig

    from megatron.bridge.models.glm_moe_dsa.glm5_bridge import GLM5Bridge

    hf_dir = tiny.tiny_glm_moe_dsa(tmp_path / "hf")
    config = AutoConfig.from_pretrained(str(hf_dir))
    table = table_for(config)
    names = sorted(source_tensors(hf_dir))
    mtp = [n for n in names if table.extra_weights.holds(n)]
    assert sorted(set(names) - set(mtp)) == sorted(hf_checkpoint_keys(config))
    assert [n for n in names if ".indexer." in n and n.startswith("model.layers.1.")] == []  # a "shared" layer
    assert sum(".indexer." in n for n in names) == 15  # layers 0, 2 and the MTP layer 3
    bridge = GLM5Bridge()
    bridge.hf_config = config
    registry = bridge.mapping_registry()
    variants = frozenset({table.expert_families[0].variant("per_expert"), table.expert_families[1].variant("per_expert")})
    # Megatron-Bridge's GLM5Bridge builds no MTP layer (mtp_num_layers = None): its MTP mappings are
    # not compared here (ours follow DeepSeek-V3's, which the contract proves on a built model).
    mtp_prefix = f"model.layers.{config.num_hidden_layers}."
    unmatched, different = [], []
    for name in names:
        found = table.match_hf(name, variants)
        if found is None:
            unmatched.append(name)
            continue
        match, _ = found
        megatron = match.rule.megatron_pattern.fill(match.values)
        if match.rule.shared is None and not name.startswith(mtp_prefix):
            theirs = registry.megatron_to_hf_lookup(megatron)
            hf_params = [] if theirs is None else (
                [theirs.hf_param] if isinstance(theirs.hf_param, str) else list(theirs.hf_param.values()))
            if name not in hf_params:
                different.append((name, megatron, hf_params))
        if ".indexer." in name:
            assert match.rule.ops == () and match.rule.tp == "replicated", name
    assert unmatched == [] and different == []
