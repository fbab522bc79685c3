"""Conformance of the Qwen MoE and VL tables on real Megatron-Core models (CPU, fp32).

One tiny Hugging Face model per type, saved by transformers, built in Megatron once per module
with LoRA (random non-zero A and B) on every target Megatron-Bridge offers for it. Per type:

* the base export is bit-exact with the source files, its names are transformers' own
  save-time key set (either expert layout), with no Megatron spelling;
* the adapter folder loads strictly in PEFT, and HF + PEFT logits equal the Megatron forward;
  the merged folder's logits too;
* the live export writes expert adapters in the layout vLLM loads for the type;
* PEFT's 3-D expert packing, merged by PEFT itself, equals an independent merge per expert of
  the per-expert (vLLM) layout;
* merged weights and adapters are compared with Megatron-Bridge's exports, tensor by tensor,
  every difference explained;
* every type's exports at a parallel layout (torchrun, gloo: TP=2 x EP=2 for the MoE types, TP=2
  for the dense VL types) are bit-identical to the single process, every mode and destination,
  and ``convert`` of the full and adapter-only checkpoints that layout saved equals the live
  export.
* at TP=2 x EP=2, transformers with our merged weights gives the Megatron forward's logits at that
  layout; Megatron-Bridge's merged export there is pinned as wrong for the experts of the other
  expert-parallel rank (Qwen3-MoE, Qwen2-MoE).

VL types get two prompts with one image each.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from bridge_ext import export_hf_weights, save_hf_pretrained
from bridge_ext_testing import tiny_qwen_moe_vl as tiny
from bridge_ext_testing.build import LoraSettings, build_megatron_model
from bridge_ext_testing.forward import megatron_logits
from bridge_ext_testing.tiny_models import tiny_vl_inputs
from bridge_ext.engine import PEFT_PREFIX
from bridge_ext.expert_layouts import source_expert_layouts
from bridge_ext.distributed import DESTINATIONS
from bridge_ext.hf_keys import hf_checkpoint_keys
from bridge_ext.ops import SplitGroupedRows
from bridge_ext.tables import table_for
from bridge_ext.verify import Report, check_model_folder, compare_logits, hf_logits, load_adapter_strict, load_hf_model

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import worker  # noqa: E402  (the layout tests' torchrun script: global LoRA values, every export mode)
from megatron_bridge_expert_parallel import (  # noqa: E402
    assert_megatron_bridge_merge_at_expert_parallelism,
    assert_ours_alone_gives_the_megatron_forward,
)

# Megatron spellings no Hugging Face name of these types contains (HF's Qwen3-VL vision MLP is linear_fc1 too).
MEGATRON_SPELLINGS = ("to_wrap", "decoder.", "linear_qkv", "linear_proj", ".adapter.", "layer_norm_weight",
                      "local_experts", "router", "vision_model", "embedding.", "output_layer", "shared_experts")
PEFT_EXPERT_KEY = re.compile(r"\.mlp\.experts\.(base_layer\.)?lora_[AB]\.weight$")
LORA = LoraSettings(target_modules=worker.LORA_TARGETS, dim=4, alpha=8)  # every target Megatron-Bridge offers
SCALE = LORA.alpha / LORA.dim


@dataclass(frozen=True)
class ModelType:
    make: Callable[[Path], Path]
    moe: bool = True
    vl: bool = False
    experts_on_disk: str = "per_expert"  # transformers' save-time layout of the experts
    other_layouts: tuple[str, ...] = ()  # further base expert layouts transformers loads
    vllm_adapters: str = "per_expert"  # vLLM's expert LoRA: 3-D ("fused") for is_3d_moe_weight models
    vision_lora: bool = True  # Megatron-Bridge's LoRA reaches the vision tower
    layout: str = "tp2_ep2"  # its parallel run's layout (PARALLEL_LAYOUTS below)


TYPES = {
    "qwen3_moe": ModelType(tiny.tiny_qwen3_moe),
    "qwen2_moe": ModelType(tiny.tiny_qwen2_moe),
    "qwen3_vl_moe": ModelType(lambda d: tiny.tiny_qwen3_vl(d, moe=True), vl=True, experts_on_disk="fused",
                              other_layouts=("fused_transposed",), vllm_adapters="fused"),
    "qwen3_vl": ModelType(tiny.tiny_qwen3_vl, moe=False, vl=True, layout="tp2"),
    # Megatron-Bridge's Qwen2.5-VL holds Hugging Face's vision module: no Megatron linears for LoRA.
    "qwen2_5_vl": ModelType(tiny.tiny_qwen2_5_vl, moe=False, vl=True, vision_lora=False, layout="tp2"),
}
MOE_TYPES = [name for name, kind in TYPES.items() if kind.moe]


@pytest.fixture(scope="module", params=list(TYPES))
def built(request, megatron_cpu, tmp_path_factory):
    hf_dir = TYPES[request.param].make(tmp_path_factory.mktemp(request.param))
    model = build_megatron_model(hf_dir, lora=LORA)
    # LoRA values keyed on global names: the parallel runs below hold the same model.
    worker.set_global_lora(model.chunks, AutoConfig.from_pretrained(str(hf_dir)))
    model.model_type = request.param
    return model


def source_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def inputs_for(model_type: str) -> tuple[torch.Tensor, dict]:
    if TYPES[model_type].vl:  # two prompts with one 16x16 image each
        inputs = tiny_vl_inputs(batch=2)
        return inputs.pop("input_ids"), inputs
    return torch.randint(3, 120, (2, 24), generator=torch.Generator().manual_seed(1)), {}


def reference_logits(built, input_ids: torch.Tensor, extra: dict) -> torch.Tensor:
    """The Megatron model's own logits.

    Megatron-Bridge's patch mergers (final and deepstack) use tanh-approximate GELU where
    Hugging Face's use the exact one (~5e-5 of the largest logit on the tiny models); to compare
    weights, both sides compute the same function (as in tests/test_export_qwen35.py).
    """
    if not TYPES[built.model_type].vl:
        return megatron_logits(built.chunks, input_ids)
    if built.model_type == "qwen2_5_vl":
        return qwen2_5_vl_logits(built.chunks[0], input_ids, extra)
    vision = built.chunks[0].vision_model
    mergers = [vision.merger, *getattr(vision.decoder, "deepstack_merger_list", [])]
    approximate = [merger.activation_func for merger in mergers]
    try:
        for merger in mergers:
            merger.activation_func = torch.nn.functional.gelu
        return megatron_logits(built.chunks, input_ids, **{k: v for k, v in extra.items() if k != "mm_token_type_ids"})
    finally:
        for merger, function in zip(mergers, approximate):
            merger.activation_func = function


@torch.no_grad()
def qwen2_5_vl_logits(model, input_ids: torch.Tensor, extra: dict) -> torch.Tensor:
    """Megatron-Bridge's ``Qwen25VLModel`` forward (it computes the MRoPE positions itself)."""
    from bridge_ext_testing.forward import causal_mask
    from bridge_ext_testing.qwen35 import cpu_current_device

    model.eval()
    with cpu_current_device():
        logits = model(input_ids=input_ids, attention_mask=causal_mask(input_ids.shape[1]), runtime_gather_output=True,
                       **extra)
    return logits[..., : tiny.VOCAB].float()


