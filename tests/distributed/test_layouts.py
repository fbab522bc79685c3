"""export_hf_weights at TP, PP (with virtual chunks), EP, expert-TP and a combined layout.

Each layout runs ``worker.py`` under torchrun on gloo (CPU) for tiny Qwen3.5 dense, MoE and
image-text MoE models with MTP and LoRA on every projection kind. Every LoRA factor holds the values of one
global tensor keyed on its global name, so each layout holds the same model as one process;
every mode (base + adapters, merged, adapters only, per-expert) and destination must give
the single-process export's names and bit-identical tensors:

* ``all``: every rank gets the whole export;
* ``rank0``: rank 0 gets it, the other ranks get nothing and receive no bytes;
* ``owner``: each tensor comes out on exactly one rank, and pipeline stages export their own.

At TP=2 and at EP=2 Megatron-Bridge's own exports at the same layout are compared too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bridge_ext_testing.tiny_frontier import tiny_kimi_k25, tiny_minimax_m2, tiny_nemotron_h
from bridge_ext_testing.tiny_dense import tiny_dense
from bridge_ext_testing.tiny_generated import tiny_generated
from bridge_ext_testing.tiny_gpt_families import tiny_deepseek_v3, tiny_glm4_moe, tiny_glm4_moe_lite, tiny_gpt_oss, tiny_mimo
from bridge_ext_testing.tiny_models import tiny_qwen35_dense, tiny_qwen35_moe, tiny_qwen35_vl
from bridge_ext_testing.tiny_qwen_moe_vl import tiny_qwen3_moe
from bridge_ext.engine import PEFT_PREFIX
from megatron_bridge_expert_parallel import (
    assert_megatron_bridge_merge_at_expert_parallelism,
    assert_ours_alone_gives_the_megatron_forward,
    hf_logits_of,
    relative_difference,
)

WORKER = Path(__file__).with_name("worker.py")
MODELS = {
    "dense": tiny_qwen35_dense,
    "moe": tiny_qwen35_moe,
    "vl_moe": lambda directory, mtp_layers: tiny_qwen35_vl(directory, moe=True, mtp_layers=mtp_layers),
    "mimo": tiny_mimo,
    "deepseek": tiny_deepseek_v3,
    "glm": tiny_glm4_moe,
    "glm_lite": tiny_glm4_moe_lite,
    "gpt_oss": lambda directory, mtp_layers: tiny_gpt_oss(directory),  # (no MTP)
    # (none of these three has MTP layers)
    "minimax": lambda directory, mtp_layers: tiny_minimax_m2(directory),
    "kimi25": lambda directory, mtp_layers: tiny_kimi_k25(directory),
    "nemotron": lambda directory, mtp_layers: tiny_nemotron_h(directory),
    # generated (Mamba-2 beside attention and MLP in every layer: the in_proj / conv1d splits at TP 2)
    "falcon_h1": lambda directory, mtp_layers: tiny_generated(directory, "falcon_h1"),
    # the other Megatron-Bridge PEFT types (worker.PEFT_TYPES), each in one parallel layout
    "qwen3_dora": lambda directory, mtp_layers: tiny_dense(directory, "qwen3"),
    "qwen3_moe_canonical_lora": lambda directory, mtp_layers: tiny_qwen3_moe(directory),
    "qwen3_moe_normalize_moe_lora": lambda directory, mtp_layers: tiny_qwen3_moe(directory),
}
PEFT_OF = {"qwen3_dora": "dora", "qwen3_moe_canonical_lora": "canonical_lora",
           "qwen3_moe_normalize_moe_lora": "normalize_moe_lora"}
PEFT_FLAGS = ["--peft", *(f"{model}={peft}" for model, peft in PEFT_OF.items())]
# Compared with Megatron-Bridge's merged export at EP=2 (the tiny Qwen3.5-MoE holds per-expert
# experts; with fused ones, and for gpt-oss, that export stops at EP > 1 on mismatched all_gathers).
MB_EXPERT_PARALLEL = ("moe", "deepseek", "glm")
# MiniMax-M2 at TP 2 is refused before the first tensor: Megatron-Bridge's full-width q/k norm
# weights are TP shards without megatron-core's tensor_model_parallel mark (its checkpoints,
# which store them whole, convert: tests/checkpoint/test_convert_gpt_families.py).
# gpt-oss needs expert-TP 1 at TP 2 (megatron-core: "Bias in Moe is only supported when ETP==1").
# name -> (processes, worker flags, models)
LAYOUTS = {
    "single": (1, PEFT_FLAGS, ("dense", "moe", "vl_moe", "mimo", "deepseek", "glm", "glm_lite", "gpt_oss", "minimax",
                               "kimi25", "nemotron", "falcon_h1", *PEFT_OF)),
    # DoRA (its magnitudes split by rows with their column-parallel weights), CanonicalLoRA
    # (per-part pairs, the experts' gate / up at expert-TP 2) at TP=2; normalize_moe_lora at EP=2
    "tp2": (2, ["--tp", "2", "--megatron-bridge", "dense", "moe", "mimo", "--forward", "moe", *PEFT_FLAGS],
            ("dense", "moe", "vl_moe", "mimo", "deepseek", "glm", "glm_lite", "kimi25", "nemotron", "falcon_h1",
             "qwen3_dora", "qwen3_moe_canonical_lora")),
    "pp2_vpp2": (2, ["--pp", "2", "--vpp", "2"], ("dense", "moe", "vl_moe")),
    "ep2": (2, ["--ep", "2", "--megatron-bridge", *MB_EXPERT_PARALLEL, "--forward", *MB_EXPERT_PARALLEL, *PEFT_FLAGS],
            ("moe", "deepseek", "glm", "glm_lite", "gpt_oss", "minimax", "nemotron", "qwen3_moe_normalize_moe_lora")),
    # 16 KiB steps: the tiny model's larger tensors travel as large ones do (received whole)
    "tp2_pp2_ep2_etp1": (4, ["--tp", "2", "--pp", "2", "--ep", "2", "--etp", "1", "--step-bytes", "16384"], ("moe",)),
}
CASES = [(layout, model) for layout, (_, _, models) in LAYOUTS.items() if layout != "single" for model in models]

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make(root / name, mtp_layers=1) for name, make in MODELS.items()}


@pytest.fixture(scope="module")
def run_layout(hf_dirs, tmp_path_factory):
    """Run a layout once (all its models); ``(layout, model) -> [rank 0 result, rank 1, ...]``."""
    done: dict[str, Path] = {}

    def run(layout: str, model: str) -> list[dict]:
        processes, flags, models = LAYOUTS[layout]
        if layout not in done:
            out = tmp_path_factory.mktemp(layout)
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={processes}", str(WORKER), str(out),
                       *(str(hf_dirs[name]) for name in models), *flags]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
            assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-6000:]
            done[layout] = out
        return [torch.load(done[layout] / f"{model}_{rank}.pt") for rank in range(processes)]

    return run


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(expected), f"{what}: names differ: {sorted(set(got) ^ set(expected))[:6]}"
    differing = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not differing, f"{what}: {len(differing)} tensors differ, e.g. {differing[:4]}"


@pytest.mark.parametrize(("layout", "model"), CASES)
def test_every_destination_matches_the_single_process_export(run_layout, layout, model):
    (reference,) = run_layout("single", model)
    assert_every_destination(reference, run_layout(layout, model), layout, model)


@pytest.mark.parametrize("model", sorted(PEFT_OF))
def test_the_other_peft_types_are_what_they_say(run_layout, model):
    """The PEFT-type models of test_every_destination_matches_the_single_process_export hold what
    makes them that type, and their adapters are split over the ranks of their layout."""
    (reference,) = run_layout("single", model)
    layout = next(name for name, (_, _, models) in LAYOUTS.items() if name != "single" and model in models)
    ranks = run_layout(layout, model)
    adapters = reference["results"]["adapters/all"]
    per_expert = reference["results"].get("per_expert/all", {})
    gate_a = PEFT_PREFIX + "model.layers.0.mlp.experts.0.gate_proj.lora_A.weight"
    marks = {"dora": lambda: any(name.endswith("lora_magnitude_vector") for name in adapters),
             # separate gate and up adapters (no shared lora_A), on the experts too
             "canonical_lora": lambda: not torch.equal(per_expert[gate_a], per_expert[gate_a.replace("gate", "up")]),
             # the experts' rank is dim // topk
             "normalize_moe_lora": lambda: {t.shape[0] for name, t in adapters.items()
                                            if ".experts." in name and name.endswith("lora_A.weight")} == {2}}
    assert marks[PEFT_OF[model]](), f"{model} lacks what makes it {PEFT_OF[model]}"
    local = {name: shape for name, shape in ranks[1]["shapes"].items() if ".adapter." in name}
    assert local != {name: shape for name, shape in reference["shapes"].items() if ".adapter." in name}, (
        f"the adapters are not split over the ranks of {layout}")


def assert_every_destination(reference: dict, ranks: list[dict], layout: str, model: str) -> None:
    for key, expected in reference["results"].items():
        mode, destination = key.split("/")
        expected = reference["results"][f"{mode}/all"]
        got = [rank["results"][key] for rank in ranks]
        received = [rank["received_bytes"][key] for rank in ranks]
        if destination == "all":
            for rank, result in enumerate(got):
                assert_same(result, expected, f"{layout} {model} {key} rank {rank}")
        elif destination == "rank0":
            assert_same(got[0], expected, f"{layout} {model} {key}")
            assert all(not result for result in got[1:]), f"{key}: ranks other than 0 received tensors"
            assert received[1:] == [0] * (len(ranks) - 1), f"{key}: bytes moved to ranks that need none: {received}"
        else:
            union: dict[str, torch.Tensor] = {}
            for result in got:
                assert not set(result) & set(union), f"{key}: a tensor came out on two ranks"
                union.update(result)
            assert_same(union, expected, f"{layout} {model} {key}")
            if "--pp" in LAYOUTS[layout][1] and mode != "adapters":
                assert all(got), f"{key}: some pipeline stage exported nothing: {[len(r) for r in got]}"


# Megatron-Bridge 0.6.2 splits a routed expert's linear_fc1 LoRA B into gate / up as if it were
# not tensor-parallel (peft_bridge.py, _split_fused_fc1_linear_out_weight: tp_size = 1 if is_expert),
# but it gathers the expert-TP shards [gate_r; up_r] like the base weight: at expert-TP 2 its gate_proj
# lora_B is [gate_0; up_0] and its up_proj lora_B [gate_1; up_1], and its merged gate / up weights
# add those products. Everything else must agree bit for bit.
MB_EXPERT_TP_BUG = re.compile(r"\.experts\.\d+\.(gate|up)_proj\.(lora_B\.)?weight$")
LORA_SCALE = 8 / 4  # the worker's LoRA: alpha 8, rank 4
EXPERT_TP = 2  # the tp2 layout's expert-tensor-parallel size (= its TP)


def megatron_bridge_gate_up_rows(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What Megatron-Bridge calls gate and up at expert-TP 2: the halves of [gate_0; up_0; gate_1; up_1]."""
    (gate_0, gate_1), (up_0, up_1) = gate.chunk(EXPERT_TP), up.chunk(EXPERT_TP)
    return torch.cat([gate_0, up_0]), torch.cat([gate_1, up_1])


