"""How MoE experts are laid out in an export, and the layout a Hugging Face folder's safetensors use.

Shared by the live front end (:mod:`bridge_ext.export`) and the checkpoint one
(:mod:`bridge_ext.convert`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bridge_ext.errors import ExportError
from bridge_ext.hf_files import SINGLE_FILE, has_safetensors, index_weight_map, list_safetensors
from bridge_ext.table import EXPERT_LAYOUTS, ExpertLayout, MappingTable


@dataclass(frozen=True)
class ExpertLayouts:
    """How MoE experts are laid out in an export.

    ``base``: the base weights' layout per expert family of the table (by name; a family not
    listed takes ``default``); e.g. published Qwen3.5-MoE checkpoints fuse the main model's
    experts and not the MTP layers'. ``adapters``: the expert adapters of every family,
    ``fused`` being PEFT's ``target_parameters`` layout.
    """

    base: tuple[tuple[str, ExpertLayout], ...] = ()
    default: ExpertLayout = "fused"
    adapters: ExpertLayout = "fused"

    def base_layout(self, family: str) -> ExpertLayout:
        return dict(self.base).get(family, self.default)

    def base_variants(self, table: MappingTable) -> frozenset[str]:
        return frozenset(family.variant(self.base_layout(family.name)) for family in table.expert_families)

    def adapter_variants(self, table: MappingTable) -> frozenset[str]:
        return frozenset(family.variant(self.adapters) for family in table.expert_families)

    def transformers_layout(self, table: MappingTable) -> ExpertLayout:
        """The layout of the families inside transformers' key set (they must agree)."""
        inside = {self.base_layout(family.name) for family in table.expert_families if not family.extra}
        if len(inside) > 1:
            raise ExportError(f"the {table.model_types} experts inside transformers' key set must share one "
                              f"layout, not {sorted(inside)}")
        return inside.pop() if inside else self.default


def expert_layouts(table: MappingTable, found: dict[str, ExpertLayout], expert_layout: ExpertLayout | None = None,
                   expert_adapter_layout: ExpertLayout = "fused") -> ExpertLayouts:
    """``expert_layout`` for every family, else each family's layout in the source folder
    (``found``, see :func:`source_expert_layouts`), else fused."""
    for what, value in (("expert_layout", expert_layout), ("expert_adapter_layout", expert_adapter_layout)):
        if value is not None and value not in EXPERT_LAYOUTS:
            raise ExportError(f"{what} must be one of {EXPERT_LAYOUTS}, not {value!r}")
    base = tuple((family.name, expert_layout or found.get(family.name, "fused")) for family in table.expert_families)
    return ExpertLayouts(base=base, adapters=expert_adapter_layout)


def possible_variants(table: MappingTable, found: dict[str, ExpertLayout]) -> frozenset[str]:
    """Each family's variant for its ``found`` layout, both variants where it is unknown."""
    return frozenset(family.variant(layout) for family in table.expert_families
                     for layout in ([found[family.name]] if family.name in found else EXPERT_LAYOUTS))


def folder_weight_names(folder: Path) -> list[str]:
    """The tensor names of a Hugging Face folder's safetensors (empty when there are none); an
    index suffices (its weight files may be absent: a download without weights)."""
    weight_map = index_weight_map(folder)
    if weight_map is not None:
        return list(weight_map)
    return list(list_safetensors(folder)) if has_safetensors(folder) else []


def weight_files_present(folder: Path) -> bool:
    """Whether the folder holds every safetensors file it names (a folder may hold only
    ``config.json`` and the index, e.g. downloaded without its weights)."""
    weight_map = index_weight_map(folder)
    if weight_map is not None:
        files = set(weight_map.values())
        return bool(files) and all((folder / name).is_file() for name in files)
    return (folder / SINGLE_FILE).is_file()


def source_expert_layouts(folder: Path | None, table: MappingTable) -> dict[str, ExpertLayout]:
    """The layout of each expert family in a Hugging Face folder's safetensors (empty when unknown)."""
    if folder is None or not table.expert_families:
        return {}
    names = folder_weight_names(folder)
    found = table.expert_layouts_of(names)
    for family in table.expert_families:
        transposed = family.variant("fused_transposed")
        if found.get(family.name) == "fused" and any(rule.variant == transposed for rule in table.rules):
            if _stored_transposed(folder, names, family.parameters):
                found[family.name] = "fused_transposed"
    return found


def _stored_transposed(folder: Path, names: list[str], parameters: tuple[str, ...]) -> bool:
    """Whether fused ``gate_up_proj`` / ``down_proj`` are stored ``[E, in, out]``, told from
    shapes alone: stored ``[E, 2I, H]`` / ``[E, H, I]``, gate_up's last dim equals down's
    middle one (H); stored transposed, gate_up's middle dim equals down's last one."""
    gate_up_name = next((n for n in names if n.endswith(f".experts.{parameters[0]}")), None)
    if gate_up_name is None or len(parameters) < 2:
        return False
    stored = list_safetensors(folder)
    down = stored.get(gate_up_name.removesuffix(parameters[0]) + parameters[1])
    return down is not None and stored[gate_up_name].shape[-2] == down.shape[-1]
