"""The conformance contract: every check over every entry of ``registry.ENTRIES`` it applies to.

Each entry's tiny Hugging Face model (saved by transformers, MTP tensors in the published
naming) is built once in Megatron on the CPU (fp32, gloo) through Megatron-Bridge, with its PEFT
type's adapters holding random non-zero values. The Hugging Face files, transformers' key set,
transformers + PEFT's forward and Megatron-Bridge's own exports judge the exports:

* the base is bit-exact with the source files and named as transformers saves it, free of
  Megatron spellings; ``base_only`` is that base; buckets carry the whole export once;
* the saved adapter loads strictly in PEFT and HF + PEFT gives the Megatron forward's logits
  (and without it does not); the merged folder gives them too, and a merged weight sync into a
  zeroed transformers model; merged weights are base + scale * B @ A;
* merged weights and adapters equal Megatron-Bridge's, tensor by tensor, every difference named;
* the table's reverse direction fills the Megatron model as Megatron-Bridge's loader does;
* names outside transformers' key set and unmapped Megatron tensors are refused;
* MoE: the live export writes expert adapters in the layout vLLM loads; every expert layout
  transformers loads holds the same model; PEFT's 3-D packing is a merge per expert;
* DoRA: magnitudes follow the weight rows; streams and vLLM folders are refused;
  CanonicalLoRA: one pair per part;
* parallel layouts: every export mode and destination bit-identical to the single process,
  ``convert`` of the checkpoints that layout saved equal to the live export.

The section at the end holds specific tests of single entries (architecture oddities).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from bridge_ext import export_hf_buckets, export_hf_weights, save_hf_pretrained
from bridge_ext.distributed import DESTINATIONS
from bridge_ext.engine import ExportError
from bridge_ext.expert_layouts import source_expert_layouts
from bridge_ext.export import buckets
from bridge_ext.hf_keys import hf_checkpoint_keys
from bridge_ext.live import LiveModelSource
from bridge_ext.ops import SplitGroupedRows
from bridge_ext.peft_keys import PEFT_PREFIX
from bridge_ext.reverse import hf_to_megatron
from bridge_ext.tables import table_for
from bridge_ext.verify import Report, check_model_folder, compare_logits, hf_logits, load_adapter_strict

from . import support
from .memo import export, load_hf, once, reference, saved_folders
from .registry import BY_NAME, ENTRIES, VISION_QKV, global_lora

# Megatron spellings no Hugging Face name contains (an entry's hf_spellings lists the words its
# architecture's own names use: DeepSeek's shared_experts, gpt-oss's router, Qwen3-VL's linear_fc1).
MEGATRON_SPELLINGS = ("to_wrap", "decoder.", "linear_qkv", "linear_proj", "linear_fc", ".adapter.",
                      "layer_norm_weight", "local_experts", "router", "vision_model", "word_embeddings", "output_layer",
                      "shared_experts", "base_layer")
PEFT_EXPERT_KEY = re.compile(r"\.mlp\.experts\.(base_layer\.)?lora_[AB]\.weight$")
PER_EXPERT_ADAPTER = re.compile(r"\.experts\.\d+\.")
MAGNITUDE = ".lora_magnitude_vector"


def applies(predicate):
    """The entries a check runs on (conftest.pytest_generate_tests reads it)."""
    def mark(check):
        check.applies = predicate
        return check
    return mark


def only(*names: str):
    assert set(names) <= set(BY_NAME), names
    return applies(lambda entry: entry.name in names)


def config_of(built):
    return AutoConfig.from_pretrained(str(built.hf_dir))


def keys_of(built, layout: str = "per_expert") -> dict[str, tuple[int, ...]]:
    """transformers' save-time key set of the entry in an expert layout (computed once)."""
    return once(built, f"keys_{layout}", lambda: hf_checkpoint_keys(config_of(built), expert_layout=layout))


def adapters(built, **options) -> dict[str, torch.Tensor]:
    """The adapters alone (DoRA: with magnitudes, which the engine gives only when asked)."""
    dora = dict(dora_adapters=True) if built.entry.peft == "dora" else {}
    return export(built, adapters_only=True, **dora, **options)


def is_adapter(name: str) -> bool:
    return name.startswith(PEFT_PREFIX)


def extra_weight(built, name: str) -> bool:
    """A name under the table's extra weights (MTP: outside transformers' key set)."""
    extra = once(built, "extra_weights", lambda: table_for(config_of(built)).extra_weights)
    return extra is not None and extra.holds(name)


# The base and its names -----------------------------------------------------------------------------

def test_base_is_bit_exact_with_the_source_files(built):
    original = support.source_tensors(built.hf_dir)
    assert any(extra_weight(built, name) for name in original) == built.entry.mtp
    streams = [export(built, base_only=True)]
    if built.entry.peft != "dora":  # (DoRA streams are refused unless asked: test_dora_streams_...)
        streams.append({n: t for n, t in export(built).items() if not is_adapter(n)})
    for base in streams:
        assert sorted(base) == sorted(original)  # the source's own expert layout is followed
        assert [name for name in original if not torch.equal(base[name], original[name])] == []


