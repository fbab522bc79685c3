"""A Megatron-Bridge torch_dist checkpoint written without building a Megatron model.

For architectures whose Megatron model cannot be built here (GLM-5's DSA layers need Transformer
Engine's ``linear()``; megatron-core 0.19.2 has no DeepSeek-V4 modules at all) the disk path
(``bridge-ext convert``) never builds one either, so it can still be proven end to end:

* Megatron names: for every tensor of the tiny Hugging Face folder, the Megatron parameter
  Megatron-Bridge's own mapping registry loads it into (``hf_to_megatron_lookup``); names the
  registry lacks (GLM-5's MTP layers: its provider builds none) come from the table, and the
  hyper-connection scalars' other two members from the registry's secondary mappings;
* Megatron tensors: the table's reverse direction (:func:`bridge_ext.reverse.hf_to_megatron`),
  the vocabulary padded to what the provider's ``make_vocab_size_divisible_by`` gives (random
  rows, which the export must drop);
* stored keys as megatron-core 0.19.2 lays them out (bridge_ext/checkpoint/layout.py): layers on
  a leading axis (``decoder.layers.X``, one chunk per layer), or under their numbers where the
  block is not homogeneous (both models here: ``moe_layer_freq`` is a list), experts on a further
  axis (``mlp.experts.experts.X``), MTP's inner layer under ``transformer_layer``; written by
  megatron-core's own ``dist_checkpointing.save`` with Megatron-Bridge's content metadata;
* run_config.yaml: the provider Megatron-Bridge's ``AutoBridge.to_megatron_provider`` makes from
  the folder, serialised as its ``ConfigContainer.to_yaml`` does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

ITERATION = 10
_LAYER = re.compile(r"^(?P<head>(?:decoder)\.layers\.)(?P<layer>\d+)\.(?P<rest>.+)$")
_MTP = re.compile(r"^(?P<head>mtp\.layers\.\d+\.)mtp_model_layer\.(?P<rest>.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(?:local_experts\.(?P<a>\d+)\.(?P<ra>.+)|(?P<rb>linear_fc\d\.weight)(?P<b>\d+))$")


def megatron_names(registry, table, hf_names, variants: frozenset[str]) -> list[str]:
    """Megatron-Bridge's Megatron name of each Hugging Face tensor; the table's for tensors outside
    the registry (MTP layers where the provider builds none)."""
    names = []
    for hf_name in hf_names:
        theirs = registry.hf_to_megatron_lookup(hf_name)
        mtp = table.extra_weights is not None and table.extra_weights.holds(hf_name)
        if theirs is None or theirs.megatron_param.startswith("mtp.") != mtp:
            # GLM-5: the registry maps no MTP layer, and its decoder patterns take model.layers.{N}
            match, _ = table.match_hf(hf_name, variants)
            names.append(match.rule.megatron_pattern.fill(match.values))
            continue
        name = theirs.megatron_param
        if table.match(name, variants) is None:
            name = _separate_norm_alias(registry, name, hf_name)
        names.append(name)
        if name.endswith(".alpha_pre"):  # its secondary mappings read the same tensor
            names += [name.removesuffix("pre") + part for part in ("post", "res")]
    return list(dict.fromkeys(names))


def _separate_norm_alias(registry, name: str, hf_name: str) -> str:
    """Megatron-Bridge's own separate-norm spelling of a fused norm name (its registry lists both;
    the first one found, ``linear_qkv.layer_norm_weight``, is no parameter of an MLA layer)."""
    for fused, separate in registry._SEPARATE_LAYERNORM_REWRITES:
        alias = name.replace(fused, separate)
        theirs = registry.megatron_to_hf_lookup(alias) if alias != name else None
        if theirs is not None and theirs.hf_param == hf_name:
            return alias
    raise AssertionError(f"{hf_name}: Megatron-Bridge's {name} has no separate-norm alias")


def padded_vocab(vocab: int, provider) -> int:
    step = provider.make_vocab_size_divisible_by * provider.tensor_model_parallel_size
    return -(-vocab // step) * step


def non_homogeneous(provider) -> bool:
    """megatron-core 0.19.2's ``TransformerBlock.sharded_state_dict``: layers keep their numbers
    (no layer axis) when MoE or linear attention come at a frequency or the block is heterogeneous."""
    def every_layer(freq) -> bool:
        return freq is None or (isinstance(freq, int) and freq <= 1)

    return (not every_layer(getattr(provider, "moe_layer_freq", None))
            or not every_layer(getattr(provider, "linear_attention_freq", None))
            or bool(getattr(provider, "heterogeneous_block_specs", False)))


def _sharded(name: str, tensor: torch.Tensor, num_layers: int | None, num_experts: int):
    """The ShardedTensor megatron-core's sharded_state_dict gives ``name`` (TP 1, one replica);
    ``num_layers`` None: layers keep their numbers (:func:`non_homogeneous`)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    offsets, key = [], name
    layer = _LAYER.match(name)
    if layer:
        if num_layers is None:
            key, inner = f"{layer['head']}{layer['layer']}.", layer["rest"]
        else:
            offsets.append((0, int(layer["layer"]), num_layers))
            key, inner = layer["head"], layer["rest"]
    else:
        mtp = _MTP.match(name)
        if not mtp:
            return ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)
        key, inner = mtp["head"] + "transformer_layer.", mtp["rest"]
    expert = _EXPERT.match(inner)
    if expert:
        number, rest = (expert["a"], expert["ra"]) if expert["a"] is not None else (expert["b"], expert["rb"])
        offsets.append((len(offsets), int(number), num_experts))
        inner = "mlp.experts.experts." + rest
    return ShardedTensor.from_rank_offsets(key + inner, tensor.contiguous(), *offsets, replica_id=0,
                                           prepend_axis_num=len(offsets))


