"""export_hf_weights on real Megatron models (Llama, Qwen3; tied and untied), TP=PP=1."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from bridge_ext import export_hf_weights, save_hf_pretrained
from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
from bridge_ext_testing.forward import megatron_logits
from bridge_ext_testing.tiny_dense import tiny_dense
from bridge_ext.dims import ModelDims
from bridge_ext.engine import PEFT_PREFIX, ExportError
from bridge_ext.export import buckets, export_hf_buckets
from bridge_ext.live import LiveModelSource
from bridge_ext.reverse import hf_to_megatron
from bridge_ext.verify import Report, check_model_folder, compare_logits, hf_logits, load_adapter_strict, load_hf_model
from bridge_ext.tables import table_for

MEGATRON_SPELLINGS = ("base_layer", "to_wrap", "decoder.", "linear_qkv", "linear_fc", "linear_proj", ".adapter.", "layer_norm_weight")
MODELS = ["qwen3", "qwen3-tied", "llama"]


@pytest.fixture(scope="module", params=MODELS)
def built(request, megatron_cpu, tmp_path_factory):
    kind = request.param
    hf_dir = tiny_dense(tmp_path_factory.mktemp(kind), kind.split("-")[0], tied="tied" in kind)
    model = build_megatron_model(hf_dir, lora=LoraSettings())
    randomize_lora(model.chunks, seed=len(kind))
    return model


def base_part(pairs):
    return {name: tensor for name, tensor in pairs if not name.startswith(PEFT_PREFIX)}


def saved_adapter_logits(chunks, folder, what: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Inputs, Megatron's logits and the relative error of transformers + PEFT on ``folder``'s
    saved model and adapter (loaded strictly; asserted within 1e-5 of the largest logit)."""
    report = Report()
    peft_model = load_adapter_strict(load_hf_model(folder / "model"), folder / "adapter", report)
    input_ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    reference = megatron_logits(chunks, input_ids)
    relative = compare_logits(hf_logits(peft_model, input_ids), reference, report, what=what,
                              relative_tolerance=1e-5)
    return input_ids, reference, relative


def test_base_weights_are_bit_exact_and_clean(built):
    original = load_file(str(built.hf_dir / "model.safetensors"))
    exported = dict(export_hf_weights(built.chunks))
    base = base_part(exported.items())
    assert sorted(base) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(base[name], tensor), name
    for name in exported:
        bare = name.removeprefix(PEFT_PREFIX)
        assert not any(spelling in bare for spelling in MEGATRON_SPELLINGS), name
    adapters = [name for name in exported if name.startswith(PEFT_PREFIX)]
    assert len(adapters) == 2 * 7 * 2  # two layers, 7 HF projections, lora_A and lora_B


def test_saved_folders_load_strictly_and_give_megatron_logits(built, tmp_path):
    save_hf_pretrained(built.chunks, tmp_path / "model", tmp_path / "adapter")
    report = Report()
    check_model_folder(tmp_path / "model", report)
    peft_model = load_adapter_strict(load_hf_model(tmp_path / "model"), tmp_path / "adapter", report)
    input_ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    reference = megatron_logits(built.chunks, input_ids)
    relative = compare_logits(hf_logits(peft_model, input_ids), reference, report, what="HF + adapter",
                              relative_tolerance=1e-5)
    without_adapter = hf_logits(load_hf_model(tmp_path / "model"), input_ids)
    assert (without_adapter - reference).abs().max() / reference.abs().max() > 100 * max(relative, 1e-7)


def test_base_only_is_the_unmerged_base_without_adapters(built):
    original = load_file(str(built.hf_dir / "model.safetensors"))
    base = dict(export_hf_weights(built.chunks, base_only=True))
    assert sorted(base) == sorted(original)
    assert [name for name, tensor in original.items() if not torch.equal(base[name], tensor)] == []
    bucketed = [pair for bucket in export_hf_buckets(built.chunks, bucket_bytes=1 << 12, base_only=True)
                for pair in bucket.tensors]
    assert [name for name, _ in bucketed] == list(base)
    for wrong, message in ((dict(peft=False), "needs peft=True"), (dict(adapters_only=True), "exclude each other")):
        with pytest.raises(ExportError, match=message):
            next(export_hf_weights(built.chunks, base_only=True, **wrong))