def test_names_are_the_transformers_key_set_and_free_of_megatron_spellings(built):
    entry, table = built.entry, table_for(config_of(built))
    base = {n: tuple(t.shape) for n, t in export(built, base_only=True).items() if not extra_weight(built, n)}
    assert base == keys_of(built, entry.experts_on_disk if entry.moe else "per_expert")  # names and shapes
    # PEFT's fused expert adapters, and the live default (vLLM's layout; DoRA: refused, see below)
    fused = dict(expert_adapter_layout="fused") if entry.moe else {}
    names = [*export(built, base_only=True), *adapters(built, **fused), *(export(built) if entry.peft != "dora" else ())]
    in_memory = {table.in_memory_name(key).rsplit(".", 1)[0] for layout in ("fused", "per_expert")
                 for key in keys_of(built, layout)}
    spellings = [s for s in MEGATRON_SPELLINGS if s not in entry.hf_spellings]
    for name in names:
        bare = name.removeprefix(PEFT_PREFIX)
        assert [s for s in spellings if s != "base_layer" and s in bare] == [], name
        assert "base_layer" not in bare or PEFT_EXPERT_KEY.search(name), name
        if is_adapter(name):
            module = re.sub(r"\.(base_layer\.)?(lora_[AB]\.weight|lora_magnitude_vector)$", "", bare)
            assert module in in_memory or extra_weight(built, module + ".") or module.endswith(".experts"), name
    if entry.vl:  # LoRA on the vision tower too, where Megatron-Bridge puts it
        assert any(".visual." in n and "lora_B" in n for n in names) == entry.vision_lora


def test_base_only_is_the_unmerged_base_without_adapters(built):
    base = export(built, base_only=True)
    assert not any(is_adapter(name) for name in base)
    bucketed = [pair for bucket in export_hf_buckets(built.chunks, bucket_bytes=1 << 12, base_only=True)
                for pair in bucket.tensors]
    assert [name for name, _ in bucketed] == list(base)
    assert all(torch.equal(tensor, base[name]) for name, tensor in bucketed)
    for wrong, message in ((dict(peft=False), "needs peft=True"), (dict(adapters_only=True), "exclude each other")):
        with pytest.raises(ExportError, match=message):
            next(export_hf_weights(built.chunks, base_only=True, **wrong))


@applies(lambda entry: entry.peft != "dora")
def test_buckets_are_complete_and_flag_only_the_last(built):
    """Every tensor once, in order, the last bucket flagged; a bucket is larger than asked only
    for one tensor, or to keep one layer's per-expert adapters together (receivers load them at once)."""
    whole = export(built)
    adapter_bytes = sum(t.numel() * t.element_size() for n, t in whole.items() if is_adapter(n))
    limit = adapter_bytes // 5
    got = list(export_hf_buckets(built.chunks, bucket_bytes=limit))
    assert sum(bucket.is_last for bucket in got) == 1 and got[-1].is_last
    grouped = built.entry.lora_on_experts and built.entry.vllm_adapters == "per_expert"
    if not grouped:
        assert len([b for b in got if any(is_adapter(n) for n, _ in b.tensors)]) >= 3  # adapters spread out
    received, bucket_of_group = {}, {}
    for index, bucket in enumerate(got):
        assert grouped or bucket.nbytes <= limit or len(bucket.tensors) == 1
        for name, tensor in bucket.tensors:
            assert name not in received
            received[name] = tensor.clone()
            if PER_EXPERT_ADAPTER.search(name) and is_adapter(name):
                group = re.sub(r"\.experts\.\d+\..*", "", name)
                assert bucket_of_group.setdefault(group, index) == index, f"{group} split over buckets"
    assert list(received) == list(whole)
    support.assert_same(received, whole, "buckets")
    assert [b.is_last for b in buckets(iter([]), 10)] == [True]


# Consumers: transformers and PEFT -------------------------------------------------------------------

def test_saved_folders_load_strictly_and_give_megatron_logits(built):
    entry = built.entry
    folder = saved_folders(built)
    report = Report()
    check_model_folder(folder / "model", report)
    check_model_folder(folder / "merged", report)
    input_ids, extra, logits = reference(built)
    base_model = load_hf(built, folder / "model")
    without = hf_logits(base_model, input_ids, **extra)  # (before PEFT wraps the model's modules)
    peft_model = load_adapter_strict(base_model, folder / "adapter", report)
    assert peft_model.peft_config["default"].use_dora == (entry.peft == "dora")
    relative = compare_logits(hf_logits(peft_model, input_ids, **extra), logits, report,
                              what=f"{entry.name} HF + PEFT", relative_tolerance=entry.tolerance)
    compare_logits(hf_logits(load_hf(built, folder / "merged"), input_ids, **extra), logits, report,
                   what=f"{entry.name} merged", relative_tolerance=entry.tolerance)
    # the base alone is far from the reference: the adapter really changes the model
    assert support.relative_error(without, logits) > 100 * max(relative, 1e-7)
    saved = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    if entry.adapter_tensors is not None:
        assert len(saved) == entry.adapter_tensors
    if entry.adapter_config is not None:
        entry.adapter_config(json.loads((folder / "adapter" / "adapter_config.json").read_text()))
    # PEFT wrapped the experts (3-D): its own merge is checked by test_peft_3d_expert_packing_...
    assert any(PEFT_EXPERT_KEY.search(name) for name in saved) == entry.lora_on_experts
    if entry.vl:
        assert any(".visual.blocks." in name for name in saved) == entry.vision_lora


