"""A live export refuses bad inputs before the first tensor leaves; persistent buffers are state.

One tiny dense Qwen3 Megatron model (no LoRA) for the whole module.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bridge_ext import export_hf_weights
from bridge_ext_testing.build import build_megatron_model
from bridge_ext_testing.tiny_dense import tiny_dense
from bridge_ext.errors import ExportError
from bridge_ext.live import LiveModelSource
from bridge_ext.table import ExtraWeights, rule


@pytest.fixture(scope="module")
def built(megatron_cpu, tmp_path_factory):
    return build_megatron_model(tiny_dense(tmp_path_factory.mktemp("qwen3"), "qwen3"))


@pytest.fixture()
def mlp(built):
    """Layer 1's MLP; buffers a test registers there are removed afterwards."""
    module = built.chunks[0].decoder.layers[1].mlp
    before = set(module._buffers)
    yield module
    for name in set(module._buffers) - before:
        del module._buffers[name]
        module._non_persistent_buffers_set.discard(name)


def test_persistent_buffers_are_model_state_and_refused_when_unmapped(built, mlp):
    mlp.register_buffer("token_counts", torch.zeros(4), persistent=False)  # runtime state: ignored
    assert "decoder.layers.1.mlp.token_counts" not in LiveModelSource(built.chunks).base_names()
    assert len(dict(export_hf_weights(built.chunks))) > 0
    mlp.register_buffer("router_bias", torch.arange(4.0))
    source = LiveModelSource(built.chunks)
    assert "decoder.layers.1.mlp.router_bias" in source.base_names()
    assert torch.equal(source.shards("decoder.layers.1.mlp.router_bias")[0], torch.arange(4.0))
    with pytest.raises(ExportError, match=r"decoder\.layers\.1\.mlp\.router_bias"):
        next(export_hf_weights(built.chunks))


def test_a_rule_maps_a_buffer(built, mlp, monkeypatch):
    import bridge_ext.tables

    mlp.register_buffer("router_bias", torch.arange(4.0))
    table = bridge_ext.tables.table_for("qwen3")
    extended = dataclasses.replace(
        table, rules=(*table.rules, rule("decoder.layers.{layer}.mlp.router_bias", "extra.layers.{layer}.bias",
                                         tp="replicated")),
        extra_weights=ExtraWeights(prefixes=("extra.",), count_key="num_hidden_layers"))
    monkeypatch.setattr(bridge_ext.tables, "_REGISTERED", {})
    bridge_ext.tables.register_table(extended, overwrite=True)
    exported = dict(export_hf_weights(built.chunks))
    assert torch.equal(exported["extra.layers.1.bias"], torch.arange(4.0))


def _config(built, **changes):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(built.hf_dir))
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize(("changes", "named"), [
    ({"num_attention_heads": 8, "head_dim": 8}, r"decoder\.layers\.0\.self_attention\.linear_qkv\.weight"),
    ({"intermediate_size": 80}, r"mlp\.(gate|up)_proj\.weight"),
])
def test_a_config_the_model_does_not_fit_fails_before_the_first_tensor(built, changes, named):
    config = _config(built, **changes)
    with pytest.raises(ExportError, match=named):
        next(export_hf_weights(built.chunks, hf_config=config))


def test_adapters_only_without_lora_and_unknown_architectures_are_errors(built):
    from transformers import GPT2Config

    with pytest.raises(ExportError, match="no LoRA adapters"):
        next(export_hf_weights(built.chunks, adapters_only=True))
    with pytest.raises(ExportError, match="register_table"):
        next(export_hf_weights(built.chunks, hf_config=GPT2Config()))


def test_a_wrong_late_layer_tensor_fails_before_the_first_bucket_naming_it(built):
    from bridge_ext import export_hf_buckets

    fc2 = built.chunks[0].decoder.layers[1].mlp.linear_fc2
    original = fc2.weight
    fc2.weight = torch.nn.Parameter(torch.zeros(original.shape[0], original.shape[1] + 2))
    try:
        with pytest.raises(ExportError, match=r"decoder\.layers\.1\.mlp\.linear_fc2\.weight"):
            next(export_hf_buckets(built.chunks, bucket_bytes=1 << 10))
    finally:
        fc2.weight = original


class RecordingSource:
    """A tensor source that notes every tensor read from it, in order."""

    def __init__(self, source) -> None:
        self._source = source
        self.read: list[str] = []

    def __getattr__(self, name):
        return getattr(self._source, name)

    def shards(self, name):
        self.read.append(name)
        return self._source.shards(name)


