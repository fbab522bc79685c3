"""The contract's entries: one per (table, tiny model, PEFT type, parallel layout) case.

An entry names the tiny Hugging Face model (a maker from the test-support package
``bridge_ext_testing``), the Megatron-Bridge PEFT settings, how its LoRA gets its values, its
inputs and reference forward, the facts about the tiny model the checks compare against (MTP,
experts on disk, the expert-adapter layout vLLM loads, what Megatron-Bridge 0.6.2 exports
otherwise) and its known exceptions: ``{check name: reason}``, each reason naming the test that
proves what stands in for the check. Every check of ``test_contract.py`` runs on every entry it
applies to unless the entry lists it there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bridge_ext_testing import tiny_gpt_families as gpt
from bridge_ext_testing import tiny_models as qwen35
from bridge_ext_testing import tiny_qwen_moe_vl as qwen_moe_vl
from bridge_ext_testing.build import LoraSettings, randomize_lora
from bridge_ext_testing.tiny_dense import tiny_dense

from . import support

Maker = Callable[[Path], Path]
Forward = Callable[[object, torch.Tensor, dict], torch.Tensor]

#: every LoRA target Megatron-Bridge offers (the parallel worker's, tests/distributed/worker.py)
ALL_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj", "linear_q_proj",
               "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj")
GQA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
MLA_TARGETS = ("linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
               "linear_kv_up_proj", "linear_proj", "linear_fc1", "linear_fc2")
QWEN35_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")
#: the routed experts left out (Megatron-Bridge's DoRA cannot run on them: test_qwen3_5_moe_dora_on_routed_experts...)
QWEN35_NON_EXPERT_TARGETS = ("linear_qkv", "linear_proj", "in_proj", "out_proj", "*.shared_experts.linear_fc1",
                             "*.shared_experts.linear_fc2")

# Megatron-Bridge writes the vision tower's attn.qkv lora_B in Megatron's per-head [q_h; k_h; v_h]
# row order and merges that delta into the de-interleaved base; ours follow the base's [Q; K; V]
# (the logits checks judge). test_adapters_equal_megatron_bridge checks each such tensor is ours re-ordered.
VISION_QKV = re.compile(r"\.visual\.blocks\.\d+\.attn\.qkv\.(lora_B\.)?weight$")
# DeepSeek-V3 / GLM-4.5: Megatron-Bridge's MTP mappings (deepseek/common.py, glm/glm45_bridge.py) have
# no model.layers.{N+i}.embed_tokens nor shared_head.head, which the published checkpoints hold and
# vLLM's MTP loaders read (copies of the shared embedding and output layer).
# docs/compatibility.md: transformers 5.9's Qwen3.5 config keeps partial_rotary_factor out of its
# top-level attributes, so Megatron-Bridge 0.6.2 builds rotary_percent 0.5 and the export refuses it.
QWEN35_TRANSFORMERS = "5.23"
QWEN35_REASON = ("Qwen3.5 needs transformers 5.23+ (docs/compatibility.md: with 5.9 Megatron-Bridge 0.6.2 builds "
                 "rotary_percent 0.5 for partial_rotary_factor 0.25 and the export refuses it)")
MTP_COPIES = re.compile(r"^model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.")

DORA_MERGE = ("Megatron-Bridge 0.6.2 merges DoRA as plain LoRA: "
              "test_dora_merged_by_megatron_bridge_is_plain_lora pins it")


def random_lora(seed: int, std: float = 0.05) -> Callable[[object], None]:
    """LoRA values drawn per local tensor (``randomize_lora``; DoRA magnitudes too)."""
    def fill(built) -> None:
        randomize_lora(built.chunks, seed=seed, std=std)
    return fill


def global_lora(built) -> None:
    """LoRA values keyed on global names (the parallel runs hold the same model)."""
    from transformers import AutoConfig

    support.worker().set_global_lora(built.chunks, AutoConfig.from_pretrained(str(built.hf_dir)))


@dataclass(frozen=True)
class Entry:
    name: str  # the test id (and the tiny model's folder name in the parallel runs)
    model_type: str  # the table's model type
    make: Maker
    lora: LoraSettings
    values: Callable[[object], None]
    inputs: Callable[[], tuple[torch.Tensor, dict]]
    forward: Forward = support.megatron_forward
    load_hf: Callable[[Path], object] | None = None  # None: transformers' Auto classes (bridge_ext.verify)
    tolerance: float = 1e-4  # logits, relative to the largest
    moe: bool = False
    expert_lora: bool | None = None  # LoRA on the routed experts (default: moe)
    vl: bool = False
    vision_lora: bool = True  # Megatron-Bridge's LoRA reaches the vision tower (VL only)
    mtp: bool = False  # MTP tensors in the tiny checkpoint (outside transformers' key set)
    experts_on_disk: str = "per_expert"  # the tiny checkpoint's expert layout (transformers' save)
    expert_layouts: tuple[str, ...] = ("per_expert", "fused")  # the base expert layouts transformers loads
    vllm_adapters: str = "per_expert"  # the expert-adapter layout vLLM loads (the live default)
    gated_experts: bool = True  # fused gate_up_proj = [gate; up] rows of [E, 2I, H] (not gpt-oss)
    hf_spellings: tuple[str, ...] = ()  # Megatron-looking words that are this architecture's HF names
    adapter_tensors: int | None = None  # LoRA tensors of the saved adapter file, where counted
    adapter_config: Callable[[dict], None] | None = None  # what adapter_config.json must say
    megatron_bridge_atol: float = 0.0  # its merged export against ours (0: bit for bit)
    megatron_bridge_only_ours: re.Pattern | None = None  # merged names Megatron-Bridge does not write
    layout: str | None = None  # a parallel layout of test_contract.PARALLEL_LAYOUTS
    megatron_bridge_at_ep2: bool = False  # its merged export pinned wrong at EP=2 (parallel run)
    needs_transformers: tuple[str, str] | None = None  # (the oldest transformers it runs with, why): older skips
    exceptions: dict[str, str] = field(default_factory=dict)  # check -> why, and what proves instead

    @property
    def peft(self) -> str:
        return self.lora.kind

    @property
    def lora_on_experts(self) -> bool:
        return self.moe if self.expert_lora is None else self.expert_lora

    @property
    def scale(self) -> float:
        return self.lora.alpha / self.lora.dim


def _dense(name: str, kind: str, tied: bool = False, **entry) -> Entry:
    defaults = dict(lora=LoraSettings(), values=random_lora(len(name)), tolerance=1e-5,
                    inputs=support.text_inputs(100, 11, 0), adapter_tensors=2 * 7 * 2)
    return Entry(name, kind, lambda d: tiny_dense(d, kind, tied=tied), **{**defaults, **entry})


def _qwen35(name: str, make: Maker, **entry) -> Entry:
    vl = name in ("qwen3_5", "qwen3_5_moe")
    defaults = dict(lora=LoraSettings(target_modules=QWEN35_TARGETS), values=random_lora(3, 0.1), mtp=True,
                    hf_spellings=("linear_fc",) if vl else (),
                    inputs=support.image_text_inputs if vl else support.text_inputs(120, 40, 1),
                    forward=support.vision_forward if vl else support.megatron_forward, vl=vl,
                    moe="moe" in name, megatron_bridge_atol=1e-6, needs_transformers=(QWEN35_TRANSFORMERS, QWEN35_REASON))
    return Entry(name, entry.pop("model_type", name), make, **{**defaults, **entry})


def _qwen_moe_vl(name: str, make: Maker, **entry) -> Entry:
    vl = entry.get("vl", False)
    defaults = dict(lora=LoraSettings(target_modules=ALL_TARGETS), values=global_lora,
                    inputs=support.image_text_inputs if vl else support.text_inputs(120, 24, 1, low=3),
                    forward=support.vision_forward if vl else support.megatron_forward)
    return Entry(name, name, make, **{**defaults, **entry})


def _gpt_family(name: str, make: Maker, targets: tuple[str, ...], **entry) -> Entry:
    defaults = dict(lora=LoraSettings(target_modules=targets), values=random_lora(3, 0.1),
                    inputs=lambda: (support.input_ids(), {}), forward=support.gpt_family_forward,
                    load_hf=support.hf_base_model, mtp=True, megatron_bridge_atol=1e-6)
    return Entry(name, entry.pop("model_type", name), make, **{**defaults, **entry})


def _normalized_expert_ranks(config: dict) -> None:
    """normalize_moe_lora: expert rank dim // topk (2 here), in rank_pattern."""
    assert config["r"] == 4 and set(config["rank_pattern"].values()) == {2}
    assert sorted(config["rank_pattern"]) == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                              for p in ("down_proj", "gate_up_proj")]