@applies(lambda entry: entry.peft != "dora")
def test_merged_weights_are_base_plus_scaled_lora(built):
    """Every adapted module outside the routed experts: merged = base + scale * B @ A."""
    merged, pairs = export(built, peft=False), export(built)
    table = table_for(config_of(built))
    weight_of = {table.in_memory_name(name): name for name in merged}
    checked = 0
    for key in (k for k in pairs if k.endswith(".lora_A.weight")):
        module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        weight = weight_of.get(f"{module}.weight")
        if ".experts." in module or weight is None:
            continue
        expected = pairs[weight] + built.entry.scale * pairs[key.replace("lora_A", "lora_B")] @ pairs[key]
        torch.testing.assert_close(merged[weight], expected, rtol=0, atol=1e-6, msg=weight)
        assert not torch.allclose(merged[weight], pairs[weight]), weight
        checked += 1
    assert checked > 0


def test_a_merged_weight_sync_into_a_zeroed_transformers_model_gives_megatron_logits(built):
    """Buckets through ``BucketReceiver`` and ``load_into_module``, as an engine's weight sync:
    every parameter and persistent buffer (DeepSeek-V3's and GLM-4.5's router bias is a buffer)
    is written; MTP tensors, which transformers has no layer for, go to the engine's draft model."""
    from bridge_ext.sync import BucketReceiver, load_into_module

    model = load_hf(built, built.hf_dir)
    held = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for tensor in held.values():
            tensor.zero_()
    table = table_for(config_of(built))
    load, applied, draft = load_into_module(model), [], []

    def load_weights(pairs):
        named = [(table.in_memory_name(name), tensor) for name, tensor in pairs]
        draft.extend(name for name, _ in named if name not in held)
        load([(name, tensor) for name, tensor in named if name in held])
        applied.extend(name for name, _ in named if name in held)

    receiver = BucketReceiver(load_weights)
    layout = dict(expert_layout="fused") if built.entry.moe else {}  # transformers' in-memory experts
    for bucket in export_hf_buckets(built.chunks, 1 << 16, peft=False, **layout):
        receiver(bucket)
    assert all(extra_weight(built, name) for name in draft), draft
    tied = {"lm_head.weight"} if model.config.get_text_config().tie_word_embeddings else set()
    assert set(held) - set(applied) <= tied
    input_ids, extra, logits = reference(built)
    compare_logits(hf_logits(model, input_ids, **extra), logits, Report(), what="weight sync",
                   relative_tolerance=built.entry.tolerance)


# Megatron-Bridge ----------------------------------------------------------------------------------

def megatron_bridge_merged(built) -> dict[str, torch.Tensor]:
    return once(built, "mb_merged", lambda: dict(built.bridge.export_hf_weights(built.chunks, cpu=True,
                                                                              show_progress=False)))


def megatron_bridge_adapters(built) -> dict[str, torch.Tensor]:
    """Megatron-Bridge's adapters, keyed as PEFT (and ours) key them: by the in-memory names."""
    table = table_for(config_of(built))
    return once(built, "mb_adapters", lambda: {table.in_memory_name(n): t for n, t in built.bridge.export_adapter_weights(
        built.chunks, cpu=True, show_progress=False)})


def test_merged_export_equals_megatron_bridge(built):
    """Name for name; tensor for tensor but where the entry says why not (the vision attn.qkv:
    test_adapters_equal_megatron_bridge; DeepSeek-V3 / GLM-4.5's MTP copies: only ours)."""
    entry = built.entry
    ours, theirs = export(built, peft=False), megatron_bridge_merged(built)
    only_ours = sorted(n for n in ours if entry.megatron_bridge_only_ours and entry.megatron_bridge_only_ours.search(n))
    assert (sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))) == (only_ours, [])
    different = sorted(n for n in theirs if not torch.allclose(ours[n], theirs[n], rtol=0, atol=entry.megatron_bridge_atol))
    assert different == sorted(n for n in theirs if VISION_QKV.search(n))


def test_adapters_equal_megatron_bridge(built):
    """Per-expert layout (Megatron-Bridge's), DoRA magnitudes aside (it exports none). Where its
    vision attn.qkv lora_B differs, it is ours in Megatron's per-head row order, and its merged
    delta is that (wrongly ordered) B times our A."""
    entry = built.entry
    ours = {n: t for n, t in support.without_prefix(adapters(built, expert_adapter_layout="per_expert").items()).items()
            if not n.endswith(MAGNITUDE)}
    theirs = megatron_bridge_adapters(built)
    assert sorted(ours) == sorted(theirs)
    different = sorted(n for n in ours if not torch.equal(ours[n], theirs[n]))
    assert different == sorted(n for n in ours if VISION_QKV.search(n))
    if not different:
        return
    config = config_of(built)
    head_dim = table_for(config).dims(config)["vision_head_dim"]
    base, theirs_merged = export(built, base_only=True), megatron_bridge_merged(built)
    for name in different:
        assert torch.equal(theirs[name], SplitGroupedRows(head_dim, head_dim, head_dim).reverse(
            list(ours[name].chunk(3)), None)[0])
        weight = name.replace("lora_B.weight", "weight")  # (alike in checkpoint and memory here)
        torch.testing.assert_close(theirs_merged[weight] - base[weight],
                                   entry.scale * theirs[name] @ ours[name.replace("lora_B", "lora_A")],
                                   rtol=0, atol=1e-6)