@pytest.mark.parametrize("model", ("dense", "moe", "mimo"))  # (MB leaves the vision qkv LoRA B interleaved)
def test_tensor_parallel_export_equals_megatron_bridge(run_layout, model):
    rank0 = run_layout("tp2", model)[0]
    theirs = rank0["megatron_bridge"]
    ours_merged = rank0["results"]["merged/all"]
    peft = rank0["results"]["per_expert/all" if model == "moe" else "peft/all"]  # MB: experts per expert
    ours_adapters = {name: tensor for name, tensor in peft.items() if name.startswith(PEFT_PREFIX)}
    for what, ours, mb in (("merged", ours_merged, theirs["merged"]), ("adapters", ours_adapters, theirs["adapters"])):
        assert sorted(ours) == sorted(mb), what
        known = {name for name in ours if MB_EXPERT_TP_BUG.search(name)}
        assert bool(known) == (model == "moe"), what
        assert_same({n: t for n, t in ours.items() if n not in known},
                    {n: t for n, t in mb.items() if n not in known}, what)
    for gate_b in (n for n in ours_adapters if MB_EXPERT_TP_BUG.search(n) and n.endswith("gate_proj.lora_B.weight")):
        up_b, lora_a = gate_b.replace("gate_proj", "up_proj"), gate_b.replace("lora_B", "lora_A")
        their_gate_b, their_up_b = megatron_bridge_gate_up_rows(ours_adapters[gate_b], ours_adapters[up_b])
        assert torch.equal(theirs["adapters"][gate_b], their_gate_b), gate_b
        assert torch.equal(theirs["adapters"][up_b], their_up_b), up_b
        for name, their_b in ((gate_b, their_gate_b), (up_b, their_up_b)):
            weight = name.removeprefix(PEFT_PREFIX).replace(".lora_B", "")
            expected = peft[weight] + LORA_SCALE * their_b @ ours_adapters[lora_a]
            torch.testing.assert_close(theirs["merged"][weight], expected, rtol=0, atol=1e-6)


