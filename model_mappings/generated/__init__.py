"""Tables generated from Megatron-Bridge's bridges by ``bridge-ext tables generate MODEL_TYPE``.

One module per model type, each with a ``TABLE``; every module of this package is one. A
hand-written table of the same model type wins (``model_mappings.registered_table``).
"""

from __future__ import annotations

import importlib
import pkgutil

from bridge_ext.table import MappingTable

GENERATED: tuple[MappingTable, ...] = tuple(
    importlib.import_module(f"{__name__}.{module.name}").TABLE
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda module: module.name)
)