def test_table_reverse_agrees_with_megatron_bridge_loader(built):
    """The table's Hugging Face -> Megatron direction gives every base tensor Megatron-Bridge loaded."""
    config = config_of(built)
    table = table_for(config)
    source = LiveModelSource(built.chunks)
    names = source.base_names()
    variants = frozenset(family.variant(built.entry.experts_on_disk) for family in table.expert_families)
    rebuilt = hf_to_megatron(support.source_tensors(built.hf_dir), names, table, table.dims(config),
                             variants)
    assert sorted(rebuilt) == sorted(names)
    for name in names:
        (live,) = source.shards(name)
        assert torch.equal(rebuilt[name], live[: rebuilt[name].shape[0]]), name


# Refusals before the first tensor -----------------------------------------------------------------

def first_decoder_layer(built) -> tuple[str, torch.nn.Module]:
    name = next(n for n, _ in built.chunks[0].named_modules() if n.endswith("decoder.layers.0"))
    return name, built.chunks[0].get_submodule(name)


@applies(lambda entry: entry.peft != "dora")
def test_unmapped_parameter_is_an_error_naming_it(built):
    name, layer = first_decoder_layer(built)
    layer.register_parameter("mystery", torch.nn.Parameter(torch.zeros(3)))
    try:
        with pytest.raises(ExportError, match=re.escape(f"{name}.mystery")):
            next(export_hf_weights(built.chunks))
    finally:
        del layer.mystery


@applies(lambda entry: not entry.vl and not entry.mtp and entry.peft != "dora")
def test_names_are_checked_against_the_hf_key_set(built):
    config = config_of(built)
    config.num_hidden_layers = 3
    if getattr(config, "layer_types", None):
        config.layer_types = [*config.layer_types, config.layer_types[-1]]
    with pytest.raises(ExportError, match=r"missing \['model\.layers\.2\."):
        next(export_hf_weights(built.chunks, hf_config=config))


# Experts ------------------------------------------------------------------------------------------

@applies(lambda entry: entry.lora_on_experts)
def test_live_export_writes_expert_adapters_in_the_layout_vllm_loads(built):
    per_expert = any(PER_EXPERT_ADAPTER.search(n) for n in export(built) if is_adapter(n))
    assert per_expert == (built.entry.vllm_adapters == "per_expert")
    fused = any(PEFT_EXPERT_KEY.search(n) for n in export(built))
    assert fused == (built.entry.vllm_adapters == "fused")


@applies(lambda entry: entry.moe)
def test_expert_layouts_hold_the_same_experts(built):
    """Named as transformers saves each layout; a per-expert source's experts, fused, are
    ``[gate; up]`` per expert; with LoRA on them the merged experts differ from the base."""
    entry = built.entry
    original = support.source_tensors(built.hf_dir)
    for layout in entry.expert_layouts:
        base = export(built, base_only=True, expert_layout=layout)
        assert sorted(n for n in base if not extra_weight(built, n)) == sorted(keys_of(built, layout))
    fused = export(built, base_only=True, expert_layout="fused")
    gate_ups = [n for n in fused if n.endswith(".experts.gate_up_proj")]
    assert gate_ups and any(extra_weight(built, n) for n in gate_ups) == entry.mtp  # MTP layers' experts too
    if entry.experts_on_disk == "per_expert":
        for name in gate_ups:
            prefix = name.removesuffix("gate_up_proj")
            for expert in range(fused[name].shape[0]):
                assert torch.equal(fused[name][expert], torch.cat([original[f"{prefix}{expert}.gate_proj.weight"],
                                                                   original[f"{prefix}{expert}.up_proj.weight"]])), name
    if entry.lora_on_experts:
        merged = export(built, peft=False, expert_layout="fused")
        assert [(n, e) for n in gate_ups for e in range(fused[n].shape[0]) if torch.equal(merged[n][e], fused[n][e])] == []


@applies(lambda entry: entry.moe)
def test_merged_export_in_every_expert_layout_gives_megatron_logits(built):
    """Written in each layout transformers loads, found in that layout, loaded by transformers."""
    entry = built.entry
    table = table_for(config_of(built))
    input_ids, extra, logits = reference(built)
    report = Report()
    for layout in entry.expert_layouts:
        folder = built.folder / f"merged_{layout}"
        if layout == entry.experts_on_disk:  # the merged folder keeps the source's layout
            folder = saved_folders(built) / "merged"
        else:
            save_hf_pretrained(built.chunks, folder, merge=True, expert_layout=layout)
        assert source_expert_layouts(folder, table)[table.expert_families[0].name] == layout
        check_model_folder(folder, report, expert_layout=layout)
        compare_logits(hf_logits(load_hf(built, folder), input_ids, **extra), logits, report,
                       what=f"{entry.name} merged, experts {layout}", relative_tolerance=entry.tolerance)


EXPERT_MODULE = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


