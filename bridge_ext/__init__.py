"""bridge_ext: clean Hugging Face weights and PEFT adapters out of Megatron-Core models.

Every error bridge_ext raises on purpose is a :class:`BridgeExtError`; its families are
exported here (``except bridge_ext.BridgeExtError`` catches them all).
"""

from bridge_ext import compat

# An import hook that stays inert unless megatron is imported where Transformer Engine, Triton or
# Python 3.12 is missing (docs/compatibility.md).
compat.install()

__version__ = "0.1.0"

from bridge_ext.errors import (  # noqa: E402
    BridgeExtError,
    CheckpointError,
    CompatibilityError,
    ConvertError,
    ExportError,
    OutputExistsError,
    OutputLocationError,
    OutputWriteError,
    RuleError,
    SafetensorsFolderError,
    TableError,
    VerificationError,
)
from bridge_ext.export import (  # noqa: E402
    Bucket,
    export_hf_buckets,
    export_hf_weights,
    peft_adapter_config,
    quantization_config,
)
from bridge_ext.save import save_hf_pretrained  # noqa: E402
from bridge_ext.table import MappingTable, TableBuilder  # noqa: E402
from bridge_ext.tables import register_table  # noqa: E402

__all__ = [
    "BridgeExtError",
    "Bucket",
    "CheckpointError",
    "CompatibilityError",
    "ConvertError",
    "ExportError",
    "MappingTable",
    "OutputExistsError",
    "OutputLocationError",
    "OutputWriteError",
    "RuleError",
    "SafetensorsFolderError",
    "TableBuilder",
    "TableError",
    "VerificationError",
    "export_hf_buckets",
    "export_hf_weights",
    "peft_adapter_config",
    "quantization_config",
    "register_table",
    "save_hf_pretrained",
]