def run_config(provider, root: Path, lora=None) -> dict:
    from megatron.training.config.container import ConfigContainerBase

    convert = ConfigContainerBase._convert_value_to_dict
    return {
        "model": convert(provider),
        "peft": convert(lora) if lora is not None else None,
        "checkpoint": {"_target_": "megatron.bridge.training.config.CheckpointConfig", "ckpt_format": "torch_dist",
                       "save": str(root), "load": None, "pretrained_checkpoint": None, "save_optim": False,
                       "save_rng": False},
    }


def write_checkpoint(tensors: dict[str, torch.Tensor], provider, root: Path, *, num_experts: int,
                     lora=None) -> Path:
    """``tensors`` (whole Megatron tensors by name) saved under ``root``; returns the iteration folder.
    ``lora``: Megatron-Bridge's LoRA transform, run_config.yaml's ``peft`` section.

    Call inside :func:`bridge_ext_testing.distributed.megatron_parallel` (one process).
    """
    from megatron.core import dist_checkpointing
    from megatron.training.config.yaml_utils import safe_yaml_representers

    from bridge_ext.checkpoint.layout import RUN_CONFIG_FILE, TRACKER_FILE, iteration_dir_name
    from bridge_ext_testing.writer import SHARDED_SD_METADATA, cpu_stand_ins

    folder = root / iteration_dir_name(ITERATION)
    folder.mkdir(parents=True, exist_ok=True)
    layers = None if non_homogeneous(provider) else provider.num_layers
    model = {name: _sharded(name, tensor, layers, num_experts) for name, tensor in tensors.items()}
    state = {"checkpoint_version": 3.0, "iteration": ITERATION, "model": model}
    with cpu_stand_ins():
        dist_checkpointing.save(state, str(folder), content_metadata=dict(SHARDED_SD_METADATA))
    with safe_yaml_representers():
        (folder / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run_config(provider, root, lora), default_flow_style=False))
    (root / TRACKER_FILE).write_text(str(ITERATION))
    return folder


def megatron_tensors(hf_dir: Path, mtp_layers: int | None = None, seed: int = 0):
    """Megatron-Bridge's provider for ``hf_dir`` (``mtp_layers`` overriding its ``mtp_num_layers``:
    GLM-5's builds none, a run that trains MTP sets it) and the Megatron tensors of the folder."""
    from megatron.bridge import AutoBridge
    from safetensors.torch import load_file

    from bridge_ext.reverse import hf_to_megatron
    from bridge_ext.tables import table_for

    bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
    provider = bridge.to_megatron_provider(load_weights=False)
    if mtp_layers is not None:
        provider.mtp_num_layers = mtp_layers
    config = bridge.hf_pretrained.config
    table = table_for(config)
    variants = frozenset(family.variant("per_expert") for family in table.expert_families)
    hf = load_file(str(hf_dir / "model.safetensors"))
    names = megatron_names(bridge._model_bridge.mapping_registry(), table, sorted(hf), variants)
    tensors = hf_to_megatron(hf, names, table, table.dims(config), variants)
    generator = torch.Generator().manual_seed(seed)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        rows = padded_vocab(tensors[name].shape[0], provider) - tensors[name].shape[0]
        tensors[name] = torch.cat([tensors[name], torch.randn(rows, tensors[name].shape[1], generator=generator)])
    return provider, config, tensors


def synthetic_checkpoint(hf_dir: Path, root: Path, *, mtp_layers: int | None = None, seed: int = 0) -> Path:
    """The base checkpoint of the folder ``hf_dir`` under ``root``; returns ``root``."""
    from bridge_ext_testing.distributed import megatron_parallel

    provider, config, tensors = megatron_tensors(hf_dir, mtp_layers, seed)
    with megatron_parallel(tensor_parallel=1):
        write_checkpoint(tensors, provider, Path(root), num_experts=config.n_routed_experts)
    return Path(root)


LORA_TARGETS = ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj",
                "linear_fc1", "linear_fc2")


def adapter_checkpoint(hf_dir: Path, root: Path, *, rank: int = 4, alpha: int = 8, mtp_layers: int | None = None,
                       seed: int = 1) -> Path:
    """An adapter-only checkpoint as Megatron-Bridge saves PEFT runs (only ``*.adapter.*`` keys, the
    ``peft`` section of Megatron-Bridge's own ``LoRA``): random ``linear_in`` ``[r, in]`` and
    ``linear_out`` ``[out, r]`` on every decoder linear that :data:`LORA_TARGETS` names (MLA's
    projections, dense, shared and routed experts' ``linear_fc1`` / ``linear_fc2``; routed experts
    sequential, one adapter each); MTP layers left without adapters."""
    from megatron.bridge.peft.lora import LoRA

    from bridge_ext_testing.distributed import megatron_parallel

    provider, config, tensors = megatron_tensors(hf_dir, mtp_layers)
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, tensor in tensors.items():
        grouped = re.match(r"^(.+\.mlp\.experts)\.(linear_fc\d)\.weight(\d+)$", name)
        module = f"{grouped[1]}.local_experts.{grouped[3]}.{grouped[2]}" if grouped else name.removesuffix(".weight")
        if not name.startswith("decoder.") or module.rsplit(".", 1)[-1] not in LORA_TARGETS:
            continue
        out_features, in_features = tensor.shape
        adapters[f"{module}.adapter.linear_in.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
        adapters[f"{module}.adapter.linear_out.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    lora = LoRA(target_modules=list(LORA_TARGETS), dim=rank, alpha=alpha)
    with megatron_parallel(tensor_parallel=1):
        write_checkpoint(adapters, provider, Path(root), num_experts=config.n_routed_experts, lora=lora)
    return Path(root)
