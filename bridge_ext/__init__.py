"""bridge_ext: clean Hugging Face weights and PEFT adapters out of Megatron-Core models."""

from bridge_ext import compat

# An import hook that stays inert unless megatron is imported where Transformer Engine, Triton or
# Python 3.12 is missing (docs/compatibility.md).
compat.install()

__version__ = "0.1.0"

from bridge_ext.errors import ExportError  # noqa: E402
from bridge_ext.export import (  # noqa: E402
    Bucket,
    export_hf_buckets,
    export_hf_weights,
    peft_adapter_config,
    quantization_config,
)
from bridge_ext.save import save_hf_pretrained  # noqa: E402
from bridge_ext.table import MappingTable, TableBuilder  # noqa: E402
from model_mappings import register_table  # noqa: E402

__all__ = [
    "Bucket",
    "ExportError",
    "MappingTable",
    "TableBuilder",
    "export_hf_buckets",
    "export_hf_weights",
    "peft_adapter_config",
    "quantization_config",
    "register_table",
    "save_hf_pretrained",
]