def is_adapter(name: str) -> bool:
    return name.startswith(PEFT_PREFIX)


def test_base_is_bit_exact_and_named_like_transformers(built):
    kind = TYPES[built.model_type]
    config = AutoConfig.from_pretrained(str(built.hf_dir))
    original = source_tensors(built.hf_dir)
    exported = dict(export_hf_weights(built.chunks))
    base = {name: tensor for name, tensor in exported.items() if not is_adapter(name)}
    assert sorted(base) == sorted(hf_checkpoint_keys(config)) == sorted(original)
    assert [name for name in original if not torch.equal(base[name], original[name])] == []
    for name in exported:
        assert not any(spelling in name.removeprefix(PEFT_PREFIX) for spelling in MEGATRON_SPELLINGS), name
    per_expert_adapters = any(re.search(r"\.experts\.\d+\.", n) for n in exported if is_adapter(n))
    assert per_expert_adapters == (kind.moe and kind.vllm_adapters == "per_expert")  # live export: vLLM's layout
    if kind.moe and kind.experts_on_disk == "per_expert":  # the in-memory (fused) layout holds the same experts
        fused = dict(export_hf_weights(built.chunks, expert_layout="fused", adapters_only=False))
        fused_base = {name: tensor for name, tensor in fused.items() if not is_adapter(name)}
        assert sorted(fused_base) == sorted(hf_checkpoint_keys(config, expert_layout="fused"))
        experts = next(name for name in fused_base if name.endswith("layers.1.mlp.experts.gate_up_proj"))
        per_expert = experts.removesuffix("gate_up_proj") + "3."
        assert torch.equal(fused_base[experts][3], torch.cat([original[per_expert + "gate_proj.weight"],
                                                              original[per_expert + "up_proj.weight"]]))


