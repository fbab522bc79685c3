"""A live Megatron model (a module or a list of virtual-pipeline chunks) as a TensorSource.

Names are normalised and global: wrapper prefixes (``module.``) and Megatron-Bridge LoRA's
``to_wrap`` are removed, and local layer and expert numbers become global ones (a pipeline
stage's ``decoder.layers.0`` is the layer whose ``layer_number`` says so; an expert-parallel
rank's ``local_experts.0`` is its MoE layer's ``local_expert_indices[0]``). Adapters
(``<module>.adapter.linear_in/linear_out``) are listed by module.

In one process every tensor is whole and local. In a parallel job (``torch.distributed`` with
more than one rank) each rank holds some tensor-parallel shards of some tensors;
:mod:`bridge_ext.distributed` exchanges the names and shapes once and moves shards to the
ranks the ``destination`` names, and only there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from bridge_ext.distributed import DESTINATIONS, Destination, ShardExchange, is_parallel_job
from bridge_ext.engine import ExportError, Task, TaskConverter, merge_batches
from bridge_ext.source import Adapter

LORA_IN, LORA_OUT = ".adapter.linear_in.weight", ".adapter.linear_out.weight"
DORA_MAGNITUDE = ".adapter.weight_magnitude"
# Megatron-Bridge's grouped-expert adapters (Transformer Engine grouped experts) and the LoRA
# setting that selects each: one LoRA pair per expert packed in one tensor, or gate_up's A and
# down's B shared by the experts. Neither is exported yet.
_GROUPED_EXPERT_ADAPTERS = {
    "GroupedExpertLinearAdapter": "share_expert_adapters=False",
    "SharedOuterGroupedExpertAdapter": "experts_shared_outer_loras=True",
}
# CanonicalLoRA: one adapter per part of a fused module (``linear_qkv.adapter.adapter_q.linear_in``).
_CANONICAL = re.compile(r"^(?P<module>.+)\.adapter\.adapter_(?P<part>[a-z]+)\.linear_(?P<factor>in|out)\.weight$")
# Transformer Engine grouped experts number their parameters: ``linear_fc1.weight3``.
_GROUPED_EXPERT_PARAM = re.compile(r"^(weight|bias)(\d+)$")


def unwrap_chunks(model) -> list[torch.nn.Module]:
    """The model's chunks without DDP / Float16Module wrappers."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    unwrapped = []
    for chunk in chunks:
        while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
            chunk = chunk.module
        unwrapped.append(chunk)
    return unwrapped


def normalise(name: str) -> str:
    """``decoder.layers.0.mlp.linear_fc1.to_wrap.weight`` -> ``...linear_fc1.weight``."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name.replace(".to_wrap.", ".")


@dataclass(frozen=True)
class LocalTensor:
    """A parameter (or persistent buffer) this process holds, under its global normalised name.

    ``tensor`` is the parameter itself (read it with ``.detach()`` when needed: a remembered
    source then follows ``param.data`` being replaced, e.g. by offloading). ``shard`` of
    ``shards``: its place among the tensor-parallel shards (``shards == 1``: the whole tensor).
    ``expert``: split over the expert-parallel groups rather than the dense model-parallel
    ones (Megatron marks such parameters ``allreduce=False``).
    """

    name: str
    tensor: torch.Tensor
    shard: int = 0
    shards: int = 1
    expert: bool = False


def _expert_owner(path: str, modules: dict[str, torch.nn.Module]) -> torch.nn.Module | None:
    """The nearest enclosing MoE layer (it knows its experts' global numbers)."""
    owner = _expert_owner_path(path, modules)
    return None if owner is None else modules[owner]


def _expert_owner_path(path: str, modules: dict[str, torch.nn.Module]) -> str | None:
    """The path of the nearest enclosing MoE layer."""
    while path:
        path = path.rpartition(".")[0]
        if hasattr(modules.get(path), "local_expert_indices"):
            return path
    return None


def global_module_paths(modules: dict[str, torch.nn.Module]) -> dict[str, str]:
    """Each module path (``dict(chunk.named_modules())``) with global layer and expert numbers."""
    paths = {"": ""}
    for path, module in modules.items():
        if not path:
            continue
        parent, _, leaf = path.rpartition(".")
        container = parent.rpartition(".")[2]
        if leaf.isdigit() and container == "layers" and hasattr(module, "layer_number"):
            leaf = str(module.layer_number - 1)
        elif leaf.isdigit() and container == "local_experts":
            leaf = str(_expert_owner(path, modules).local_expert_indices[int(leaf)])
        paths[path] = f"{paths[parent]}.{leaf}" if paths[parent] else leaf
    return paths


def _global_name(owner: str, leaf: str, paths: dict[str, str], modules: dict[str, torch.nn.Module]) -> str:
    grouped = _GROUPED_EXPERT_PARAM.match(leaf)
    moe = _expert_owner(f"{owner}.{leaf}", modules) if grouped else None
    if moe is not None:
        leaf = f"{grouped[1]}{moe.local_expert_indices[int(grouped[2])]}"
    return normalise(f"{paths[owner]}.{leaf}" if paths[owner] else leaf)


def _shard_of(param: torch.Tensor) -> tuple[int, int, bool]:
    """(shard index, shard count, expert) from the attributes Megatron sets on parameters."""
    from megatron.core import parallel_state

    expert = not getattr(param, "allreduce", True)
    if not getattr(param, "tensor_model_parallel", False):
        return 0, 1, expert
    if expert:
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size(), True)
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size(), False