def test_merged_export_equals_megatron_bridge(built):
    ours = dict(export_hf_weights(built.chunks, peft=False))
    theirs = dict(built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=False))
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []


def test_adapters_equal_megatron_bridge(built):
    ours = {name.removeprefix(PEFT_PREFIX): t for name, t in export_hf_weights(built.chunks, adapters_only=True)}
    theirs = dict(built.bridge.export_adapter_weights(built.chunks, cpu=True, show_progress=False))
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []


def test_merged_weights_are_base_plus_scaled_lora(built):
    merged = dict(export_hf_weights(built.chunks, peft=False))
    pairs = dict(export_hf_weights(built.chunks))
    q_name = "model.layers.1.self_attn.q_proj"
    a, b = pairs[f"{PEFT_PREFIX}{q_name}.lora_A.weight"], pairs[f"{PEFT_PREFIX}{q_name}.lora_B.weight"]
    expected = pairs[f"{q_name}.weight"] + (8 / 4) * (b @ a)
    assert torch.allclose(merged[f"{q_name}.weight"], expected, atol=1e-6)
    assert not torch.allclose(merged[f"{q_name}.weight"], pairs[f"{q_name}.weight"])


def test_buckets_are_complete_and_flag_only_the_last(built):
    whole = dict(export_hf_weights(built.chunks))
    adapter_bytes = sum(t.numel() * t.element_size() for n, t in whole.items() if n.startswith(PEFT_PREFIX))
    got = list(export_hf_buckets(built.chunks, bucket_bytes=adapter_bytes // 5))
    assert sum(bucket.is_last for bucket in got) == 1 and got[-1].is_last
    adapter_buckets = [b for b in got if any(n.startswith(PEFT_PREFIX) for n, _ in b.tensors)]
    assert len(adapter_buckets) >= 3  # the adapter set really is spread over several buckets
    received = {}
    for bucket in got:
        assert bucket.nbytes <= adapter_bytes // 5 or len(bucket.tensors) == 1
        for name, tensor in bucket.tensors:
            assert name not in received
            received[name] = tensor.clone()
    assert sorted(received) == sorted(whole)
    assert all(torch.equal(received[name], whole[name]) for name in whole)
    assert [b.is_last for b in buckets(iter([]), 10)] == [True]


def test_unmapped_parameter_is_an_error_naming_it(built):
    layer = built.chunks[0].decoder.layers[0]
    layer.register_parameter("mystery", torch.nn.Parameter(torch.zeros(3)))
    try:
        with pytest.raises(ExportError, match=r"decoder\.layers\.0\.mystery"):
            next(export_hf_weights(built.chunks))
    finally:
        del layer.mystery


def test_names_are_checked_against_the_hf_key_set(built):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(built.hf_dir))
    config.num_hidden_layers = 3
    if getattr(config, "layer_types", None):
        config.layer_types = [*config.layer_types, config.layer_types[-1]]
    with pytest.raises(ExportError, match=r"missing \['model\.layers\.2\."):
        next(export_hf_weights(built.chunks, hf_config=config))


def test_table_reverse_agrees_with_megatron_bridge_loader(built):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(built.hf_dir))
    source = LiveModelSource(built.chunks)
    names = source.base_names()
    rebuilt = hf_to_megatron(load_file(str(built.hf_dir / "model.safetensors")), names,
                             table_for(config.model_type), ModelDims.from_hf_config(config))
    assert sorted(rebuilt) == sorted(names)
    for name in names:
        (live,) = source.shards(name)
        assert torch.equal(rebuilt[name], live[: rebuilt[name].shape[0]]), name


# DoRA (Megatron-Bridge's megatron.bridge.peft.dora.DoRA) ------------------------------------------