def test_peft_loads_the_adapter_strictly_and_both_folders_give_megatron_logits(built, tmp_path):
    save_hf_pretrained(built.chunks, tmp_path / "model", tmp_path / "adapter")
    save_hf_pretrained(built.chunks, tmp_path / "merged", merge=True)
    report = Report()
    check_model_folder(tmp_path / "model", report)
    check_model_folder(tmp_path / "merged", report)
    peft_model = load_adapter_strict(load_hf_model(tmp_path / "model"), tmp_path / "adapter", report)
    input_ids, extra = inputs_for(built.model_type)
    reference = reference_logits(built, input_ids, extra)
    relative = compare_logits(hf_logits(peft_model, input_ids, **extra), reference, report,
                              what=f"{built.model_type} HF + PEFT", relative_tolerance=1e-4)
    compare_logits(hf_logits(load_hf_model(tmp_path / "merged"), input_ids, **extra), reference, report,
                   what=f"{built.model_type} merged", relative_tolerance=1e-4)
    without = hf_logits(load_hf_model(tmp_path / "model"), input_ids, **extra)
    assert (without - reference).abs().max() / reference.abs().max() > 100 * max(relative, 1e-7)
    for layout in TYPES[built.model_type].other_layouts:  # written in that layout, loaded by transformers
        save_hf_pretrained(built.chunks, tmp_path / layout, merge=True, expert_layout=layout)
        table = table_for(AutoConfig.from_pretrained(str(built.hf_dir)))
        assert source_expert_layouts(tmp_path / layout, table) == {"experts": layout}
        check_model_folder(tmp_path / layout, report, expert_layout=layout)
        compare_logits(hf_logits(load_hf_model(tmp_path / layout), input_ids, **extra), reference, report,
                       what=f"{built.model_type} merged, experts {layout}", relative_tolerance=1e-4)
    adapter_keys = list(load_file(str(tmp_path / "adapter/adapter_model.safetensors")))
    if TYPES[built.model_type].moe:  # PEFT wrapped the experts: its own merge is checked below
        assert any(PEFT_EXPERT_KEY.search(name) for name in adapter_keys)
    if TYPES[built.model_type].vl:  # LoRA on the vision tower too, where Megatron-Bridge puts it
        assert any(".visual.blocks." in name for name in adapter_keys) == TYPES[built.model_type].vision_lora


