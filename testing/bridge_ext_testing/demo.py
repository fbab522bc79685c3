"""The built-in example: a tiny model through Megatron with LoRA, exported and verified.

It makes a tiny random Hugging Face model, builds the Megatron-Core model from it with
Megatron-Bridge (CPU, gloo), wraps it with Megatron-Bridge LoRA (random non-zero A and B),
saves a Hugging Face folder and a PEFT adapter folder with :func:`save_hf_pretrained`, then
checks them as their consumers will read them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from bridge_ext_testing.examples import DEFAULT_EXAMPLE, EXAMPLES
from bridge_ext.hf_files import ADAPTER_FILE, list_safetensors
from bridge_ext.verify import (
    Report,
    VerificationError,
    check_model_folder,
    compare_logits,
    hf_logits,
    load_adapter_strict,
    load_hf_model,
)




def _source_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def run_demo(example: str = DEFAULT_EXAMPLE, workdir: Path | None = None, echo: Callable[[str], None] = print) -> Report:
    """Build, export and verify the example; returns the report (raises on any failure)."""
    from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
    from bridge_ext_testing.distributed import megatron_parallel
    from bridge_ext_testing.forward import megatron_logits
    from bridge_ext.save import save_hf_pretrained

    report = Report()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(workdir) if workdir is not None else Path(scratch)
        hf_dir, targets = EXAMPLES[example](root / "source-hf")
        echo(f"tiny {example} Hugging Face model: {hf_dir}")
        with megatron_parallel():
            built = build_megatron_model(hf_dir, lora=LoraSettings(target_modules=targets))
            randomize_lora(built.chunks)
            echo(f"Megatron-Core model built through Megatron-Bridge, LoRA on {', '.join(targets)}")
            result = save_hf_pretrained(built.chunks, root / "export" / "model", root / "export" / "adapter")
            echo(f"exported {result.tensors} tensors ({result.bytes / 2**20:.1f} MiB) to {root / 'export'}")
            input_ids = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(0))
            reference = megatron_logits(built.chunks, input_ids)
        written = check_model_folder(result.model_dir, report)
        source = _source_tensors(hf_dir)
        exported = {name: t for f in sorted(result.model_dir.glob("*.safetensors")) for name, t in load_file(str(f)).items()}
        differing = [name for name in written if name not in source or not torch.equal(exported[name], source[name])]
        if differing:
            raise VerificationError(f"base weights differ from the source model: {differing}")
        report.add(f"all {len(written)} base tensors are bit-exact copies of the source model's")
        peft_model = load_adapter_strict(load_hf_model(result.model_dir), result.adapter_dir, report)
        compare_logits(hf_logits(peft_model, input_ids), reference, report,
                       what="transformers + PEFT vs the Megatron model's own forward", relative_tolerance=1e-4)
        report.add(f"adapter folder holds {len(list_safetensors(result.adapter_dir, ADAPTER_FILE))} tensors")
    for line in report.lines:
        echo(f"  ok  {line}")
    return report
