"""Declarative mapping tables, one module per architecture family, found by Hugging Face model_type.

The built-in tables are discovered: every module of this package whose name has no leading
underscore is imported, and the tables it lists in its module-level ``TABLES`` tuple are its
built-ins (modules without ``TABLES``, e.g. :mod:`bridge_ext.tables.blocks`, hold shared parts).
:func:`register_table` adds a table (or a :class:`~bridge_ext.table.TableBuilder`) for a model
of one's own, the way transformers' ``register_checkpoint_conversion_mapping`` does; a
registered table takes precedence over a built-in one for its model types. Tables generated from
Megatron-Bridge (:mod:`bridge_ext.tables.generated`) serve the model types no hand-written table
serves.
"""

from __future__ import annotations

import importlib
import pkgutil

from bridge_ext.errors import ExportError, TableError
from bridge_ext.table import MappingTable, TableBuilder
from bridge_ext.tables.config_fields import STANDARD
from bridge_ext.tables.generated import GENERATED

Table = MappingTable | TableBuilder


def discover(path: list[str], package: str) -> tuple[tuple[Table, ...], dict[str, Table]]:
    """Every ``TABLES`` of the modules of ``package`` (found in ``path``) in module order, and by
    model type; two tables for one model type are an error."""
    tables: list[Table] = []
    found: dict[str, Table] = {}
    owner: dict[str, str] = {}
    for module_info in pkgutil.iter_modules(path, prefix=f"{package}."):
        if module_info.name.rpartition(".")[2].startswith("_"):
            continue
        module = importlib.import_module(module_info.name)
        for table in getattr(module, "TABLES", ()):
            if not isinstance(table, (MappingTable, TableBuilder)):
                raise TableError(f"{module_info.name}.TABLES holds a {type(table).__name__}, "
                                 "not a MappingTable or a TableBuilder")
            tables.append(table)
            for model_type in table.model_types:
                if model_type in found and found[model_type] is not table:
                    raise TableError(f"model type {model_type!r} has built-in tables in both "
                                     f"{owner[model_type]} and {module_info.name}")
                found[model_type], owner[model_type] = table, module_info.name
    return tuple(tables), found


_DISCOVERED, _BY_MODEL_TYPE = discover(__path__, __name__)
_REGISTERED: dict[str, Table] = {}


def built_in_tables() -> tuple[Table, ...]:
    """The discovered tables, in module order."""
    return _DISCOVERED


def hand_written_model_types() -> set[str]:
    return set(_BY_MODEL_TYPE)


def generated_model_types() -> set[str]:
    """Model types served by a generated table (none a hand-written table serves)."""
    return {model for table in GENERATED for model in table.model_types} - hand_written_model_types()


def register_table(table: Table, *, overwrite: bool = False) -> None:
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


def register_transformers_configs(model_type: str | None = None) -> None:
    """Configs of model types transformers does not know but whose checkpoints the tables read
    (MiMo's ``mimo``, Kimi-K2's ``kimi_k2``): registered for ``AutoConfig`` before a config is
    loaded, not at import (importing bridge_ext does not import transformers). Each table
    declares its own (``register_hf_config``), registered tables included. ``model_type``: only
    the tables of that model type (a conversion: some registrations import Megatron-Bridge)."""
    for table in (*built_in_tables(), *GENERATED, *_REGISTERED.values()):
        if table.register_hf_config is not None and (model_type is None or model_type in table.model_types):
            table.register_hf_config()


def companion_file_names() -> set[str]:
    """Every table's ``companion_files`` (names an earlier output folder may hold)."""
    tables = (*built_in_tables(), *GENERATED, *_REGISTERED.values())
    return {name for table in tables for name in getattr(table, "companion_files", ())}


def known_model_types() -> list[str]:
    return sorted({*_BY_MODEL_TYPE, *generated_model_types(), *_REGISTERED})


def registered_table(model_type: str) -> Table | None:
    """What serves ``model_type``: a table, a builder, or None."""
    if model_type in _REGISTERED:
        return _REGISTERED[model_type]
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    return next((table for table in GENERATED if model_type in table.model_types), None)


def table_for(config_or_model_type) -> MappingTable:
    """The table for a Hugging Face config (or ``model_type``: tables that need no config).

    Raises ExportError for an unknown model type, listing the known ones, and for a config
    carrying one of the table's ``refused_config_fields``.
    """
    by_name = isinstance(config_or_model_type, str)
    model_type = config_or_model_type if by_name else config_or_model_type.model_type
    entry = registered_table(model_type)
    if entry is None:
        raise ExportError(
            f"no mapping table for model_type {model_type!r}; known: {', '.join(known_model_types())}. "
            "Write one and add it with bridge_ext.register_table (see docs/adding_an_architecture.md)"
        )
    if by_name:
        if isinstance(entry, MappingTable) and not entry.config_offsets:
            return entry
        raise ExportError(f"the {model_type!r} table is built from the model's config: pass the config")
    # a builder's table, or one whose names read the config (config_offsets)
    config = config_or_model_type
    table = entry.for_config(config) if isinstance(entry, MappingTable) else entry.build(config)
    _refuse_config_fields(table, config)
    return table


def _refuse_config_fields(table: MappingTable, config) -> None:
    for name, why in table.refused_config_fields.items():
        if getattr(config, name, None) is not None:
            raise ExportError(f"model_type {config.model_type!r}: the config has {name}: {why}")


def config_fields_for(table: MappingTable):
    """The config fields compared before an export with ``table`` (its own, else the standard ones)."""
    return table.config_fields if table.config_fields is not None else STANDARD