@pytest.mark.parametrize("built", ["qwen3_vl_moe"], indirect=True)
def test_adapters_export_from_a_folder_with_experts_stored_transposed(built, tmp_path):
    """A model built from a folder in the published expert layout (``fused_transposed``, what
    vLLM reads) exports its adapters (peft=True used to be refused: the adapters' merge check
    compared PEFT's in-memory expert shapes with the transposed ones): the base comes out
    transposed like the folder, the adapters as from the transformers-saved folder."""
    save_hf_pretrained(built.chunks, tmp_path / "model", tmp_path / "adapter", expert_layout="fused_transposed")
    table = table_for(AutoConfig.from_pretrained(str(built.hf_dir)))
    assert source_expert_layouts(tmp_path / "model", table) == {"experts": "fused_transposed"}
    model = build_megatron_model(tmp_path / "model", lora=LORA)
    worker.set_global_lora(model.chunks, AutoConfig.from_pretrained(str(built.hf_dir)))
    got = dict(export_hf_weights(model.chunks, peft=True))
    assert_same(got, dict(export_hf_weights(built.chunks, peft=True, expert_layout="fused_transposed")),
                "peft=True from the transposed folder")
    assert got["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 96)  # [E, H, 2I]


@pytest.mark.parametrize("built", MOE_TYPES, indirect=True)
def test_peft_3d_expert_packing_equals_a_merge_per_expert(built, tmp_path):
    """PEFT merges our packed ``lora_A [r*E, in]`` / ``lora_B [out, r*E]`` itself; each expert
    must come out as ``W_e + scale * B_e @ A_e`` of the per-expert (vLLM) layout's factors."""
    save_hf_pretrained(built.chunks, tmp_path / "model", tmp_path / "adapter")
    peft_model = load_adapter_strict(load_hf_model(tmp_path / "model"), tmp_path / "adapter", Report())
    merged = dict(peft_model.merge_and_unload().named_parameters())
    source = dict(load_hf_model(built.hf_dir).named_parameters())  # transformers' own in-memory experts
    per_expert = dict(export_hf_weights(built.chunks, adapters_only=True, expert_adapter_layout="per_expert"))
    pattern = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")
    checked = 0
    for name, lora_a in per_expert.items():
        found = pattern.match(name.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight"))
        if found is None or not name.endswith("lora_A.weight"):
            continue
        expert, proj, experts = int(found["e"]), found["proj"], found["experts"]
        lora_b = per_expert[name.replace("lora_A", "lora_B")]
        fused = "down_proj" if proj == "down_proj" else "gate_up_proj"
        rows = slice(None) if proj == "down_proj" else source[f"{experts}.{fused}"][expert].chunk(2)[0].shape[0]
        part = (slice(None) if proj == "down_proj" else slice(0, rows) if proj == "gate_proj" else slice(rows, None))
        expected = source[f"{experts}.{fused}"][expert][part] + SCALE * lora_b @ lora_a
        torch.testing.assert_close(merged[f"{experts}.{fused}"][expert][part], expected, rtol=0, atol=2e-6)
        checked += 1
    assert checked == 3 * 4 * 2  # 3 projections x 4 experts x 2 layers


# Megatron-Bridge emits the vision attn.qkv lora_B in Megatron's per-head [q_h; k_h; v_h] row
# order (its merged export adds that delta to the de-interleaved base); ours follow the base's
# [Q; K; V] (the logits tests above are the judge).
MB_VISION_QKV = re.compile(r"\.visual\.blocks\.\d+\.attn\.qkv\.(lora_B\.)?weight$")


def test_comparison_with_megatron_bridge_exports(built):
    """Merged weights and adapters (per-expert layout: Megatron-Bridge's) against Megatron-Bridge."""
    ours_merged = dict(export_hf_weights(built.chunks, peft=False))
    theirs_merged = dict(built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=False))
    assert sorted(ours_merged) == sorted(theirs_merged)
    ours = {n.removeprefix(PEFT_PREFIX): t for n, t in
            export_hf_weights(built.chunks, adapters_only=True, expert_adapter_layout="per_expert")}
    # Megatron-Bridge keys adapters by checkpoint names; PEFT (and ours) by the in-memory ones.
    table = table_for(AutoConfig.from_pretrained(str(built.hf_dir)))
    theirs = {table.in_memory_name(n): t for n, t in
              built.bridge.export_adapter_weights(built.chunks, cpu=True, show_progress=False)}
    assert sorted(ours) == sorted(theirs)
    expected = sorted(n for n in [*ours, *ours_merged] if MB_VISION_QKV.search(n))
    assert sorted([n for n in ours_merged if not torch.equal(ours_merged[n], theirs_merged[n])]
                  + [n for n in ours if not torch.equal(ours[n], theirs[n])]) == expected
    base = dict(export_hf_weights(built.chunks)) if expected else {}
    head_dim = table.dims(AutoConfig.from_pretrained(str(built.hf_dir)))["vision_head_dim"] if expected else 0
    for name in (n for n in expected if "lora_B" in n):  # (names alike in checkpoint and memory here)
        per_head = SplitGroupedRows(head_dim, head_dim, head_dim).reverse(list(ours[name].chunk(3)), None)[0]
        assert torch.equal(theirs[name], per_head)
        weight = name.replace("lora_B.weight", "weight")
        their_delta = theirs_merged[weight] - base[weight]
        torch.testing.assert_close(their_delta, SCALE * theirs[name] @ ours[name.replace("lora_B", "lora_A")],
                                   rtol=0, atol=1e-6)


# One 2-process gloo run per layout over the types of that layout, every export mode and
# destination. MoE types: attention and vision towers at TP=2, experts at EP=2 (expert-TP 1), the
# layout MoE models train with. Dense VL types: TP=2 (Qwen3-VL's vision tower sharded by
# Megatron, Qwen2.5-VL's Hugging Face vision module replicated on both ranks). Each run also
# saves torch_dist checkpoints for ``convert``; the MoE run also Megatron-Bridge's exports and the
# Megatron forward of the types compared with Megatron-Bridge at EP=2 (MB_EXPERT_PARALLEL_TYPES).
MB_EXPERT_PARALLEL_TYPES = ("qwen3_moe", "qwen2_moe")
PARALLEL_LAYOUTS = {
    "tp2_ep2": ["--tp", "2", "--ep", "2", "--etp", "1", "--checkpoints",
                "--megatron-bridge", *MB_EXPERT_PARALLEL_TYPES, "--forward", *MB_EXPERT_PARALLEL_TYPES],
    "tp2": ["--tp", "2", "--checkpoints"],
}


@dataclass(frozen=True)
class ParallelRun:
    out: Path
    hf_dirs: dict[str, Path]

    def ranks(self, model_type: str) -> list[dict]:
        return [torch.load(self.out / f"{model_type}_{rank}.pt") for rank in range(2)]

    def checkpoint(self, model_type: str, variant: str) -> Path:
        return self.out / f"{model_type}_ckpt" / variant


def run_worker(layout: str, tmp_path_factory) -> ParallelRun:
    out = tmp_path_factory.mktemp(layout)
    hf_root = tmp_path_factory.mktemp(f"{layout}_hf")
    hf_dirs = {name: kind.make(hf_root / name) for name, kind in TYPES.items() if kind.layout == layout}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(worker.__file__), str(out), *map(str, hf_dirs.values()), *PARALLEL_LAYOUTS[layout]]
    finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-6000:]
    return ParallelRun(out, hf_dirs)


