"""Declarative mapping tables, one per architecture family, found by Hugging Face model_type."""

from bridge_ext.table import MappingTable
from model_mappings import llama, qwen3_5, qwen3_next, qwen_moe, qwen_vl

TABLES: tuple[MappingTable, ...] = (llama.TABLE, qwen3_5.TEXT, qwen3_5.IMAGE_TEXT, qwen3_next.TABLE,
                                   qwen_moe.QWEN3_MOE, qwen_moe.QWEN2_MOE, qwen_vl.QWEN3_VL, qwen_vl.QWEN3_VL_MOE)


def table_for(model_type: str) -> MappingTable:
    """The table for a Hugging Face ``model_type``; a clear error for unknown ones."""
    for table in TABLES:
        if model_type in table.model_types:
            return table
    known = sorted(model for table in TABLES for model in table.model_types)
    raise KeyError(f"no mapping table for model_type {model_type!r}; known: {', '.join(known)}")