EXPERT_DOWN = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.down_proj\.weight$")


def expert_tp_block_diagonal(lora_b: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """What Megatron-Bridge 0.6.2's forward adds for a routed expert's linear_fc2 LoRA at expert-TP 2:
    each rank's unsummed partial B_r A_r x_r, all-gathered by linear_out, then summed once more
    over the expert-TP ranks by the token dispatcher (``EXPERT_TP * blockdiag(B_r @ A_r)``)."""
    delta = torch.zeros(lora_b.shape[0], lora_a.shape[1])
    rows, columns = lora_b.shape[0] // EXPERT_TP, lora_a.shape[1] // EXPERT_TP
    for r in range(EXPERT_TP):
        block = lora_b[r * rows:(r + 1) * rows] @ lora_a[:, r * columns:(r + 1) * columns]
        delta[r * rows:(r + 1) * rows, r * columns:(r + 1) * columns] = EXPERT_TP * LORA_SCALE * block
    return delta


def test_tensor_parallel_merged_exports_judged_by_the_megatron_forward(run_layout, hf_dirs, tmp_path):
    """At TP2 / expert-TP 2, transformers with our merged weights computes what the Megatron model
    computes; with Megatron-Bridge's merged weights (gate / up rows mixed up, above) it does not.

    Megatron-Bridge 0.6.2's own forward of a routed expert's linear_fc2 LoRA at expert-TP > 1 is not
    base + scale * B @ A (NVIDIA-NeMo/Megatron-Bridge#5634): its row-parallel linear_in skips the
    all-reduce (megatron-core's explicit_expert_comm), linear_out all-gathers the unsummed partials
    and the token dispatcher sums them once per rank. The comparison is therefore made with that
    LoRA's B zeroed, and the defect itself is pinned: when Megatron-Bridge fixes it, this fails.
    """
    rank0 = run_layout("tp2", "moe")[0]
    forward, config_dir = rank0["megatron_forward"], hf_dirs["moe"]
    ids = forward["input_ids"]
    base = rank0["results"]["per_expert/all"]
    adapters = {n.removeprefix(PEFT_PREFIX): t for n, t in base.items() if n.startswith(PEFT_PREFIX)}
    without_fc2 = forward["without_expert_fc2_lora"]

    def expert_fc2_as(merged: dict, delta) -> dict:
        return {name: base[name] + delta(name.removesuffix(".weight")) if EXPERT_DOWN.match(name) else tensor
                for name, tensor in merged.items()}

    def no_delta(module):
        return 0

    ours = expert_fc2_as(rank0["results"]["merged/all"], no_delta)
    theirs = expert_fc2_as(rank0["megatron_bridge"]["merged"], no_delta)
    ours_difference = relative_difference(hf_logits_of(ours, config_dir, tmp_path / "ours", ids), without_fc2)
    their_difference = relative_difference(hf_logits_of(theirs, config_dir, tmp_path / "theirs", ids), without_fc2)
    assert ours_difference <= 1e-4
    assert their_difference > 100 * max(ours_difference, 1e-6)

    plain = relative_difference(hf_logits_of(rank0["results"]["merged/all"], config_dir, tmp_path / "plain", ids),
                                forward["all_lora"])
    as_megatron = expert_fc2_as(rank0["results"]["merged/all"], lambda module: expert_tp_block_diagonal(
        adapters[f"{module}.lora_B.weight"], adapters[f"{module}.lora_A.weight"]))
    assert relative_difference(hf_logits_of(as_megatron, config_dir, tmp_path / "as_megatron", ids),
                               forward["all_lora"]) <= 1e-4
    assert plain > 1e-2, "Megatron-Bridge's expert linear_fc2 LoRA forward at expert-TP 2 is fixed?"


@pytest.mark.parametrize(("layout", "model"), [("pp2_vpp2", "moe"), ("tp2", "vl_moe")])
def test_save_hf_pretrained_in_a_parallel_job_is_written_once_by_rank0(run_layout, layout, model):
    (reference,) = run_layout("single", model)
    ranks = run_layout(layout, model)
    assert_same(ranks[0]["save"]["tensors"], reference["save"]["tensors"], f"{layout} {model} saved folders")
    assert ranks[0]["save"]["written"] == len(reference["save"]["tensors"])
    assert all(rank["save"]["written"] == 0 for rank in ranks[1:])


# Megatron-Bridge's DeepSeek-V3 / GLM-4.5 MTP mappings have no copies of the embedding and the
# output layer (see tests/conformance/registry.py, MTP_COPIES); Qwen3.5's MTP has none to copy.
MTP_COPIES = re.compile(r"^model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")


@pytest.mark.parametrize("model", MB_EXPERT_PARALLEL)
def test_expert_parallel_merged_export_against_megatron_bridge(run_layout, hf_dirs, model, tmp_path):
    """At EP=2 Megatron-Bridge's merged export puts EP rank 0's expert LoRA of the same local index
    on the other rank's experts (megatron_bridge_expert_parallel.py says why); transformers with
    ours gives the Megatron forward's logits at that layout, with theirs it does not."""
    ranks = run_layout("ep2", model)
    config = json.loads((hf_dirs[model] / "config.json").read_text())
    num_experts = config.get("n_routed_experts") or config["num_experts"]
    only_ours = frozenset(name for name in ranks[0]["results"]["merged/all"] if MTP_COPIES.match(name))
    assert bool(only_ours) == (model != "moe")
    assert_megatron_bridge_merge_at_expert_parallelism(ranks, num_experts, LORA_SCALE, only_ours)
    assert_ours_alone_gives_the_megatron_forward(ranks[0], hf_dirs[model], tmp_path)