@applies(lambda entry: entry.lora_on_experts and entry.gated_experts)
def test_peft_3d_expert_packing_equals_a_merge_per_expert(built):
    """PEFT merges our packed ``lora_A [r*E, in]`` / ``lora_B [out, r*E]`` itself; each expert
    must come out as ``W_e + scale * B_e @ A_e`` of the per-expert (vLLM) layout's factors."""
    folder = saved_folders(built)
    peft_model = load_adapter_strict(load_hf(built, folder / "model"), folder / "adapter", Report())
    merged = dict(peft_model.merge_and_unload().named_parameters())
    source = dict(load_hf(built, built.hf_dir).named_parameters())  # transformers' own in-memory experts
    per_expert = adapters(built, expert_adapter_layout="per_expert")
    checked = 0
    for name, lora_a in per_expert.items():
        found = EXPERT_MODULE.match(name.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight"))
        if found is None or not name.endswith("lora_A.weight") or found["experts"] + ".down_proj" not in source:
            continue  # (MTP experts: transformers builds no MTP layer)
        expert, proj, experts = int(found["e"]), found["proj"], found["experts"]
        lora_b = per_expert[name.replace("lora_A", "lora_B")]
        fused = "down_proj" if proj == "down_proj" else "gate_up_proj"
        rows = source[f"{experts}.{fused}"][expert].shape[0] // 2
        part = slice(None) if proj == "down_proj" else slice(0, rows) if proj == "gate_proj" else slice(rows, None)
        expected = source[f"{experts}.{fused}"][expert][part] + built.entry.scale * lora_b @ lora_a
        torch.testing.assert_close(merged[f"{experts}.{fused}"][expert][part], expected, rtol=0, atol=2e-6)
        checked += 1
    fused_modules = [n for n in source if n.endswith(".experts.down_proj")]
    assert checked == 3 * sum(source[n].shape[0] for n in fused_modules) > 0  # 3 projections, every expert


@applies(lambda entry: entry.lora_on_experts and entry.gated_experts)
def test_per_expert_adapters_merged_by_hand_give_megatron_logits(built):
    """The per-expert (vLLM) adapter layout, merged by hand into transformers' model, is the model."""
    pairs = adapters(built, expert_adapter_layout="per_expert")
    assert any(re.search(r"\.experts\.3\.up_proj\.lora_B\.weight$", k) for k in pairs)
    assert not any(PEFT_EXPERT_KEY.search(k) for k in pairs)
    model = load_hf(built, built.hf_dir)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in [k for k in pairs if k.endswith("lora_A.weight")]:
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            if extra_weight(built, module + "."):
                continue
            delta = built.entry.scale * pairs[key.replace("lora_A", "lora_B")] @ pairs[key]
            expert = EXPERT_MODULE.match(module)
            if expert is None:
                params[f"{module}.weight"].add_(delta)
            elif expert["proj"] == "down_proj":
                params[f"{expert['experts']}.down_proj"][int(expert["e"])].add_(delta)
            else:
                gate_up = params[f"{expert['experts']}.gate_up_proj"][int(expert["e"])]
                half = gate_up.shape[0] // 2
                gate_up[slice(0, half) if expert["proj"] == "gate_proj" else slice(half, None)].add_(delta)
    input_ids, extra, logits = reference(built)
    compare_logits(hf_logits(model, input_ids, **extra), logits, Report(), what="per-expert adapters merged",
                   relative_tolerance=built.entry.tolerance)


# DoRA and CanonicalLoRA ----------------------------------------------------------------------------

@applies(lambda entry: entry.peft == "dora")
def test_dora_magnitudes_are_the_merged_rows_norms(built):
    """One magnitude per adapted Hugging Face module (fused modules split and de-interleaved like
    their rows): the merged rows have them as norms, the base rows do not; Megatron-Bridge's
    adapters are ours without them."""
    pairs, merged, base = adapters(built), export(built, peft=False), export(built, base_only=True)
    magnitudes = {n.removeprefix(PEFT_PREFIX).removesuffix(MAGNITUDE): t for n, t in pairs.items() if n.endswith(MAGNITUDE)}
    modules = {n.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight") for n in pairs if n.endswith(".lora_A.weight")}
    assert sorted(magnitudes) == sorted(modules) and magnitudes
    for module, magnitude in magnitudes.items():
        assert torch.allclose(torch.linalg.norm(merged[f"{module}.weight"], dim=1), magnitude, rtol=1e-5), module
        assert not torch.allclose(torch.linalg.norm(base[f"{module}.weight"], dim=1), magnitude, rtol=1e-2), module


@applies(lambda entry: entry.peft == "dora")
def test_dora_without_its_magnitudes_gives_other_logits(built):
    """The saved folder without the magnitudes (as Megatron-Bridge writes it): PEFT initialises
    them anew and the model is another one."""
    from peft import PeftModel

    folder = saved_folders(built)
    saved = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    shutil.copytree(folder / "adapter", folder / "no_magnitude")
    save_file({n: t for n, t in saved.items() if not n.endswith(MAGNITUDE)},
              str(folder / "no_magnitude" / "adapter_model.safetensors"))
    without = PeftModel.from_pretrained(load_hf(built, folder / "model"), str(folder / "no_magnitude")).eval()
    input_ids, extra, logits = reference(built)
    assert support.relative_error(hf_logits(without, input_ids, **extra), logits) > 100 * built.entry.tolerance


@applies(lambda entry: entry.peft == "dora")
def test_dora_merged_by_megatron_bridge_is_plain_lora(built):
    theirs = megatron_bridge_merged(built)
    assert sorted(theirs) == sorted(export(built, peft=False))
    folder = built.folder / "megatron_bridge_merged"  # (in its expert layout: transformers converts on load)
    folder.mkdir()
    shutil.copy(built.hf_dir / "config.json", folder / "config.json")
    save_file({n: t.contiguous() for n, t in theirs.items()}, str(folder / "model.safetensors"))
    model = load_hf(built, folder)
    input_ids, extra, logits = reference(built)
    assert support.relative_error(hf_logits(model, input_ids, **extra), logits) > 1e-2


@applies(lambda entry: entry.peft == "dora")
def test_dora_streams_are_refused_unless_asked_for(built):
    for streamed in (dict(), dict(adapters_only=True)):
        with pytest.raises(ExportError, match=r"DoRA .* vLLM cannot load: sync merged weights \(peft=False\)"):
            next(export_hf_weights(built.chunks, **streamed))
    got = [pair for bucket in export_hf_buckets(built.chunks, bucket_bytes=1 << 12, adapters_only=True,
                                                dora_adapters=True) for pair in bucket.tensors]
    support.assert_same(dict(got), adapters(built), "DoRA adapters in buckets")


@applies(lambda entry: entry.peft == "dora")
def test_a_dora_adapter_folder_for_vllm_is_refused(built, tmp_path):
    with pytest.raises(ExportError, match=r"DoRA .* which vLLM cannot load"):
        save_hf_pretrained(built.chunks, adapter_dir=tmp_path / "adapter", adapter_for="vllm")
    assert not (tmp_path / "adapter").exists()
    # a live export for vLLM too, even with dora_adapters=True; the message names the first module
    first = next(n.split(".adapter.")[0] for n, _ in built.chunks[0].named_parameters() if ".adapter." in n)
    with pytest.raises(ExportError) as refused:
        next(export_hf_weights(built.chunks, adapters_only=True, dora_adapters=True, adapter_for="vllm"))
    assert str(refused.value) == (f"the adapters are DoRA ({first}, ...), which vLLM cannot load: give vLLM merged "
                                  "weights, or write the adapter folder for PEFT")


@applies(lambda entry: entry.peft == "canonical_lora")
def test_canonical_lora_gives_each_part_its_own_pair(built):
    """Each part's adapter (adapter_q, adapter_k, adapter_v, adapter_gate, adapter_up) becomes its
    own Hugging Face module's pair with its own lora_A."""
    pairs = support.without_prefix(adapters(built, expert_layout="per_expert", expert_adapter_layout="per_expert").items())
    q, k = (pairs[f"model.layers.0.self_attn.{m}_proj.lora_A.weight"] for m in "qk")
    assert not torch.equal(q, k)
    if built.entry.moe:  # a sequential expert's linear_fc1: gate and up pairs
        gate, up = (pairs[f"model.layers.1.mlp.experts.3.{m}_proj.lora_A.weight"] for m in ("gate", "up"))
        assert not torch.equal(gate, up)


# Parallel layouts -----------------------------------------------------------------------------------

# One 2-process gloo run per layout over the entries of that layout, every export mode and
# destination. MoE types: attention and vision towers at TP=2, experts at EP=2 (expert-TP 1), the
# layout MoE models train with. Dense VL types: TP=2 (Qwen3-VL's vision tower sharded by Megatron,
# Qwen2.5-VL's Hugging Face vision module replicated on both ranks). Each run also saves torch_dist
# checkpoints for ``convert``; the MoE run also Megatron-Bridge's exports and the Megatron forward of
# the entries compared with Megatron-Bridge at EP=2.
EP2_COMPARED = tuple(entry.name for entry in ENTRIES if entry.megatron_bridge_at_ep2)
PARALLEL_LAYOUTS = {
    "tp2_ep2": ["--tp", "2", "--ep", "2", "--etp", "1", "--checkpoints", "--megatron-bridge", *EP2_COMPARED,
                "--forward", *EP2_COMPARED],
    "tp2": ["--tp", "2", "--checkpoints"],
}
assert {entry.layout for entry in ENTRIES} <= {None, *PARALLEL_LAYOUTS}
# (the worker gives every LoRA factor its global value: the single process must hold the same)
assert all(entry.values is global_lora for entry in ENTRIES if entry.layout)


@dataclass(frozen=True)
class ParallelRun:
    out: Path
    hf_dirs: dict[str, Path]

    def ranks(self, name: str) -> list[dict]:
        return [torch.load(self.out / f"{name}_{rank}.pt") for rank in range(2)]

    def checkpoint(self, name: str, variant: str) -> Path:
        return self.out / f"{name}_ckpt" / variant


def run_worker(layout: str, tmp_path_factory) -> ParallelRun:
    worker = support.worker()
    out = tmp_path_factory.mktemp(layout)
    hf_root = tmp_path_factory.mktemp(f"{layout}_hf")
    hf_dirs = {entry.name: entry.make(hf_root / entry.name) for entry in ENTRIES if entry.layout == layout}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(worker.__file__), str(out), *map(str, hf_dirs.values()), *PARALLEL_LAYOUTS[layout]]
    finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-6000:]
    return ParallelRun(out, hf_dirs)


