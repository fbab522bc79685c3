"""``bridge-ext tables generate``: a table resolved on a tiny Megatron model built on the CPU.

The generator's rules come from the library (:mod:`bridge_ext.table_generate`); what the bridge
leaves to run time is read off a tiny model of the architecture, which only this test-support
package can build (its tiny configs: :mod:`bridge_ext_testing.tiny_generated`).
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path

from bridge_ext.errors import TableError
from bridge_ext.table_generate import (
    Resolver,
    bridge_for,
    expert_parameters_of,
    in_memory_prefixes_of,
    render,
    translate,
)


def generate(model_type: str) -> str:
    """The table file's source for ``model_type``, from Megatron-Bridge's bridge of it."""
    import torch
    from megatron.core import parallel_state
    from safetensors.torch import load_file

    from bridge_ext_testing.build import build_megatron_model
    from bridge_ext_testing.distributed import megatron_parallel
    from bridge_ext_testing.tiny_generated import model_class, tiny_generated, tiny_model

    entry = bridge_for(model_type)
    parallel = nullcontext() if parallel_state.model_parallel_is_initialized() else megatron_parallel()
    with tempfile.TemporaryDirectory() as scratch, parallel:
        try:
            hf_dir = tiny_generated(Path(scratch) / "hf", model_type)
            built = build_megatron_model(hf_dir, load_weights=False)
        except Exception as error:  # the model's own code failing: reported, never a table
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise TableError(f"cannot build a tiny {model_type} model on the CPU to resolve the table "
                             f"({type(error).__name__}: {first}); add or fix its entry in "
                             "bridge_ext_testing.tiny_generated.TINY") from error
        model_bridge = built.bridge._model_bridge
        model_bridge.hf_pretrained = built.bridge.hf_pretrained  # as its export sets it: the source's names
        mappings = model_bridge.mapping_registry().mappings
        with torch.device("meta"):
            hf_model = tiny_model(model_type)
        saved = load_file(str(hf_dir / "model.safetensors"))  # the names the rules produce
        translation = translate(mappings, Resolver(built.chunks[0]), expert_parameters_of(hf_model),
                                model_type=model_type, hf_names=list(saved), hf_config=hf_model.config)
        in_memory = in_memory_prefixes_of(_renamed_on_load(hf_dir, saved, model_class(model_type)))
    return render(model_type, entry, translation, in_memory)


def _renamed_on_load(hf_dir: Path, saved: dict, auto_class) -> list[tuple[str, str]]:
    """``(saved name, in-memory name)`` of each tensor transformers loads unchanged, paired by
    value (the tiny model's tensors are random; a value held twice, e.g. zero biases, is skipped)."""
    import torch

    loaded = auto_class.from_pretrained(str(hf_dir)).state_dict()
    pairs = []
    for name, tensor in saved.items():
        same = [other for other, value in loaded.items()
                if value.shape == tensor.shape and value.dtype == tensor.dtype and torch.equal(value, tensor)]
        if len(same) == 1:
            pairs.append((name, same[0]))
    return pairs


def write(model_type: str, out: Path | None = None) -> Path:
    """Generate ``model_type``'s table into ``out`` (default ``bridge_ext/tables/generated/<type>.py``)."""
    import bridge_ext.tables

    target = out or Path(bridge_ext.tables.__file__).parent / "generated" / f"{model_type}.py"
    source = generate(model_type)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source)
    return target
