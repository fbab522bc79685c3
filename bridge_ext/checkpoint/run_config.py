"""Parse Megatron-Bridge's ``run_config.yaml`` (``yaml.safe_load`` only) into plain settings.

Bridge writes ``ConfigContainer.to_yaml`` into each iteration folder: Hydra-style dicts with
``_target_``. The sections used here:

* ``model``: ``_target_: megatron.bridge.models.gpt_provider.GPTModelProvider`` (generic; no HF
  architecture name) with ``hf_model_id``, ``num_layers``, ``hidden_size``, ``ffn_hidden_size``,
  ``num_attention_heads``, ``num_query_groups``, ``kv_channels``, ``vocab_size``,
  ``share_embeddings_and_output_weights``, ``qk_layernorm``, ``num_moe_experts``,
  ``gated_linear_unit``, ``tensor_model_parallel_size``, ... Object references such as
  ``params_dtype: {_call_: false, _target_: torch.float32}`` or ``activation_func`` become their
  target string (``"torch.float32"``) in :attr:`RunConfig.model`.
* ``peft``: null, or ``_target_: megatron.bridge.peft.lora.LoRA`` (or ``DoRA``...) with
  ``target_modules``, ``dim``, ``alpha``, ``dropout``, ``dropout_position``, ``exclude_modules``,
  ``lora_A_init_method``, ``lora_B_init_method``, ``params_to_save`` (a YAML ``!!set``),
  ``share_expert_adapters``...
* ``checkpoint``: ``ckpt_format``, ``pretrained_checkpoint`` (the base for adapter-only runs),
  ``save``, ``load``, ...

Nothing is instantiated and nothing named by ``_target_`` is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from bridge_ext.checkpoint.control_files import RUN_CONFIG_LIMIT, read_control_file
from bridge_ext.checkpoint.errors import RunConfigError
from bridge_ext.checkpoint.yaml_message import yaml_problem

_DTYPES = {
    f"torch.{name}": getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "float", "half", "double")
}


@dataclass(frozen=True)
class PeftSettings:
    """The ``peft`` section: ``kind`` is the class name (``LoRA``, ``DoRA``, ...)."""

    target: str
    kind: str
    target_modules: tuple[str, ...]
    dim: int | None
    alpha: int | float | None
    dropout: float | None
    dropout_position: str | None
    exclude_modules: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float | None:
        """``alpha / dim``, the LoRA scaling Megatron-Bridge applies."""
        if self.alpha is None or not self.dim:
            return None
        return self.alpha / self.dim


@dataclass(frozen=True)
class RunConfig:
    """``run_config.yaml`` as plain data: ``model`` settings, ``peft`` (or None), ``checkpoint``, ``raw``."""

    path: Path
    model_target: str | None
    model: dict[str, Any]
    peft: PeftSettings | None
    checkpoint: dict[str, Any]
    raw: dict[str, Any]

    @property
    def hf_model_id(self) -> str | None:
        """The Hugging Face model the run started from (None unless a non-empty string of sane length)."""
        value = self.model.get("hf_model_id")
        return value if isinstance(value, str) and 0 < len(value) <= 4096 and "\0" not in value else None

    @property
    def params_dtype(self) -> torch.dtype | None:
        """``model.params_dtype`` as a torch dtype (None when absent or not a float dtype)."""
        return _DTYPES.get(str(self.model.get("params_dtype")))

    @property
    def pretrained_checkpoint(self) -> str | None:
        return self.checkpoint.get("pretrained_checkpoint")


def plain(value: Any) -> Any:
    """Collapse Hydra references: ``{_target_: X, _call_: false}`` -> ``"X"``; recurse elsewhere."""
    if isinstance(value, dict):
        if "_target_" in value and value.get("_call_") is False and set(value) <= {"_target_", "_call_"}:
            return str(value["_target_"])
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted(plain(item) for item in value)
    return value


# Bounds on what a YAML file may expand to: aliases let a few kB stand for billions of nodes
# ("billion laughs"). A real run_config.yaml has about 1,000 nodes, nested 4 deep.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 50


def load_run_config(path: str | Path) -> RunConfig:
    """Read ``run_config.yaml`` with the safe loader, bounded in size; needs a ``model`` section."""
    path = Path(path)
    data = read_control_file(path, RUN_CONFIG_LIMIT, lambda message, where: RunConfigError(message, where))
    try:
        raw = _bounded_safe_load(data.decode("utf-8"), path)
    except UnicodeDecodeError as exc:
        raise RunConfigError(f"{path}: not UTF-8 text: {exc}", path) from None
    except yaml.YAMLError as exc:
        raise RunConfigError(f"{path}: not valid YAML (safe loader): {yaml_problem(exc)}", path) from exc
    except RecursionError:
        raise RunConfigError(f"{path}: nested too deeply to be a run configuration", path) from None
    if not isinstance(raw, dict):
        raise RunConfigError(f"{path}: expected a mapping at the top level", path)
    model = raw.get("model")
    if not isinstance(model, dict):
        raise RunConfigError(f"{path}: no 'model' section", path)
    checkpoint = raw.get("checkpoint") or {}
    if not isinstance(checkpoint, dict):
        raise RunConfigError(f"{path}: 'checkpoint' section is not a mapping", path)
    return RunConfig(
        path=path,
        model_target=model.get("_target_"),
        model={key: plain(value) for key, value in model.items() if key != "_target_"},
        peft=_peft(raw.get("peft"), path),
        checkpoint=plain(checkpoint),
        raw=raw,
    )


def _bounded_safe_load(text: str, path: Path) -> Any:
    """``yaml.safe_load``, refusing documents that expand (through aliases) or nest beyond the bounds.

    The node graph is measured before any Python object is built: each node counts once per
    place it appears, so an alias of an alias of ... is counted as what it expands to.
    """
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml: fast, bounded nesting
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, path: Path) -> None:
    expanded: dict[int, int] = {}  # id(node) -> nodes it stands for, itself included
    on_path: set[int] = set()
    pending: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while pending:
        node, depth, done = pending.pop()
        children = _yaml_children(node)
        if done:
            on_path.discard(id(node))
            expanded[id(node)] = min(1 + sum(expanded[id(child)] for child in children), MAX_YAML_NODES + 1)
            if expanded[id(node)] > MAX_YAML_NODES:
                raise RunConfigError(
                    f"{path}: expands to more than {MAX_YAML_NODES} values (aliases repeating aliases); "
                    "refusing to read it", path)
            continue
        if id(node) in expanded:
            continue
        if id(node) in on_path:
            raise RunConfigError(f"{path}: a value contains itself (a recursive alias)", path)
        if depth > MAX_YAML_DEPTH:
            raise RunConfigError(f"{path}: nested more than {MAX_YAML_DEPTH} deep", path)
        on_path.add(id(node))
        pending.append((node, depth, True))
        pending.extend((child, depth + 1, False) for child in children if id(child) not in expanded)


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _peft(section: Any, path: Path) -> PeftSettings | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        raise RunConfigError(f"{path}: 'peft' section is not a mapping", path)
    target = str(section.get("_target_", ""))
    settings = {key: plain(value) for key, value in section.items() if key != "_target_"}
    modules = settings.get("target_modules") or []
    if isinstance(modules, str):
        modules = [modules]
    return PeftSettings(
        target=target,
        kind=target.rsplit(".", 1)[-1] if target else "",
        target_modules=tuple(str(name) for name in modules),
        dim=_number(settings.get("dim"), path, "peft.dim", "an integer of at least 1", cast=int, low=1),
        alpha=_number(settings.get("alpha"), path, "peft.alpha", "a finite number above 0", low=0, open_low=True),
        dropout=_number(settings.get("dropout"), path, "peft.dropout", "a probability from 0 to 1", cast=float,
                        low=0, high=1),
        dropout_position=settings.get("dropout_position"),
        exclude_modules=tuple(str(name) for name in settings.get("exclude_modules") or ()),
        settings=settings,
    )


def _number(value: Any, path: Path, name: str, wanted: str, *, cast: type | None = None, low: float,
            high: float = math.inf, open_low: bool = False) -> Any:
    """A LoRA number in the range PEFT and the conversion accept (PEFT refuses a dropout above 1,
    and a NaN alpha makes every logit NaN), else RunConfigError naming it."""
    if value is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if (not number or (cast is int and not float(value).is_integer()) or value < low or value > high
            or (open_low and value == low)):
        raise RunConfigError(f"{path}: {name} is {value!r}; it must be {wanted}", path)
    return value if cast is None else cast(value)