@pytest.fixture(scope="module")
def parallel_runs() -> dict[str, ParallelRun]:
    return {}  # layout -> its run, made when a test first needs one of its types


@pytest.fixture
def parallel_run(built, parallel_runs, tmp_path_factory) -> ParallelRun:
    """The worker's run of ``built``'s layout, over every type of that layout."""
    layout = TYPES[built.model_type].layout
    if layout not in parallel_runs:
        parallel_runs[layout] = run_worker(layout, tmp_path_factory)
    return parallel_runs[layout]


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(expected), f"{what}: names differ: {sorted(set(got) ^ set(expected))[:6]}"
    differing = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not differing, f"{what}: {len(differing)} tensors differ, e.g. {differing[:4]}"


def test_parallel_exports_are_bit_identical_to_the_single_process(built, parallel_run):
    kind = TYPES[built.model_type]
    ranks = parallel_run.ranks(built.model_type)
    modes = [mode for mode in worker.MODES if kind.moe or mode != "per_expert"]  # per-expert: MoE only
    single_shapes = {name: tuple(p.shape) for name, p in built.chunks[0].named_parameters()}
    sharded = {name for name, shape in ranks[1]["shapes"].items() if shape != single_shapes[name]}
    assert any("language_model." in name or name.startswith("decoder.") for name in sharded)
    if kind.vl:  # Megatron linears in the vision tower (those LoRA reaches) are sharded at TP=2
        vision = [name for name in single_shapes if name.startswith(("vision_model.", "visual."))]
        assert vision and any(name in sharded for name in vision) == kind.vision_lora
    for rank in ranks:
        assert sorted(rank["results"]) == sorted(f"{mode}/{where}" for mode in modes for where in DESTINATIONS)
    for mode in modes:
        expected = dict(export_hf_weights(built.chunks, **worker.MODES[mode]))
        if kind.vl:  # the vision tower is part of the export (its adapters where it has LoRA)
            has_vision = any(re.search(r"(^|\.)visual\.", name) for name in expected)
            assert has_vision == (mode != "adapters" or kind.vision_lora), mode
        for rank, result in enumerate(ranks):
            assert_same(result["results"][f"{mode}/all"], expected, f"{mode}/all rank {rank}")
        assert_same(ranks[0]["results"][f"{mode}/rank0"], expected, f"{mode}/rank0")
        assert ranks[1]["results"][f"{mode}/rank0"] == {} and ranks[1]["received_bytes"][f"{mode}/rank0"] == 0
        owned = [rank["results"][f"{mode}/owner"] for rank in ranks]
        assert not set(owned[0]) & set(owned[1]), f"{mode}/owner: a tensor came out on both ranks"
        assert_same({**owned[0], **owned[1]}, expected, f"{mode}/owner")
    saved = ranks[0]["save"]["tensors"]  # save_hf_pretrained in the parallel job: rank 0 writes
    assert_same(saved, dict(export_hf_weights(built.chunks, expert_adapter_layout="fused")), "saved folders")


