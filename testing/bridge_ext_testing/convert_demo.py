"""The ``convert`` example: a tiny LoRA checkpoint written by megatron-core, converted and verified.

It makes a tiny random Hugging Face model (one of :data:`bridge_ext_testing.demo.EXAMPLES`), builds the
Megatron-Core model with Megatron-Bridge LoRA (random non-zero A and B), saves it with
megatron-core's own ``dist_checkpointing.save`` as a full and as an adapter-only checkpoint
(the layout Megatron-Bridge training writes), then converts both with
:func:`bridge_ext.convert.convert_checkpoint` - no model built - and checks the folders:
base bit-exact against the Hugging Face original, the adapter from both checkpoints identical and
loaded by PEFT with no missing or unexpected key, and transformers + PEFT (and the merged model)
giving the logits of the Megatron model that was saved.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from bridge_ext_testing.demo import DEFAULT_EXAMPLE, EXAMPLES
from bridge_ext.verify import (
    Report,
    VerificationError,
    compare_logits,
    hf_logits,
    load_adapter_strict,
    load_hf_model,
)

TOLERANCE = 1e-4  # max |logit difference| relative to max |logit|; fp32 round-off is ~1e-6


def _tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob(f"{prefix}*.safetensors")) for k, v in load_file(str(f)).items()}


def run_convert_demo(workdir: Path | None = None, echo: Callable[[str], None] = print,
                     example: str = DEFAULT_EXAMPLE) -> Report:
    """Write, convert and verify the example's checkpoints; returns the report (raises on failure).

    Call from a script with a ``__main__`` guard (megatron-core's saver starts a process).
    """
    from bridge_ext_testing.writer import save_megatron_checkpoint
    from bridge_ext.convert import convert_checkpoint, verify_conversion
    from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
    from bridge_ext_testing.distributed import megatron_parallel
    from bridge_ext_testing.forward import megatron_logits

    report = Report()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(workdir) if workdir is not None else Path(scratch)
        hf_dir, targets = EXAMPLES[example](root / "source-hf")
        echo(f"tiny {example} Hugging Face model: {hf_dir}")
        input_ids = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(0))
        with megatron_parallel():
            built = build_megatron_model(hf_dir, lora=LoraSettings(target_modules=targets))
            randomize_lora(built.chunks)
            full, adapter_only = root / "checkpoints" / "full", root / "checkpoints" / "adapter-only"
            for folder, only in ((full, False), (adapter_only, True)):
                save_megatron_checkpoint(built.chunks, built.provider, folder, lora=built.lora, adapter_only=only)
            echo(f"Megatron-Core checkpoints (dist_checkpointing.save, LoRA on {', '.join(targets)}): "
                 f"{full}, {adapter_only}")
            reference = megatron_logits(built.chunks, input_ids)

        out = root / "converted"
        converted = convert_checkpoint(full, model_dir=out / "model", adapter_dir=out / "adapter", hf_base=hf_dir)
        echo(f"converted {full}: {converted.tensors} tensors, {converted.bytes / 2**20:.1f} MiB "
             f"in {converted.seconds:.1f} s")
        from_adapter_only = convert_checkpoint(adapter_only, adapter_dir=out / "adapter-from-adapter-only",
                                               hf_base=hf_dir)
        merged = convert_checkpoint(adapter_only, model_dir=out / "merged", merge=True, hf_base=hf_dir)
        echo(f"converted {adapter_only}: adapter folder, and merged into the base from {hf_dir}")

        report.lines += verify_conversion(converted).lines
        original, written = _tensors(hf_dir, "model"), _tensors(converted.model_dir, "model")
        differing = sorted(set(original) ^ set(written)) + [n for n in original if n in written
                                                             and not torch.equal(original[n], written[n])]
        if differing:
            raise VerificationError(f"base weights differ from the Hugging Face original: {differing}")
        report.add(f"all {len(written)} base tensors (MTP included) are bit-exact copies of the original's")
        ours, again = (load_file(str(d / "adapter_model.safetensors")) for d in (converted.adapter_dir,
                                                                                 from_adapter_only.adapter_dir))
        if sorted(ours) != sorted(again) or any(not torch.equal(ours[k], again[k]) for k in ours):
            raise VerificationError("the adapter-only checkpoint gives other adapters than the full one")
        report.add(f"the adapter-only checkpoint gives the same {len(ours)} adapter tensors as the full one")
        peft_model = load_adapter_strict(load_hf_model(converted.model_dir), converted.adapter_dir, Report())
        compare_logits(hf_logits(peft_model, input_ids), reference, report,
                       what="transformers + PEFT vs the saved Megatron model's forward", relative_tolerance=TOLERANCE)
        compare_logits(hf_logits(load_hf_model(merged.model_dir), input_ids), reference, report,
                       what="merged model from the adapter-only checkpoint vs the same", relative_tolerance=TOLERANCE)
    for line in report.lines:
        echo(f"  ok  {line}")
    return report
