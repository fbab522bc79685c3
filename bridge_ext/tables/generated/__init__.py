"""Tables generated from Megatron-Bridge's bridges by ``bridge-ext tables generate MODEL_TYPE``.

One module per model type, each with a ``TABLE`` (a ``TableBuilder`` where the config decides rules
or is checked first); every module of this package is one. A
hand-written table of the same model type wins (``bridge_ext.tables.registered_table``).
"""

from __future__ import annotations

import importlib
import pkgutil

from bridge_ext.table import MappingTable, TableBuilder

GENERATED: tuple[MappingTable | TableBuilder, ...] = tuple(
    importlib.import_module(f"{__name__}.{module.name}").TABLE
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda module: module.name)
)