@pytest.mark.parametrize("variant", ["lora", "adapter"])
def test_convert_of_the_parallel_checkpoint_equals_the_live_export(built, parallel_run, variant, tmp_path):
    """``bridge-ext convert`` of the full and the adapter-only checkpoint the parallel run saved."""
    from bridge_ext.convert import convert_checkpoint

    hf_dir = parallel_run.hf_dirs[built.model_type]
    result = convert_checkpoint(parallel_run.checkpoint(built.model_type, variant), model_dir=tmp_path / "model",
                                adapter_dir=tmp_path / "adapter", hf_base=hf_dir)
    written = source_tensors(result.model_dir)
    written.update(load_file(str(result.adapter_dir / "adapter_model.safetensors")))
    assert_same(written, dict(export_hf_weights(built.chunks, expert_adapter_layout="fused")), f"converted {variant} checkpoint")
    report = Report()
    peft_model = load_adapter_strict(load_hf_model(result.model_dir), result.adapter_dir, report)
    input_ids, extra = inputs_for(built.model_type)
    compare_logits(hf_logits(peft_model, input_ids, **extra), reference_logits(built, input_ids, extra), report,
                   what=f"converted {variant}", relative_tolerance=1e-4)


@pytest.mark.parametrize("built", MB_EXPERT_PARALLEL_TYPES, indirect=True)
def test_megatron_bridge_merged_export_at_expert_parallelism_2(built, parallel_run, tmp_path):
    """Megatron-Bridge's merged export at TP=2 x EP=2 puts EP rank 0's expert LoRA of the same local
    index on the other rank's experts (megatron_bridge_expert_parallel.py says why); transformers
    with ours gives the Megatron forward's logits at that layout, with theirs it does not."""
    ranks = parallel_run.ranks(built.model_type)
    num_experts = AutoConfig.from_pretrained(str(built.hf_dir)).num_experts
    assert_megatron_bridge_merge_at_expert_parallelism(ranks, num_experts, SCALE)
    assert_ours_alone_gives_the_megatron_forward(ranks[0], built.hf_dir, tmp_path)


# Megatron-Bridge LoRA settings on MoE models ---------------------------------------------------------