@pytest.fixture(scope="module")
def parallel_runs() -> dict[str, ParallelRun]:
    return {}  # layout -> its run, made when a check first needs one of its entries


@pytest.fixture
def parallel_run(built, parallel_runs, tmp_path_factory) -> ParallelRun:
    """The worker's run of ``built``'s layout, over every entry of that layout."""
    layout = built.entry.layout
    if layout not in parallel_runs:
        parallel_runs[layout] = run_worker(layout, tmp_path_factory)
    return parallel_runs[layout]


@applies(lambda entry: entry.layout is not None)
def test_parallel_exports_are_bit_identical_to_the_single_process(built, parallel_run):
    entry, worker = built.entry, support.worker()
    ranks = parallel_run.ranks(entry.name)
    modes = [mode for mode in worker.MODES if entry.moe or mode != "per_expert"]  # per-expert: MoE only
    single_shapes = {name: tuple(p.shape) for name, p in built.chunks[0].named_parameters()}
    sharded = {name for name, shape in ranks[1]["shapes"].items() if shape != single_shapes[name]}
    assert any("language_model." in name or name.startswith("decoder.") for name in sharded)
    if entry.vl:  # Megatron linears in the vision tower (those LoRA reaches) are sharded at TP=2
        vision = [name for name in single_shapes if name.startswith(("vision_model.", "visual."))]
        assert vision and any(name in sharded for name in vision) == entry.vision_lora
    for rank in ranks:
        assert sorted(rank["results"]) == sorted(f"{mode}/{where}" for mode in modes for where in DESTINATIONS)
    for mode in modes:
        expected = export(built, **worker.MODES[mode])
        if entry.vl:  # the vision tower is part of the export (its adapters where it has LoRA)
            has_vision = any(re.search(r"(^|\.)visual\.", name) for name in expected)
            assert has_vision == (mode != "adapters" or entry.vision_lora), mode
        for rank, result in enumerate(ranks):
            support.assert_same(result["results"][f"{mode}/all"], expected, f"{mode}/all rank {rank}")
        support.assert_same(ranks[0]["results"][f"{mode}/rank0"], expected, f"{mode}/rank0")
        assert ranks[1]["results"][f"{mode}/rank0"] == {} and ranks[1]["received_bytes"][f"{mode}/rank0"] == 0
        owned = [rank["results"][f"{mode}/owner"] for rank in ranks]
        assert not set(owned[0]) & set(owned[1]), f"{mode}/owner: a tensor came out on both ranks"
        support.assert_same({**owned[0], **owned[1]}, expected, f"{mode}/owner")
    saved = ranks[0]["save"]["tensors"]  # save_hf_pretrained in the parallel job: rank 0 writes
    support.assert_same(saved, export(built, expert_adapter_layout="fused"), "saved folders")