def _router_lora(config: dict) -> None:
    """LoRA on the router: its Hugging Face module is mlp.gate."""
    assert "gate" in config["target_modules"] and config["rank_pattern"] == {}


def _canonical_experts(config: dict) -> None:
    """CanonicalLoRA's gate and up adapters of each expert: one block-diagonal pair of rank 2r,
    alpha 2*alpha (the same scale) on PEFT's fused gate_up_proj."""
    gate_up = [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)]
    assert config["r"] == 4 and config["rank_pattern"] == dict.fromkeys(gate_up, 8)
    assert config["alpha_pattern"] == dict.fromkeys(gate_up, 16)


def _target_modules(count: int) -> Callable[[dict], None]:
    def check(config: dict) -> None:
        assert len(config["target_modules"]) == count, config["target_modules"]
    return check


def _dora_config(config: dict) -> None:
    assert config["use_dora"] is True and config["use_rslora"] is False


GPT_OSS_MEGATRON_BRIDGE = ("Megatron-Bridge 0.6.2 cannot export gpt-oss with expert LoRA (merged: fails; adapters: "
                           "one pair per fused name): test_gpt_oss_megatron_bridge_exports_are_pinned")
GPT_OSS_UNGATED = ("gpt-oss interleaves gate and up rows and stores experts [E, H, 2I]: its fused experts are "
                   "judged by the logits checks (test_saved_folders..., test_merged_export_in_every_expert_layout...)")