MAGNITUDE = ".lora_magnitude_vector"


@pytest.fixture(scope="module")
def dora(megatron_cpu, tmp_path_factory):
    hf_dir = tiny_dense(tmp_path_factory.mktemp("dora"), "qwen3")
    model = build_megatron_model(hf_dir, lora=LoraSettings(kind="dora"))
    randomize_lora(model.chunks, seed=3)  # magnitudes too: random, unlike the base rows' norms
    return model


def test_dora_folder_loads_strictly_and_gives_megatron_logits(dora, tmp_path):
    import json

    save_hf_pretrained(dora.chunks, tmp_path / "model", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is False
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len([name for name in saved if name.endswith(MAGNITUDE)]) == 2 * 7  # one per HF module
    input_ids, reference, relative = saved_adapter_logits(dora.chunks, tmp_path, "HF + DoRA")
    # the same folder without the magnitudes (as Megatron-Bridge writes it): PEFT initialises them anew
    import shutil

    from peft import PeftModel
    from safetensors.torch import save_file

    shutil.copytree(tmp_path / "adapter", tmp_path / "no_magnitude")
    save_file({name: t for name, t in saved.items() if not name.endswith(MAGNITUDE)},
              str(tmp_path / "no_magnitude" / "adapter_model.safetensors"))
    without = PeftModel.from_pretrained(load_hf_model(tmp_path / "model"), str(tmp_path / "no_magnitude")).eval()
    assert (hf_logits(without, input_ids) - reference).abs().max() / reference.abs().max() > 100 * max(relative, 1e-7)


def test_dora_merged_gives_megatron_logits_and_megatron_bridge_merge_does_not(dora, tmp_path):
    input_ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    reference = megatron_logits(dora.chunks, input_ids)
    ours = dict(export_hf_weights(dora.chunks, peft=False))
    theirs = dict(dora.bridge.export_hf_weights(dora.chunks, cpu=True, show_progress=False))
    assert sorted(ours) == sorted(theirs)
    model = load_hf_model(dora.hf_dir)
    model.load_state_dict(ours, strict=True)
    compare_logits(hf_logits(model, input_ids), reference, Report(), what="merged DoRA", relative_tolerance=1e-5)
    model.load_state_dict(theirs, strict=True)  # Megatron-Bridge merges DoRA as plain LoRA
    assert (hf_logits(model, input_ids) - reference).abs().max() / reference.abs().max() > 1e-2


def test_dora_magnitudes_follow_the_weight_rows_and_megatron_bridge_drops_them(dora):
    adapters = dict(export_hf_weights(dora.chunks, adapters_only=True, dora_adapters=True))
    merged = dict(export_hf_weights(dora.chunks, peft=False))
    base = dict(export_hf_weights(dora.chunks, base_only=True))
    magnitudes = {name.removeprefix(PEFT_PREFIX).removesuffix(MAGNITUDE): t for name, t in adapters.items()
                  if name.endswith(MAGNITUDE)}
    assert len(magnitudes) == 2 * 7
    for module, magnitude in magnitudes.items():
        weight = merged[f"{module}.weight"]
        # the merged rows have the magnitudes as norms; the base rows do not
        assert torch.allclose(torch.linalg.norm(weight, dim=1), magnitude, rtol=1e-5), module
        assert not torch.allclose(torch.linalg.norm(base[f"{module}.weight"], dim=1), magnitude, rtol=1e-2), module
    theirs = dict(dora.bridge.export_adapter_weights(dora.chunks, cpu=True, show_progress=False))
    ours = {name.removeprefix(PEFT_PREFIX): t for name, t in adapters.items() if not name.endswith(MAGNITUDE)}
    assert sorted(ours) == sorted(theirs)  # Megatron-Bridge's export has no magnitude
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []


def test_dora_streams_are_refused_unless_asked_for(dora):
    original = load_file(str(dora.hf_dir / "model.safetensors"))
    for streamed in (dict(), dict(adapters_only=True)):
        with pytest.raises(ExportError, match=r"DoRA .* vLLM cannot load: sync merged weights \(peft=False\)"):
            next(export_hf_weights(dora.chunks, **streamed))
    base = dict(export_hf_weights(dora.chunks, base_only=True))
    assert sorted(base) == sorted(original) and all(torch.equal(base[n], t) for n, t in original.items())
    got = [pair for bucket in export_hf_buckets(dora.chunks, bucket_bytes=1 << 12, adapters_only=True,
                                                dora_adapters=True) for pair in bucket.tensors]
    assert len([name for name, _ in got if name.endswith(MAGNITUDE)]) == 2 * 7


def test_a_dora_adapter_folder_for_vllm_is_refused(dora, tmp_path):
    with pytest.raises(ExportError, match=r"DoRA .* which vLLM cannot load"):
        save_hf_pretrained(dora.chunks, adapter_dir=tmp_path / "adapter", adapter_for="vllm")
    assert not (tmp_path / "adapter").exists()
    # a live export for vLLM too, even with dora_adapters=True
    with pytest.raises(ExportError) as refused:
        next(export_hf_weights(dora.chunks, adapters_only=True, dora_adapters=True, adapter_for="vllm"))
    assert str(refused.value) == ("the adapters are DoRA (decoder.layers.0.self_attention.linear_proj, ...), which "
                                  "vLLM cannot load: give vLLM merged weights, or write the adapter folder for PEFT")


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


# CanonicalLoRA (Megatron-Bridge's megatron.bridge.peft.canonical_lora.CanonicalLoRA) ---------------

# Megatron-Bridge 0.6.2's forward needs every part of a module it adapts (a missing adapter_k fails)
CANONICAL = {"every module": (), "some modules": ("linear_q", "linear_k", "linear_v", "linear_fc2")}
CANONICAL_MODULES = {"every module": 7, "some modules": 4}


@pytest.mark.parametrize("targets", sorted(CANONICAL))
def test_canonical_lora_gives_one_pair_per_part_and_megatron_logits(megatron_cpu, tmp_path, targets):
    """Each part's adapter (adapter_q, adapter_k, adapter_v, adapter_gate, adapter_up) becomes its
    own Hugging Face module's pair with its own lora_A."""
    import json

    model = build_megatron_model(tiny_dense(tmp_path / "hf", "qwen3"),
                                 lora=LoraSettings(kind="canonical_lora", target_modules=CANONICAL[targets]))
    randomize_lora(model.chunks, seed=8, std=0.1)
    save_hf_pretrained(model.chunks, tmp_path / "model", tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == 2 * CANONICAL_MODULES[targets] * 2
    q, k = (saved[f"{PEFT_PREFIX}model.layers.0.self_attn.{m}_proj.lora_A.weight"] for m in "qk")
    assert not torch.equal(q, k)  # no shared A
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == CANONICAL_MODULES[targets]
    input_ids, reference, relative = saved_adapter_logits(model.chunks, tmp_path, "HF + CanonicalLoRA")
    merged = dict(export_hf_weights(model.chunks, peft=False))
    hf_model = load_hf_model(tmp_path / "model")
    hf_model.load_state_dict(merged, strict=True)
    compare_logits(hf_logits(hf_model, input_ids), reference, Report(), what="merged CanonicalLoRA",
                   relative_tolerance=1e-5)
    without = hf_logits(load_hf_model(tmp_path / "model"), input_ids)
    assert (without - reference).abs().max() / reference.abs().max() > 100 * max(relative, 1e-7)
    # the same tensors as Megatron-Bridge's exports
    ours = {name.removeprefix(PEFT_PREFIX): t for name, t in export_hf_weights(model.chunks, adapters_only=True)}
    theirs = dict(model.bridge.export_adapter_weights(model.chunks, cpu=True, show_progress=False))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    theirs_merged = dict(model.bridge.export_hf_weights(model.chunks, cpu=True, show_progress=False))
    assert sorted(merged) == sorted(theirs_merged) and all(torch.equal(merged[n], theirs_merged[n]) for n in merged)
