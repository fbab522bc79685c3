"""``bridge-ext architectures``: every architecture Megatron-Bridge or bridge_ext knows, with its status.

Read at run time from Megatron-Bridge's bridge registry and bridge_ext's tables, so a table
added (hand-written or generated) changes its row. Statuses:

* ``hand-written``: a table of ``bridge_ext.tables`` (proven by its conformance module);
* ``generated+proven``: a table generated from Megatron-Bridge and an entry of the generated
  tables' conformance module (``bridge_ext.tables.architecture_notes.PROVEN_GENERATED``), followed
  by the configs it is proven for where its table refuses others (``PROVEN_SCOPE``);
* ``generated, not provable on CPU``: a generated table whose tiny model cannot be built or
  run on the CPU (the reason in ``bridge_ext.tables.architecture_notes.NOT_PROVABLE``);
* ``refused``: no table (the reason in ``bridge_ext.tables.architecture_notes.REFUSED``).

Its output is docs/architectures.md (a test keeps the two equal).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

NO_REASON = "no reason recorded"


@dataclass(frozen=True)
class Architecture:
    hf_class: str
    model_type: str
    status: str
    peft: str
    expert_layouts: str


def _built(table):
    """The MappingTable itself, or a builder's table for its model type's default config (None:
    no default config can be made)."""
    from bridge_ext.table import MappingTable

    if isinstance(table, MappingTable):
        return table
    try:
        from transformers import AutoConfig

        from bridge_ext.tables import register_transformers_configs

        register_transformers_configs()
        return table.build(AutoConfig.for_model(table.model_types[0]))
    except Exception:  # a builder whose default config cannot be made: say so, do not guess
        return None


def _expert_layouts(table) -> str:
    if table is None:
        return "(from the config)"
    layouts = sorted({each.variant.partition(":")[2] for each in table.rules if each.variant})
    if not layouts and any("{expert}" in each.megatron for each in table.rules):
        layouts = ["per_expert"]  # experts without a family: transformers holds them one module each
    return ", ".join(layouts) or "–"


def _peft_types(model_type: str, table) -> str:
    from bridge_ext.tables.architecture_notes import PEFT_TYPES_PROVEN

    if table is not None and table.adapters_refused:
        return "none (adapters refused: merged weights only)"
    return ", ".join(("LoRA", *PEFT_TYPES_PROVEN.get(model_type, ())))


@functools.cache
def architectures() -> tuple[Architecture, ...]:
    """One row per Hugging Face class (Megatron-Bridge's registry and bridge_ext's tables)."""
    import bridge_ext.tables
    from bridge_ext.table_generate import registered_bridges
    from bridge_ext.tables.architecture_notes import (
        NOT_PROVABLE,
        PROVEN_GENERATED,
        PROVEN_SCOPE,
        REFUSED,
        REMOTE_MODEL_TYPES,
        SHIPPED_REMOTE_CODE,
    )

    hand_written = bridge_ext.tables.hand_written_model_types()
    generated = bridge_ext.tables.generated_model_types()
    rows: dict[tuple[str, str], Architecture] = {}

    def status(hf_class: str, model_type: str | None) -> tuple[str, str, str]:
        table = bridge_ext.tables.registered_table(model_type) if model_type else None
        if model_type in hand_written:
            built = _built(table)
            return "hand-written", _peft_types(model_type, built), _expert_layouts(built)
        if model_type in generated:
            built = _built(table)
            if model_type in PROVEN_GENERATED:
                shipped = SHIPPED_REMOTE_CODE.get(model_type)
                note = (f" (remote code: key set, PEFT load and logits from Megatron-Bridge's shipped copy of it, "
                        f"{shipped.rpartition('.')[0]})" if shipped else "")
                scope = f": {PROVEN_SCOPE[model_type]}" if model_type in PROVEN_SCOPE else ""
                return f"generated+proven{note}{scope}", _peft_types(model_type, built), _expert_layouts(built)
            reason = NOT_PROVABLE.get(model_type, NO_REASON)
            return f"generated, not provable on CPU: {reason}", "LoRA (not proven)", _expert_layouts(built)
        return f"refused: {REFUSED.get(hf_class, NO_REASON)}", "–", "–"

    for entry in registered_bridges():
        known = entry.model_type or REMOTE_MODEL_TYPES.get(entry.source)
        rows[(entry.source, known or "–")] = Architecture(entry.source, known or "–", *status(entry.source, known))
    served = {row.model_type for row in rows.values()}
    for model_type in bridge_ext.tables.known_model_types():
        if model_type in served:
            continue
        table = bridge_ext.tables.registered_table(model_type)
        hf_class = getattr(table, "model_classes", {}).get(model_type, "–")
        rows[(hf_class, model_type)] = Architecture(hf_class, model_type, *status(hf_class, model_type))
    order = ("hand-written", "generated+proven", "generated,", "refused")
    return tuple(sorted(rows.values(), key=lambda row: (
        next(i for i, s in enumerate(order) if row.status.startswith(s)), row.model_type, row.hf_class)))


def render() -> str:
    """docs/architectures.md."""
    from bridge_ext.table_generate import megatron_bridge_version
    from bridge_ext.tables.architecture_notes import NOTES

    rows = architectures()
    counts = {name: sum(row.status.startswith(name) for row in rows)
              for name in ("hand-written", "generated+proven", "generated,", "refused")}
    lines = [
        "# Architectures",
        "",
        "Written by `bridge-ext architectures` (a test keeps this file equal to its output): every",
        f"Hugging Face class Megatron-Bridge {megatron_bridge_version()} registers a bridge for, and every model type",
        "bridge_ext has a table for. `generated+proven`: a table generated from Megatron-Bridge's bridge",
        "(`bridge-ext tables generate`, `bridge_ext/tables/generated/`) and proven on a tiny model built in",
        "Megatron on CPU (tests/test_conformance_generated.py). PEFT: the PEFT types its tests prove (LoRA",
        "for every table; DoRA and CanonicalLoRA where a test exports them: README's PEFT types);",
        "expert adapters: the expert-adapter layouts its table offers.",
        "",
        f"{counts['hand-written']} hand-written, {counts['generated+proven']} generated+proven, "
        f"{counts['generated,']} generated but not provable on CPU, {counts['refused']} refused.",
        "",
        "| Hugging Face class | model_type | status | PEFT | expert adapters |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| `{row.hf_class}` | `{row.model_type}` | {row.status} | {row.peft} | {row.expert_layouts} |"
              for row in rows]
    if NOTES:
        lines += ["", "## Notes", "", *(f"- `{model_type}`: {note}" for model_type, note in sorted(NOTES.items()))]
    return "\n".join(lines) + "\n"