KNOBS = {
    # expert rank dim // topk (2 here): the experts' rank and scale go to rank_pattern
    "normalize_moe_lora": LoraSettings(options=(("normalize_moe_lora", True),)),
    # LoRA on the router (its Hugging Face module is mlp.gate)
    "router": LoraSettings(target_modules=("linear_qkv", "router")),
}


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_moe_lora_settings_are_exported_exactly(knob, megatron_cpu, tmp_path):
    import json

    from bridge_ext_testing.build import randomize_lora

    built = build_megatron_model(tiny.tiny_qwen3_moe(tmp_path / "hf"), lora=KNOBS[knob])
    randomize_lora(built.chunks, seed=7, std=0.1)
    save_hf_pretrained(built.chunks, tmp_path / "model", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if knob == "normalize_moe_lora":
        assert config["r"] == 4 and set(config["rank_pattern"].values()) == {2}
        assert sorted(config["rank_pattern"]) == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                                  for p in ("down_proj", "gate_up_proj")]
    else:
        assert "gate" in config["target_modules"] and config["rank_pattern"] == {}
    report = Report()
    peft_model = load_adapter_strict(load_hf_model(tmp_path / "model"), tmp_path / "adapter", report)
    input_ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    reference = megatron_logits(built.chunks, input_ids)
    relative = compare_logits(hf_logits(peft_model, input_ids), reference, report, what=knob, relative_tolerance=1e-5)
    merged = load_hf_model(tmp_path / "model")
    merged.load_state_dict(dict(export_hf_weights(built.chunks, peft=False, expert_layout="fused")), strict=True)
    compare_logits(hf_logits(merged, input_ids), reference, report, what=f"{knob} merged", relative_tolerance=1e-5)
    without = hf_logits(load_hf_model(tmp_path / "model"), input_ids)
    assert (without - reference).abs().max() / reference.abs().max() > 100 * max(relative, 1e-7)


def test_canonical_lora_on_sequential_experts_is_exact_per_expert_and_fused(megatron_cpu, tmp_path):
    """CanonicalLoRA splits each sequential expert's linear_fc1 into gate and up adapters: per
    expert they are two modules' pairs (as Megatron-Bridge exports them); PEFT's fused
    gate_up_proj takes them as one block-diagonal pair of rank 2r, alpha 2*alpha (the same
    scale), in rank_pattern / alpha_pattern: PEFT loads it strictly and gives Megatron's logits."""
    import json

    from bridge_ext_testing.build import randomize_lora

    built = build_megatron_model(tiny.tiny_qwen3_moe(tmp_path / "hf"), lora=LoraSettings(kind="canonical_lora"))
    randomize_lora(built.chunks, seed=9, std=0.1)
    per_expert = dict(expert_layout="per_expert", expert_adapter_layout="per_expert")
    ours = {n.removeprefix(PEFT_PREFIX): t for n, t in export_hf_weights(built.chunks, adapters_only=True, **per_expert)}
    assert "model.layers.1.mlp.experts.3.up_proj.lora_A.weight" in ours
    theirs = dict(built.bridge.export_adapter_weights(built.chunks, cpu=True, show_progress=False))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    input_ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    reference = megatron_logits(built.chunks, input_ids)
    report = Report()
    save_hf_pretrained(built.chunks, tmp_path / "merged", merge=True, expert_layout="per_expert")
    compare_logits(hf_logits(load_hf_model(tmp_path / "merged"), input_ids), reference, report,
                   what="merged CanonicalLoRA experts, per expert", relative_tolerance=1e-5)
    save_hf_pretrained(built.chunks, tmp_path / "model", tmp_path / "adapter")  # fused: PEFT's layout
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    gate_up = [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)]
    assert config["r"] == 4 and {k: v for k, v in config["rank_pattern"].items()} == dict.fromkeys(gate_up, 8)
    assert config["alpha_pattern"] == dict.fromkeys(gate_up, 16)
    peft_model = load_adapter_strict(load_hf_model(tmp_path / "model"), tmp_path / "adapter", report)
    relative = compare_logits(hf_logits(peft_model, input_ids), reference, report,
                              what="HF + fused CanonicalLoRA experts", relative_tolerance=1e-5)
    fused = load_hf_model(tmp_path / "model")
    fused.load_state_dict(dict(export_hf_weights(built.chunks, peft=False, expert_layout="fused")), strict=True)
    compare_logits(hf_logits(fused, input_ids), reference, report, what="merged CanonicalLoRA experts, fused",
                   relative_tolerance=1e-5)
    without = hf_logits(load_hf_model(tmp_path / "model"), input_ids)
    assert (without - reference).abs().max() / reference.abs().max() > 100 * max(relative, 1e-7)