ENTRIES: tuple[Entry, ...] = (
    # dense (Llama, Qwen3; tied and untied) ---------------------------------------------------------
    _dense("qwen3", "qwen3"),
    _dense("qwen3-tied", "qwen3", tied=True),
    _dense("llama", "llama"),
    # Qwen3.5: dense, MoE and both image-text types, one MTP layer each --------------------------------
    _qwen35("qwen3_5_text", qwen35.tiny_qwen35_dense),
    _qwen35("qwen3_5_moe_text", qwen35.tiny_qwen35_moe),
    _qwen35("qwen3_5", qwen35.tiny_qwen35_vl),
    _qwen35("qwen3_5_moe", lambda d: qwen35.tiny_qwen35_vl(d, moe=True), vllm_adapters="fused"),
    # Qwen MoE and VL, LoRA keyed on global names, each in one parallel layout -------------------------
    _qwen_moe_vl("qwen3_moe", qwen_moe_vl.tiny_qwen3_moe, moe=True, layout="tp2_ep2", megatron_bridge_at_ep2=True),
    _qwen_moe_vl("qwen2_moe", qwen_moe_vl.tiny_qwen2_moe, moe=True, layout="tp2_ep2", megatron_bridge_at_ep2=True),
    _qwen_moe_vl("qwen3_vl_moe", lambda d: qwen_moe_vl.tiny_qwen3_vl(d, moe=True), moe=True, vl=True,
                 experts_on_disk="fused", expert_layouts=("fused", "fused_transposed"), vllm_adapters="fused",
                 layout="tp2_ep2", hf_spellings=("linear_fc",)),
    _qwen_moe_vl("qwen3_vl", qwen_moe_vl.tiny_qwen3_vl, vl=True, layout="tp2", hf_spellings=("linear_fc",)),
    # Megatron-Bridge's Qwen2.5-VL holds Hugging Face's vision module: no Megatron linears for LoRA.
    _qwen_moe_vl("qwen2_5_vl", qwen_moe_vl.tiny_qwen2_5_vl, vl=True, vision_lora=False, layout="tp2",
                 forward=support.qwen2_5_vl_forward),
    # DeepSeek-V3 family, GLM-4.5 MoE, GLM-4.7-Flash, gpt-oss, MiMo ------------------------------------
    _gpt_family("mimo", gpt.tiny_mimo, GQA_TARGETS),
    _gpt_family("deepseek_v3", gpt.tiny_deepseek_v3, MLA_TARGETS, moe=True, hf_spellings=("shared_experts",),
                megatron_bridge_only_ours=MTP_COPIES),
    _gpt_family("glm4_moe", gpt.tiny_glm4_moe, GQA_TARGETS, moe=True, hf_spellings=("shared_experts",),
                megatron_bridge_only_ours=MTP_COPIES),
    # GLM-4.7-Flash's bridge (glm/glm47_flash_bridge.py) writes the MTP copies itself
    _gpt_family("glm4_moe_lite", gpt.tiny_glm4_moe_lite, MLA_TARGETS, moe=True, hf_spellings=("shared_experts",)),
    # Kimi-K2's config declares its own model type over DeepSeek-V3's architecture.
    _gpt_family("kimi_k2", lambda d: gpt.tiny_deepseek_v3(d, model_type="kimi_k2"), MLA_TARGETS, moe=True,
                hf_spellings=("shared_experts",), megatron_bridge_only_ours=MTP_COPIES),
    _gpt_family("gpt_oss", gpt.tiny_gpt_oss, GQA_TARGETS, moe=True, mtp=False, experts_on_disk="fused",
                expert_layouts=("fused",), vllm_adapters="fused", gated_experts=False, hf_spellings=("router",),
                exceptions={"test_merged_export_equals_megatron_bridge": GPT_OSS_MEGATRON_BRIDGE,
                            "test_adapters_equal_megatron_bridge": GPT_OSS_MEGATRON_BRIDGE,
                            "test_peft_3d_expert_packing_equals_a_merge_per_expert": GPT_OSS_UNGATED,
                            "test_per_expert_adapters_merged_by_hand_give_megatron_logits": GPT_OSS_UNGATED}),
    # DoRA (megatron.bridge.peft.dora.DoRA): magnitudes random, unlike the base rows' norms -------------
    _dense("qwen3-dora", "qwen3", lora=LoraSettings(kind="dora"), values=random_lora(3), adapter_tensors=2 * 7 * 3,
           adapter_config=_dora_config, exceptions={"test_merged_export_equals_megatron_bridge": DORA_MERGE}),
    _qwen35("qwen3_5_text-dora", qwen35.tiny_qwen35_dense, model_type="qwen3_5_text",
            lora=LoraSettings(kind="dora", target_modules=QWEN35_TARGETS), values=random_lora(5, 0.1),
            adapter_config=_dora_config, exceptions={"test_merged_export_equals_megatron_bridge": DORA_MERGE}),
    _qwen35("qwen3_5_moe_text-dora", qwen35.tiny_qwen35_moe, model_type="qwen3_5_moe_text",
            lora=LoraSettings(kind="dora", target_modules=QWEN35_NON_EXPERT_TARGETS), values=random_lora(5, 0.1),
            expert_lora=False, adapter_config=_dora_config,
            exceptions={"test_merged_export_equals_megatron_bridge": DORA_MERGE}),
    # CanonicalLoRA (megatron.bridge.peft.canonical_lora.CanonicalLoRA): one pair per part --------------
    # Megatron-Bridge 0.6.2's forward needs every part of a module it adapts (a missing adapter_k fails)
    _dense("qwen3-canonical_lora", "qwen3", lora=LoraSettings(kind="canonical_lora", target_modules=()),
           values=random_lora(8, 0.1), adapter_config=_target_modules(7)),
    _dense("qwen3-canonical_lora-some", "qwen3",
           lora=LoraSettings(kind="canonical_lora", target_modules=("linear_q", "linear_k", "linear_v", "linear_fc2")),
           values=random_lora(8, 0.1), adapter_tensors=2 * 4 * 2, adapter_config=_target_modules(4)),
    Entry("qwen3_moe-canonical_lora", "qwen3_moe", qwen_moe_vl.tiny_qwen3_moe, LoraSettings(kind="canonical_lora"),
          random_lora(9, 0.1), support.text_inputs(100, 11, 0), tolerance=1e-5, moe=True,
          adapter_config=_canonical_experts),
    # Megatron-Bridge LoRA settings on MoE models ------------------------------------------------------
    Entry("qwen3_moe-normalize_moe_lora", "qwen3_moe", qwen_moe_vl.tiny_qwen3_moe,
          LoraSettings(options=(("normalize_moe_lora", True),)), random_lora(7, 0.1), support.text_inputs(100, 11, 0),
          tolerance=1e-5, moe=True, adapter_config=_normalized_expert_ranks,
          exceptions={"test_peft_3d_expert_packing_equals_a_merge_per_expert":
                      "the experts' scale is rank_pattern's (adapter_config checked): the logits checks judge",
                      "test_per_expert_adapters_merged_by_hand_give_megatron_logits":
                      "the experts' scale is rank_pattern's (adapter_config checked): the logits checks judge"}),
    Entry("qwen3_moe-router", "qwen3_moe", qwen_moe_vl.tiny_qwen3_moe,
          LoraSettings(target_modules=("linear_qkv", "router")), random_lora(7, 0.1), support.text_inputs(100, 11, 0),
          tolerance=1e-5, moe=True, expert_lora=False, adapter_config=_router_lora),
)
BY_NAME = {entry.name: entry for entry in ENTRIES}
assert len(BY_NAME) == len(ENTRIES), "two entries share a name"