def test_recorded_reads_are_what_the_conversion_reads(built):
    from bridge_ext.engine import Mode, TaskConverter
    from bridge_ext.export import prepare

    source, plan = prepare(built.chunks)
    recording = RecordingSource(source)
    read = recording.read

    for mode in (Mode.BASE, Mode.MERGED):
        converter = TaskConverter(recording, plan.dims, mode)
        for task in plan.base_tasks:
            read.clear()
            list(converter(task))
            assert converter.reads(task) == read, task.sources


def test_the_plan_is_built_once_and_never_changed(built):
    """Exports remember what they work out in the plan's cache; the plan's fields stay as built."""
    import dataclasses

    from bridge_ext.export import export_hf_weights, prepare

    _, plan = prepare(built.chunks)
    as_built = {field.name: getattr(plan, field.name) for field in dataclasses.fields(plan) if field.name != "cache"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.extra_shapes = {}
    with pytest.raises(TypeError):
        plan.hf_keys["model.extra.weight"] = (1,)
    assert isinstance(plan.base_tasks, tuple) and isinstance(plan.adapter_tasks, tuple)
    list(export_hf_weights(built.chunks, peft=False))
    _, again = prepare(built.chunks)
    assert again is plan and plan.cache.checked  # remembered, with what its export checked
    assert all(getattr(plan, name) is value for name, value in as_built.items())
    newer = plan.with_extra_shapes({"model.extra.weight": (1,)})
    assert dict(newer.extra_shapes) == {"model.extra.weight": (1,)} and not plan.extra_shapes
    assert newer.cache is not plan.cache and not newer.cache.checked


@pytest.fixture(scope="module")
def moe(megatron_cpu, tmp_path_factory):
    from bridge_ext_testing import tiny_models
    from bridge_ext_testing.build import LoraSettings, randomize_lora

    model = build_megatron_model(tiny_models.tiny_qwen35_moe(tmp_path_factory.mktemp("moe")),
                                 lora=LoraSettings(target_modules=("linear_fc1", "linear_fc2")))
    randomize_lora(model.chunks, seed=2)
    return model


@pytest.mark.parametrize("base", ["base", "merged"])
def test_recorded_reads_of_fused_experts_are_what_the_conversion_reads(moe, base):
    """Fused experts convert a block of experts at a time and pack every expert's LoRA at
    once; the reads recorded on meta tensors must still be the real reads, in order."""
    from bridge_ext.engine import Mode
    from bridge_ext.engine.stacked import StackedExperts
    from bridge_ext.export import conversion_passes, prepare

    source, plan = prepare(moe.chunks, expert_layout="fused", expert_adapter_layout="fused")
    recording = RecordingSource(source)
    read = recording.read

    stacked = 0
    for converter, tasks in conversion_passes(recording, plan, base=Mode(base), adapters=True):
        for task in tasks:
            read.clear()
            list(converter(task))
            assert converter.reads(task) == read, task.sources
            stacked += bool(task.rule.stack and converter.adapter_of(task, task.sources[0]))
    assert stacked >= 2  # the base pass and the adapter pass each went through adapted fused experts


@pytest.mark.parametrize("base", ["base", "merged"])
def test_fused_experts_side_by_side_equal_expert_by_expert(moe, base):
    """The batched fused-expert path (blocks of experts, packed LoRA, batched merge) gives the
    tensors the expert-by-expert path gives, under the same names."""
    import torch

    from bridge_ext.engine import Mode
    from bridge_ext.engine.stacked import StackedExperts
    from bridge_ext.export import conversion_passes, prepare

    source, plan = prepare(moe.chunks, expert_layout="fused", expert_adapter_layout="fused")
    compared = 0
    for converter, tasks in conversion_passes(source, plan, base=Mode(base), adapters=True):
        for task in tasks:
            if not (task.rule.stack and converter.adapter_of(task, task.sources[0])):
                continue
            strategy = StackedExperts(converter)
            batched = dict(strategy(task))
            each = dict(strategy.each_expert(task))
            assert batched.keys() == each.keys() and batched
            for name, tensor in batched.items():
                assert torch.equal(tensor, each[name]), name
            compared += 1
    assert compared >= 2


FUSED_EXPERT_ADAPTER = r"layers\.0\.mlp\.experts\.base_layer\.lora_A\.weight$"
PER_EXPERT_ADAPTER = r"layers\.0\.mlp\.experts\.3\.up_proj\.lora_B\.weight$"


def _has(pattern: str, names) -> bool:
    import re

    return any(re.search(pattern, name) for name in names)


def test_live_exports_default_to_the_tables_vllm_layout_files_to_peft(moe, monkeypatch, tmp_path):
    import bridge_ext.tables
    from bridge_ext import save_hf_pretrained
    from safetensors import safe_open

    names = [name for name, _ in export_hf_weights(moe.chunks, adapters_only=True)]
    # vLLM's Qwen3_5MoeForCausalLM (the text-only class) loads expert adapters per expert
    assert _has(PER_EXPERT_ADAPTER, names) and not _has(FUSED_EXPERT_ADAPTER, names)
    table = bridge_ext.tables.table_for("qwen3_5_moe_text")
    monkeypatch.setattr(bridge_ext.tables, "_REGISTERED", {})
    layouts = {"Qwen3_5MoeForCausalLM": "fused"}
    bridge_ext.tables.register_table(dataclasses.replace(table, vllm_expert_adapter_layouts=layouts), overwrite=True)
    names = [name for name, _ in export_hf_weights(moe.chunks, adapters_only=True)]
    assert _has(FUSED_EXPERT_ADAPTER, names)
    names = [name for name, _ in export_hf_weights(moe.chunks, adapters_only=True, expert_adapter_layout="per_expert")]
    assert _has(PER_EXPERT_ADAPTER, names) and not _has(FUSED_EXPERT_ADAPTER, names)
    save_hf_pretrained(moe.chunks, adapter_dir=tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        assert _has(FUSED_EXPERT_ADAPTER, handle.keys())


def test_adapter_folders_for_vllm_take_its_layout_and_refuse_the_other(moe, tmp_path):
    from bridge_ext import save_hf_pretrained
    from bridge_ext.errors import BridgeExtError
    from safetensors import safe_open

    result = save_hf_pretrained(moe.chunks, adapter_dir=tmp_path / "vllm", adapter_for="vllm")
    with safe_open(str(tmp_path / "vllm" / "adapter_model.safetensors"), "pt") as handle:
        assert _has(PER_EXPERT_ADAPTER, handle.keys()) and not _has(FUSED_EXPERT_ADAPTER, handle.keys())
        written = set(handle.keys())
    # vLLM applies no LoRA to its MTP drafter: those adapters are left out, and said so
    mtp = {name for name, _ in export_hf_weights(moe.chunks, adapters_only=True) if ".mtp." in name}
    assert mtp and not mtp & written
    assert any(f"{len(mtp)} MTP adapter tensors not written" in note for note in result.notes), result.notes
    with pytest.raises(BridgeExtError, match="vLLM does not load fused expert adapters for Qwen3_5MoeForCausalLM"):
        save_hf_pretrained(moe.chunks, adapter_dir=tmp_path / "refused", adapter_for="vllm",
                           expert_adapter_layout="fused")
    with pytest.raises(BridgeExtError, match="adapter_for must be one of"):
        save_hf_pretrained(moe.chunks, adapter_dir=tmp_path / "refused", adapter_for="sglang")
    assert not (tmp_path / "refused").exists()


def test_live_exports_for_vllm_refuse_its_unloaded_adapter_layout_and_leave_mtp_adapters_out(moe):
    import warnings

    from bridge_ext import export_hf_buckets
    from bridge_ext.errors import BridgeExtError

    stream = export_hf_weights(moe.chunks, adapters_only=True, adapter_for="vllm", expert_adapter_layout="fused")
    with pytest.raises(BridgeExtError) as refused:
        next(stream)  # before the first tensor
    assert str(refused.value) == ("vLLM does not load fused expert adapters for Qwen3_5MoeForCausalLM: it loads "
                                  "per_expert ones (leave expert_adapter_layout unset for adapter_for='vllm')")
    with pytest.raises(BridgeExtError) as refused:
        next(export_hf_weights(moe.chunks, adapter_for="sglang"))
    assert str(refused.value) == "adapter_for must be None or 'vllm' for a live export, not 'sglang'"

    everything = [name for name, _ in export_hf_weights(moe.chunks, adapters_only=True)]
    mtp = {name for name in everything if ".mtp." in name}
    assert mtp
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = [name for name, _ in export_hf_weights(moe.chunks, adapters_only=True, adapter_for="vllm")]
        again = [name for bucket in export_hf_buckets(moe.chunks, 1 << 12, adapters_only=True, adapter_for="vllm")
                 for name, _ in bucket.tensors]
    assert names == again == [name for name in everything if name not in mtp]
    # the same plan (remembered between steps) warns once
    assert [str(each.message) for each in caught] == [
        "MTP adapters left out of the export for vLLM: vLLM applies no LoRA to its MTP drafter "
        "(peft=False keeps their effect in the drafter's weights)"]


def test_live_exports_for_vllm_refuse_a_base_expert_layout_its_loader_does_not_take(moe, monkeypatch):
    import bridge_ext.tables
    from bridge_ext.errors import BridgeExtError

    table = bridge_ext.tables.table_for("qwen3_5_moe_text")
    monkeypatch.setattr(bridge_ext.tables, "_REGISTERED", {})
    # the tiny model's folder keeps experts per expert: a table saying vLLM takes only fused ones
    only = {"Qwen3_5MoeForCausalLM": "fused"}
    bridge_ext.tables.register_table(dataclasses.replace(table, vllm_expert_layouts=only), overwrite=True)
    with pytest.raises(BridgeExtError) as refused:
        next(export_hf_weights(moe.chunks, adapter_for="vllm", expert_layout="per_expert"))
    assert str(refused.value) == ("vLLM does not load per_expert expert weights for Qwen3_5MoeForCausalLM: it loads "
                                  "fused ones (leave expert_layout unset for adapter_for='vllm')")
    fused, per_expert = r"layers\.0\.mlp\.experts\.gate_up_proj$", r"layers\.0\.mlp\.experts\.3\.up_proj\.weight$"
    names = [name for name, _ in export_hf_weights(moe.chunks, peft=False, adapter_for="vllm")]
    assert _has(fused, names) and not _has(per_expert, names)
    # without adapter_for nothing changes: the source folder's layout
    names = [name for name, _ in export_hf_weights(moe.chunks, peft=False)]
    assert _has(per_expert, names) and not _has(fused, names)


@pytest.mark.parametrize(("model_type", "model_class", "mtp_layers", "only"), [
    ("deepseek_v3", "DeepseekV3ForCausalLM", 1, "per_expert"),
    ("deepseek_v3", "DeepseekV3ForCausalLM", 0, "per_expert"),
    ("glm4_moe", "Glm4MoeForCausalLM", 1, "per_expert"),  # its MTP drafter loads no fused experts
    ("glm4_moe", "Glm4MoeForCausalLM", 0, None),  # the main class loads both
    # its loader reads experts stored transposed only (the size mismatch of tests/consumers' base_fused)
    ("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", None, "fused_transposed"),
])
def test_the_tables_say_which_base_expert_layouts_vllm_loads(model_type, model_class, mtp_layers, only):
    """tests/consumers/test_vllm.py shows vLLM's loaders refusing fused experts there."""
    from transformers import AutoConfig

    from bridge_ext.consumer import vllm_base_layout
    from bridge_ext.errors import BridgeExtError

    mtp = {} if mtp_layers is None else {"num_nextn_predict_layers": mtp_layers}
    config = AutoConfig.for_model(model_type, architectures=[model_class], **mtp)
    assert vllm_base_layout(config, None) == only
    if only is None:
        assert vllm_base_layout(config, "fused") == "fused"
        return
    with pytest.raises(BridgeExtError) as refused:
        vllm_base_layout(config, "fused")
    assert str(refused.value) == (f"vLLM does not load fused expert weights for {model_class}: it loads "
                                  f"{only} ones (leave expert_layout unset for adapter_for='vllm')")


def test_the_plan_is_remembered_until_the_model_changes(built, mlp):
    from bridge_ext.export import prepare

    mlp.register_buffer("token_counts", torch.zeros(4), persistent=False)  # runtime state
    source, plan = prepare(built.chunks)
    assert prepare(built.chunks) == (source, plan)  # remembered
    mlp.token_counts = torch.ones(4)  # reassigned (as every step may): the plan holds
    assert prepare(built.chunks)[1] is plan
    mlp.register_buffer("router_bias", torch.arange(4.0))  # model state: planned anew (and refused)
    with pytest.raises(ExportError, match=r"router_bias"):
        prepare(built.chunks)


def test_a_new_parameter_or_a_changed_shape_or_dtype_is_planned_anew(built):
    from bridge_ext.export import prepare

    norm = built.chunks[0].decoder.final_layernorm
    original = norm.weight
    _, plan = prepare(built.chunks)
    try:
        norm.weight = torch.nn.Parameter(original.detach().clone())  # a new parameter object
        _, replaced = prepare(built.chunks)
        assert replaced is not plan
        assert torch.equal(dict(export_hf_weights(built.chunks))["model.norm.weight"], norm.weight.detach())
        norm.weight.data = norm.weight.data.double()  # same object, other dtype
        _, recast = prepare(built.chunks)
        assert recast is not replaced
        norm.weight.data = torch.zeros(original.shape[0] + 1, dtype=original.dtype)  # other shape
        with pytest.raises(ExportError, match="model.norm.weight|final_layernorm"):
            next(export_hf_weights(built.chunks))
    finally:
        norm.weight = original
    assert prepare(built.chunks)[1] is not plan


def test_expert_row_parallel_lora_at_expert_tensor_parallelism_is_warned(moe, monkeypatch):
    """The trained forward of such adapters is not W + scale B A (trained_forward.py)."""
    import warnings

    from bridge_ext import trained_forward
    from bridge_ext.export import prepare

    source, plan = prepare(moe.chunks)
    adapters = source.adapters()
    with pytest.warns(trained_forward.TrainedForwardWarning, match=r"linear_fc2.*expert-tensor parallelism 2"):
        trained_forward.warn_if_expert_lora_differs(plan, adapters, expert_tensor_parallel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained_forward.warn_if_expert_lora_differs(plan, adapters, expert_tensor_parallel=1)
        fc1_only = {module: adapter for module, adapter in adapters.items() if "linear_fc2" not in module}
        trained_forward.warn_if_expert_lora_differs(plan, fc1_only, expert_tensor_parallel=2)
        monkeypatch.setattr(trained_forward, "LAST_AFFECTED_MEGATRON_BRIDGE", (0, 6, 1))
        trained_forward.warn_if_expert_lora_differs(plan, adapters, expert_tensor_parallel=2)


def test_merged_per_expert_tasks_convert_in_batches_equal_to_one_by_one(moe):
    from bridge_ext.engine import Mode, TaskConverter, merge_batches
    from bridge_ext.export import prepare

    source, plan = prepare(moe.chunks, expert_layout="per_expert")
    converter = TaskConverter(source, plan.dims, Mode.MERGED)
    batches = list(merge_batches(converter, plan.base_tasks))
    assert sorted(id(task) for batch in batches for task in batch) == sorted(map(id, plan.base_tasks))
    batched = [batch for batch in batches if len(batch) > 1]
    assert batched and all(len({id(task.rule) for task in batch}) == 1 for batch in batched)
    one_by_one = {name: tensor for task in plan.base_tasks for name, tensor in converter(task)}
    together = {name: tensor for batch in batched for name, tensor in converter.convert_batch(batch)}
    assert len(together) == sum(len(task.hf_names) for batch in batched for task in batch)
    for name, tensor in together.items():
        assert torch.equal(tensor, one_by_one[name]), name


# Megatron-Bridge LoRA settings for Transformer Engine grouped experts -------------------------------

@pytest.mark.parametrize(("adapter_class", "knob"), [("GroupedExpertLinearAdapter", "share_expert_adapters=False"),
                                                     ("SharedOuterGroupedExpertAdapter",
                                                      "experts_shared_outer_loras=True")])
def test_grouped_expert_adapters_are_refused_naming_their_setting(moe, adapter_class, knob):
    from megatron.bridge.peft import utils

    wrapper = moe.chunks[0].decoder.layers[0].mlp.experts.local_experts[0].linear_fc1
    original = wrapper.adapter
    grouped = getattr(utils, adapter_class)(
        original.linear_in.weight.shape[1], original.linear_out.weight.shape[0], original.dim, num_local_experts=4,
        base_linear_name="decoder.layers.0.mlp.experts.linear_fc1", model_parallel_config=wrapper.to_wrap.config,
        alpha=original.alpha, params_device=torch.device("cpu"), params_dtype=torch.float32)
    wrapper.adapter = grouped
    try:
        with pytest.raises(ExportError, match=rf"local_experts\.0\.linear_fc1: grouped-expert LoRA of Megatron-Bridge's "
                                              rf"LoRA\({knob}\) \({adapter_class}\) is not supported"):
            next(export_hf_weights(moe.chunks, peft=False))
    finally:
        wrapper.adapter = original


def test_one_adapter_shared_by_grouped_experts_is_refused_naming_the_setting(moe):
    """``share_expert_adapters=True`` (Megatron-Bridge's default) on a grouped linear puts one
    ``linear_in`` / ``linear_out`` on ``experts.linear_fc1``, whose weights are ``weight0..``."""
    from bridge_ext.export import plan_export, resolve_hf_config
    from bridge_ext.source import Adapter

    module = "decoder.layers.0.mlp.experts.linear_fc1"

    class GroupedSource:
        def base_names(self):
            return [f"{module}.weight{e}" for e in range(4)]

        def adapters(self):
            return {module: Adapter(module, f"{module}.adapter.linear_in.weight",
                                    f"{module}.adapter.linear_out.weight", alpha=8.0, rank=4)}

    with pytest.raises(ExportError, match=r"shared by all the grouped experts .*share_expert_adapters=True"):
        plan_export(GroupedSource(), resolve_hf_config(moe.chunks))
