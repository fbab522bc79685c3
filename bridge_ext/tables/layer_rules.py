"""Tables whose rules differ on some layers that the config names (``TableBuilder`` builds).

Gemma 4's last ``num_kv_shared_layers`` layers read earlier layers' keys and values: transformers
builds no k_proj / v_proj / k_norm there, Megatron keeps them (unused). :class:`LastLayersRules`
gives such layers their own rules (literal layer numbers, tried before the table's), decided
from the config before export; :class:`CheckedTable` refuses the configs a table is not proven
for, then builds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from bridge_ext.dims import text_config
from bridge_ext.errors import TableError
from bridge_ext.table import MappingTable, Rule


@dataclass(frozen=True)
class LastLayersRules:
    """``rules`` (patterns with ``{layer}``) for each of the last ``count_key`` layers of the config."""

    count_key: str
    rules: tuple[Rule, ...]

    def for_config(self, config) -> tuple[Rule, ...]:
        text = text_config(config)
        total, count = text.num_hidden_layers, getattr(text, self.count_key, None) or 0
        if not 0 <= count <= total:
            raise TableError(f"{self.count_key}={count} with {total} layers")

        def at(pattern: str, layer: int) -> str:
            return pattern.replace("{layer}", str(layer))

        return tuple(replace(each, megatron=at(each.megatron, layer), hf=tuple(at(name, layer) for name in each.hf))
                     for layer in range(total - count, total) for each in self.rules)


@dataclass(frozen=True)
class CheckedTable:
    """A ``TableBuilder``'s ``build``: ``check(config)`` (raises :class:`TableError` for a config
    the table is not proven for), then ``table`` with ``last_layers``' rules first."""

    table: MappingTable
    check: Callable[[object], None]
    last_layers: LastLayersRules | None = None

    def __call__(self, config) -> MappingTable:
        self.check(config)
        if self.last_layers is None:
            return self.table
        return replace(self.table, rules=(*self.last_layers.for_config(config), *self.table.rules))