@applies(lambda entry: entry.layout is not None)
@pytest.mark.parametrize("variant", ["lora", "adapter"])
def test_convert_of_the_parallel_checkpoint_equals_the_live_export(built, parallel_run, variant, tmp_path):
    """``bridge-ext convert`` of the full and the adapter-only checkpoint the parallel run saved."""
    from bridge_ext.convert import convert_checkpoint

    entry = built.entry
    result = convert_checkpoint(parallel_run.checkpoint(entry.name, variant), model_dir=tmp_path / "model",
                                adapter_dir=tmp_path / "adapter", hf_base=parallel_run.hf_dirs[entry.name])
    written = support.source_tensors(result.model_dir)
    written.update(load_file(str(result.adapter_dir / "adapter_model.safetensors")))
    support.assert_same(written, export(built, expert_adapter_layout="fused"), f"converted {variant} checkpoint")
    report = Report()
    peft_model = load_adapter_strict(load_hf(built, result.model_dir), result.adapter_dir, report)
    input_ids, extra, logits = reference(built)
    compare_logits(hf_logits(peft_model, input_ids, **extra), logits, report, what=f"converted {variant}",
                   relative_tolerance=entry.tolerance)


@applies(lambda entry: entry.megatron_bridge_at_ep2)
def test_megatron_bridge_merged_export_at_expert_parallelism_2(built, parallel_run, tmp_path):
    """Megatron-Bridge's merged export at TP=2 x EP=2 puts EP rank 0's expert LoRA of the same local
    index on the other rank's experts (tests/distributed/megatron_bridge_expert_parallel.py says
    why); transformers with ours gives the Megatron forward's logits at that layout, with theirs
    it does not."""
    support.worker()  # (puts tests/distributed on the path)
    from megatron_bridge_expert_parallel import (
        assert_megatron_bridge_merge_at_expert_parallelism,
        assert_ours_alone_gives_the_megatron_forward,
    )

    ranks = parallel_run.ranks(built.entry.name)
    assert_megatron_bridge_merge_at_expert_parallelism(ranks, config_of(built).num_experts, built.entry.scale)
    assert_ours_alone_gives_the_megatron_forward(ranks[0], built.hf_dir, tmp_path)


# Specific tests of single entries (architecture oddities) ---------------------------------------------