def _state_tensors(modules: dict[str, torch.nn.Module]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(module path, leaf, tensor)`` of every parameter, then every persistent buffer, module by
    module, without another module walk.

    Persistent buffers are model state a checkpoint holds (a router's ``expert_bias``); tables
    map them like parameters, and an unmapped one is refused like an unmapped parameter.
    Non-persistent buffers are runtime state (token counts, rotary caches) and are left out, as
    are copies Megatron keeps of another stage's tensor (tied / MTP embeddings: ``shared``).
    """
    seen: set[int] = set()
    for owner, module in modules.items():
        persistent = ((leaf, buffer) for leaf, buffer in module._buffers.items()
                      if leaf not in module._non_persistent_buffers_set)
        for leaf, tensor in (*module._parameters.items(), *persistent):
            if tensor is None or id(tensor) in seen or getattr(tensor, "shared", False):
                continue
            seen.add(id(tensor))
            yield owner, leaf, tensor


def local_tensors(chunks: list[torch.nn.Module], sharded: bool) -> tuple[list[LocalTensor], dict[str, Adapter]]:
    """This process's parameters and persistent buffers under global names, and its LoRA
    adapters by module.

    ``sharded``: read tensor-parallel placement from Megatron's parallel state (else every
    tensor counts as whole).
    """
    tensors: dict[str, LocalTensor] = {}
    adapters: dict[str, Adapter] = {}
    canonical: dict[str, dict[str, Adapter]] = {}
    for chunk in chunks:
        modules = dict(chunk.named_modules())
        paths = global_module_paths(modules)
        for owner, leaf, param in _state_tensors(modules):
            raw_name = f"{owner}.{leaf}" if owner else leaf
            name = _global_name(owner, leaf, paths, modules)
            if name in tensors:
                raise ExportError(f"two parameters normalise to {name}")
            shard, shards, expert = _shard_of(param) if sharded else (0, 1, False)
            if name.endswith(DORA_MAGNITUDE) and sharded:
                shard, shards = _magnitude_shard(raw_name, modules[owner])
            tensors[name] = LocalTensor(name, param, shard, shards, expert)
            if ".adapter." in raw_name:
                _refuse_grouped_expert_adapter(raw_name, modules)
                _refuse_adapter_after_output_norm(raw_name, modules)
            part = _CANONICAL.match(name) if ".adapter.adapter_" in name else None
            if part is not None:
                if part["factor"] == "in":
                    path = raw_name[: -len(".linear_in.weight")]
                    sub = _adapter(part["module"], modules[path], modules, path)
                    prefix = name[: -len("in.weight")]
                    canonical.setdefault(part["module"], {})[part["part"]] = replace(
                        sub, lora_a=f"{prefix}in.weight", lora_b=f"{prefix}out.weight")
            elif name.endswith(LORA_IN):
                module = name[: -len(LORA_IN)]
                adapter_path = raw_name[: -len(".linear_in.weight")]
                adapters[module] = _adapter(module, modules[adapter_path], modules, adapter_path)
            elif ".adapter." in name and not name.endswith((LORA_OUT, DORA_MAGNITUDE)):
                raise ExportError(
                    f"{raw_name}: only LoRA adapters with one linear_in/linear_out pair per module (LoRA, "
                    "VLMLoRA, DoRA) and CanonicalLoRA's per-part pairs are supported"
                )
    for module, parts in canonical.items():
        first = next(iter(parts.values()))
        adapters[module] = Adapter(module, first.lora_a, first.lora_b, first.alpha, first.rank, first.dropout,
                                   expert=first.expert, parts=tuple(sorted(parts.items())))
    return list(tensors.values()), adapters


class LiveModelSource:
    """The parameters of a live model, at any parallel layout.

    ``destination`` (parallel jobs only, see :mod:`bridge_ext.distributed`): which ranks the
    exported tensors come out on: ``"all"``, ``"owner"`` (each tensor on one rank of the
    stage / expert rank that holds it) or ``"rank0"``.
    """

    def __init__(self, model, destination: Destination = "all"):
        if destination not in DESTINATIONS:
            raise ValueError(f"destination must be one of {DESTINATIONS}, not {destination!r}")
        self.chunks = unwrap_chunks(model)
        parallel = is_parallel_job()
        tensors, adapters = local_tensors(self.chunks, sharded=parallel)
        self._local = [tensor.tensor for tensor in tensors]
        self.exchange = None
        if parallel:
            self.exchange = ShardExchange(tensors, adapters, destination)
        else:
            self._tensors = {tensor.name: tensor.tensor for tensor in tensors}
            self._adapters = adapters

    def layout(self) -> list[tuple[torch.dtype, torch.Size]]:
        """Dtype and shape of each tensor this process holds (``param.data`` may be replaced)."""
        return [(tensor.dtype, tensor.shape) for tensor in self._local]

    def base_names(self) -> list[str]:
        names = self.exchange.names if self.exchange else list(self._tensors)
        return [name for name in names if ".adapter." not in name]

    def adapters(self) -> dict[str, Adapter]:
        return dict(self.exchange.adapters if self.exchange else self._adapters)

    def shards(self, name: str) -> list[torch.Tensor]:
        return self.exchange.shards(name) if self.exchange else [self._tensors[name].detach()]

    def shard_shapes(self, name: str) -> list[tuple[int, ...]]:
        if self.exchange:
            return [tuple(shape) for shape in self.exchange.tensors[name].shapes]
        return [tuple(self._tensors[name].shape)]

    def convert_tasks(self, converter: TaskConverter, tasks: list[Task]) -> Iterator[tuple[str, torch.Tensor]]:
        """Run ``converter`` over ``tasks`` on the ranks that receive them."""
        if self.exchange:
            yield from self.exchange.convert_tasks(converter, tasks)
            return
        for batch in merge_batches(converter, tasks):
            yield from converter.convert_batch(batch)


def _refuse_grouped_expert_adapter(raw_name: str, modules: dict[str, torch.nn.Module]) -> None:
    path = raw_name[: raw_name.index(".adapter.") + len(".adapter")]
    knob = _GROUPED_EXPERT_ADAPTERS.get(type(modules.get(path)).__name__)
    if knob is not None:
        raise ExportError(f"{path.removesuffix('.adapter')}: grouped-expert LoRA of Megatron-Bridge's LoRA({knob}) "
                          f"({type(modules[path]).__name__}) is not supported; train expert LoRA on sequential "
                          "experts (moe_grouped_gemm=False)")


def _refuse_adapter_after_output_norm(raw_name: str, modules: dict[str, torch.nn.Module]) -> None:
    """A linear that normalises its own output (``post_layernorm``: Megatron-Bridge's
    ``TERowParallelLinearLayerNorm`` of Gemma 2 / EXAONE 4) gets its LoRA delta added after that
    norm by Megatron-Bridge's wrapper: ``norm(W x) + s B A x``, which neither a PEFT adapter nor a
    merged weight computes."""
    wrapper = raw_name[: raw_name.index(".adapter.")]
    if hasattr(modules.get(f"{wrapper}.to_wrap"), "post_layernorm"):
        raise ExportError(f"{wrapper}: LoRA on a linear that normalises its own output (post_layernorm) adds its "
                          "delta after the norm, which no Hugging Face module computes (adapter or merged); "
                          "leave this module out of target_modules")


def _magnitude_shard(raw_name: str, adapter: torch.nn.Module) -> tuple[int, int]:
    """A DoRA magnitude's tensor-parallel place: split by rows with a column-parallel base
    (Megatron-Bridge saves it so), whole with a row-parallel one. Megatron-Bridge leaves it
    without Megatron's parallel attributes, so it is read off the adapter."""
    from megatron.core import parallel_state

    size = parallel_state.get_tensor_model_parallel_world_size()
    if getattr(adapter, "input_is_parallel", False):
        if size > 1:  # each rank's norm covers its own columns of W only
            raise ExportError(f"{raw_name}: DoRA on a row-parallel linear at tensor-parallel size {size} scales "
                              "each rank's output by the norm of that rank's columns only, which no Hugging Face "
                              "module computes; train it at tensor-parallel size 1 or leave the module out")
        return 0, 1
    return parallel_state.get_tensor_model_parallel_rank(), size


def _adds_bias_inside(linear: torch.nn.Module | None) -> bool:
    """Whether a Megatron linear adds its bias to its output (rather than returning it for a
    later fused add: ``skip_bias_add`` / Transformer Engine's ``te_return_bias``)."""
    if linear is None or getattr(linear, "bias", None) is None:
        return False
    return not (getattr(linear, "skip_bias_add", False) or getattr(linear, "te_return_bias", False))


def _adapter(module: str, adapter: torch.nn.Module, modules: dict[str, torch.nn.Module], path: str) -> Adapter:
    dropout = getattr(adapter, "dropout", None)
    dora = isinstance(getattr(adapter, "weight_magnitude", None), torch.Tensor)
    wrapper = path.removesuffix(".adapter")
    moe_path = _expert_owner_path(path, modules) if dora else None
    return Adapter(
        module=module,
        lora_a=module + LORA_IN,
        lora_b=module + LORA_OUT,
        alpha=float(adapter.alpha),
        rank=int(adapter.dim),
        dropout=float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0,
        magnitude=module + DORA_MAGNITUDE if dora else None,
        bias_inside=dora and _adds_bias_inside(modules.get(f"{wrapper}.to_wrap")),
        expert=moe_path is not None and wrapper.startswith(f"{moe_path}.experts."),
    )
