"""Declarative mapping tables, one per architecture family, found by Hugging Face model_type.

:func:`register_table` adds a table (or a :class:`~bridge_ext.table.TableBuilder`) for a
model of one's own, the way transformers' ``register_checkpoint_conversion_mapping`` does;
a registered table takes precedence over a built-in one for its model types, and a
hand-written built-in one over a table generated from Megatron-Bridge (``model_mappings.generated``).
"""

from __future__ import annotations

from bridge_ext.errors import ExportError, TableError
from bridge_ext.table import MappingTable, TableBuilder
from model_mappings import deepseek, deepseek_v4, glm, glm_dsa, gpt_oss, llama, mimo, qwen3_5, qwen3_next, qwen_moe, qwen_vl
from model_mappings.generated import GENERATED

_BUILT_IN: tuple[MappingTable | TableBuilder, ...] = (
    llama.TABLE, qwen3_5.TEXT, qwen3_5.IMAGE_TEXT, qwen3_next.TABLE,
    qwen_moe.QWEN3_MOE, qwen_moe.QWEN2_MOE, qwen_vl.QWEN3_VL, qwen_vl.QWEN3_VL_MOE, qwen_vl.QWEN2_5_VL,
    mimo.TABLE, deepseek.TABLE, deepseek_v4.TABLE, glm.TABLE, glm.LITE, glm_dsa.TABLE, gpt_oss.TABLE,
)
_REGISTERED: dict[str, MappingTable | TableBuilder] = {}


def hand_written_model_types() -> set[str]:
    return {model for table in _BUILT_IN for model in table.model_types}


def generated_model_types() -> set[str]:
    """Model types served by a generated table (none a hand-written table serves)."""
    return {model for table in GENERATED for model in table.model_types} - hand_written_model_types()


def register_table(table: MappingTable | TableBuilder, *, overwrite: bool = False) -> None:
    """Export models of ``table.model_types`` with ``table``.

    Raises TableError (an ExportError) when a model type already has a table, unless ``overwrite``.
    """
    if not isinstance(table, (MappingTable, TableBuilder)):
        raise TableError(f"register_table takes a MappingTable or a TableBuilder, not {type(table).__name__}")
    taken = [model_type for model_type in table.model_types if registered_table(model_type) is not None]
    if taken and not overwrite:
        raise TableError(f"model types {taken} already have a table; pass overwrite=True to replace it")
    for model_type in table.model_types:
        _REGISTERED[model_type] = table


def register_transformers_configs() -> None:
    """Configs of model types transformers does not know but whose checkpoints the tables read
    (MiMo's ``mimo``, Kimi-K2's ``kimi_k2``): registered for ``AutoConfig`` before a config is
    loaded, not at import (importing bridge_ext does not import transformers). Each table
    declares its own (``register_hf_config``), registered tables included."""
    for table in (*_BUILT_IN, *GENERATED, *_REGISTERED.values()):
        if table.register_hf_config is not None:
            table.register_hf_config()


def known_model_types() -> list[str]:
    return sorted({*hand_written_model_types(), *generated_model_types(), *_REGISTERED})


def registered_table(model_type: str) -> MappingTable | TableBuilder | None:
    """What serves ``model_type``: a table, a builder, or None."""
    if model_type in _REGISTERED:
        return _REGISTERED[model_type]
    return next((table for table in (*_BUILT_IN, *GENERATED) if model_type in table.model_types), None)


def table_for(config_or_model_type) -> MappingTable:
    """The table for a Hugging Face config (or ``model_type``: tables that need no config).

    Raises ExportError for an unknown model type, listing the known ones.
    """
    by_name = isinstance(config_or_model_type, str)
    model_type = config_or_model_type if by_name else config_or_model_type.model_type
    entry = registered_table(model_type)
    if entry is None:
        raise ExportError(
            f"no mapping table for model_type {model_type!r}; known: {', '.join(known_model_types())}. "
            "Write one and add it with bridge_ext.register_table (see docs/adding_an_architecture.md)"
        )
    if isinstance(entry, MappingTable):
        return entry
    if by_name:
        raise ExportError(f"the {model_type!r} table is built from the model's config: pass the config")
    return entry.build(config_or_model_type)


def config_fields_for(table: MappingTable):
    """The config fields compared before an export with ``table`` (its own, else the standard ones)."""
    from model_mappings.config_fields import STANDARD

    return table.config_fields if table.config_fields is not None else STANDARD