@only("qwen3_5_moe_text")
def test_qwen3_5_moe_text_folder_without_its_weight_files_still_exports(built, tmp_path):
    """config.json and the index only (a download without weights): the source's layout is
    followed, the shapes of the MTP weights are simply not checked against files."""
    original = support.source_tensors(built.hf_dir)
    shutil.copy(built.hf_dir / "config.json", tmp_path / "config.json")
    index = {"weight_map": {name: "model-00001-of-00002.safetensors" for name in original}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    exported = dict(export_hf_weights(built.chunks, hf_config=tmp_path))
    assert sorted(n for n in exported if not is_adapter(n)) == sorted(original)


@only("qwen3_vl_moe")
def test_qwen3_vl_moe_adapters_export_from_a_folder_with_experts_stored_transposed(built, tmp_path):
    """A model built from a folder in the published expert layout (``fused_transposed``, what
    vLLM reads) exports its adapters (peft=True used to be refused: the adapters' merge check
    compared PEFT's in-memory expert shapes with the transposed ones): the base comes out
    transposed like the folder, the adapters as from the transformers-saved folder."""
    from bridge_ext_testing.build import build_megatron_model

    save_hf_pretrained(built.chunks, tmp_path / "model", tmp_path / "adapter", expert_layout="fused_transposed")
    table = table_for(config_of(built))
    assert source_expert_layouts(tmp_path / "model", table) == {"experts": "fused_transposed"}
    model = build_megatron_model(tmp_path / "model", lora=built.entry.lora)
    support.worker().set_global_lora(model.chunks, config_of(built))
    got = dict(export_hf_weights(model.chunks, peft=True))
    support.assert_same(got, export(built, peft=True, expert_layout="fused_transposed"),
                        "peft=True from the transposed folder")
    assert got["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 96)  # [E, H, 2I]


@only("gpt_oss")
def test_gpt_oss_megatron_bridge_exports_are_pinned(built):
    """Megatron-Bridge 0.6.2 cannot export gpt-oss with expert LoRA.

    * merged: it adds the ``[2I, H]`` delta to its transposed ``gate_up_proj[e]`` ``[H, 2I]``
      and fails (peft_bridge.py ``_merge_single_adapter_weight``);
    * adapters: every expert's pair goes to the one name ``mlp.experts.gate_up_proj.lora_A``
      (``[r, in]``), so only the last expert's survives, its B in Megatron's ``[gate; up]`` row
      order (not gpt-oss's interleaved one); attention adapters agree with ours bit for bit.
    Its base export of a LoRA-free model equals ours (checked when this table was written).
    """
    with pytest.raises(RuntimeError, match="must match the size"):
        dict(built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=False))
    ours = support.without_prefix(adapters(built).items())
    theirs = dict(built.bridge.export_adapter_weights(built.chunks, cpu=True, show_progress=False))
    attention = sorted(n for n in theirs if ".self_attn." in n)
    assert attention == sorted(n for n in ours if ".self_attn." in n)
    assert [n for n in attention if not torch.equal(ours[n], theirs[n])] == []
    experts = 4
    for layer in (0, 1):
        prefix = f"model.layers.{layer}.mlp.experts."
        assert sorted(n for n in theirs if n.startswith(prefix)) == [
            prefix + f"{p}.{f}.weight" for p in ("down_proj", "gate_up_proj") for f in ("lora_A", "lora_B")]
        for peft_infix, name in (("base_layer.", "gate_up_proj"), ("", "down_proj")):
            lora_a = ours[f"{prefix}{peft_infix}lora_A.weight"]  # PEFT: [E * r, in], expert-major
            lora_b = ours[f"{prefix}{peft_infix}lora_B.weight"]  # PEFT: [out, r * E], expert-minor
            last_a = lora_a.reshape(experts, -1, lora_a.shape[-1])[-1]
            last_b = lora_b.reshape(lora_b.shape[0], -1, experts)[..., -1]
            if name == "gate_up_proj":  # ours interleave gate / up rows like the base
                last_b = torch.cat([last_b[0::2], last_b[1::2]])
            assert torch.equal(theirs[f"{prefix}{name}.lora_A.weight"], last_a)
            assert torch.equal(theirs[f"{prefix}{name}.lora_B.weight"], last_b)


def test_every_known_exception_names_a_check_of_this_module():
    checks = {name for name, value in globals().items() if name.startswith("test_") and callable(value)}
    unknown = {(entry.name, check) for entry in ENTRIES for check in entry.exceptions if check not in checks}
    assert unknown == set()
    assert all(reason.strip() for entry in ENTRIES for reason in entry.exceptions.values())


def test_the_peft_types_the_library_lists_as_proven_are_entries_here():
    """``bridge-ext architectures`` says which PEFT types beyond LoRA each model type's tests prove
    (``architecture_notes.PEFT_TYPES_PROVEN``): each is an entry of the contract (Qwen2's merged-only
    DoRA: test_oddities.py's bias test)."""
    from bridge_ext.tables.architecture_notes import PEFT_TYPES_PROVEN

    kinds = {"DoRA": "dora", "DoRA (non-expert)": "dora", "CanonicalLoRA": "canonical_lora"}
    listed = {(model_type, kinds[name]) for model_type, names in PEFT_TYPES_PROVEN.items() for name in names
              if name in kinds}
    assert listed == {(entry.model_type, entry.peft) for entry in ENTRIES if entry.peft != "lora"}
