"""Megatron-Bridge 0.6.2's merged export at expert parallelism 2, checked on the layout worker's results.

With SequentialMLP experts (``local_experts``), ``bridge.export_hf_weights(merge_adapter_weights=True)``
(model_bridge.py, ``stream_weights_megatron_to_hf``) looks the LoRA of a routed expert's base weight
up by the weight's global name. ``_megatron_local_name_to_global`` renumbers the base weight to its
global expert but leaves adapter names (``.adapter.``) at the local number, so the adapter tasks of
``build_adapter_conversion_tasks`` are keyed by local numbers: EP rank 0 finds its own adapter
(global = local), the other ranks none. The base weight's ``gather_from_ep_ranks`` then returns the
expert of that local index from every EP rank, and ``_merge_lora_adapter_weights`` (peft_bridge.py;
it selects per expert only for grouped experts) adds rank 0's one adapter to all of them:

* EP rank 0: expert ``e`` gets the LoRA of expert ``e mod (E / EP)``, right for its own experts,
  wrong for the other ranks' experts;
* the other EP ranks: no routed expert gets its LoRA.

Everything else equals ours. The functions below take the worker's per-rank results (the index in
the list is the EP rank: layouts of 2 processes at EP=2).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from bridge_ext.engine import PEFT_PREFIX

EXPERT_WEIGHT = re.compile(r"^(?P<experts>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>(gate|up|down)_proj)\.weight$")


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(expected), f"{what}: names differ: {sorted(set(got) ^ set(expected))[:6]}"
    differing = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not differing, f"{what}: {len(differing)} tensors differ, e.g. {differing[:4]}"


def assert_megatron_bridge_merge_at_expert_parallelism(ranks: list[dict], num_experts: int, scale: float,
                                                       only_ours: frozenset[str] = frozenset()) -> None:
    """Each rank's Megatron-Bridge merged export is ours except for the routed experts, which
    hold the LoRA stated in the module docstring. ``only_ours``: names Megatron-Bridge never
    exports (asserted absent)."""
    ours = ranks[0]["results"]["merged/all"]
    split = ranks[0]["results"]["per_expert/all"]  # base experts and their adapters, per expert
    local_experts = num_experts // len(ranks)

    def with_lora_of(name: str, expert: int) -> torch.Tensor:
        found = EXPERT_WEIGHT.match(name)
        module = f"{PEFT_PREFIX}{found['experts']}.{expert}.{found['proj']}"
        return split[name] + scale * split[f"{module}.lora_B.weight"] @ split[f"{module}.lora_A.weight"]

    experts = sorted(name for name in ours if EXPERT_WEIGHT.match(name))
    remote = [name for name in experts if int(EXPERT_WEIGHT.match(name)["e"]) >= local_experts]
    assert len(remote) == len(experts) * (len(ranks) - 1) // len(ranks) > 0
    for rank, result in enumerate(ranks):
        theirs = result["megatron_bridge"]["merged"]
        assert sorted(set(ours) - set(theirs)) == sorted(only_ours) and set(theirs) <= set(ours), rank
        unaffected = set(theirs) - set(remote if rank == 0 else experts)
        _assert_same({n: theirs[n] for n in unaffected}, {n: ours[n] for n in unaffected}, f"rank {rank}")
    theirs = ranks[0]["megatron_bridge"]["merged"]
    for name in remote:
        expert = int(EXPERT_WEIGHT.match(name)["e"])
        torch.testing.assert_close(ours[name], with_lora_of(name, expert), rtol=0, atol=1e-6)
        torch.testing.assert_close(theirs[name], with_lora_of(name, expert % local_experts), rtol=0, atol=1e-6)
        assert not torch.allclose(theirs[name], ours[name], rtol=0, atol=1e-4), name
    for result in ranks[1:]:
        theirs = result["megatron_bridge"]["merged"]
        _assert_same({n: theirs[n] for n in experts}, {n: split[n] for n in experts}, "other ranks' experts: base")


def hf_logits_of(tensors: dict[str, torch.Tensor], config_dir: Path, folder: Path, input_ids: torch.Tensor):
    """transformers' logits with these weights (a folder: the source's config and one file)."""
    from safetensors.torch import save_file

    from bridge_ext.verify import hf_logits, load_hf_model

    folder.mkdir()
    shutil.copy(config_dir / "config.json", folder)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(folder / "model.safetensors"))
    return hf_logits(load_hf_model(folder), input_ids)


def relative_difference(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits - reference).abs().max() / reference.abs().max()).item()


def assert_ours_alone_gives_the_megatron_forward(rank0: dict, config_dir: Path, folder: Path) -> None:
    """transformers with our merged weights computes the Megatron forward at the worker's layout;
    with Megatron-Bridge's (rank 0) it does not."""
    forward = rank0["megatron_forward"]
    ids, reference = forward["input_ids"], forward["all_lora"]
    ours = relative_difference(hf_logits_of(rank0["results"]["merged/all"], config_dir, folder / "ours", ids),
                               reference)
    theirs = relative_difference(hf_logits_of(rank0["megatron_bridge"]["merged"], config_dir, folder / "theirs", ids),
                                 reference)
    assert ours <= 1e-4
    assert theirs > 100 * max(ours, 1e-6), (ours, theirs)
