"""What the contract's checks share: source files, inputs, reference forwards, loaders, comparisons."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from bridge_ext.peft_keys import PEFT_PREFIX
from bridge_ext.tables import table_for


def source_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder's safetensors files."""
    tensors = {}
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def hf_base_model(folder: Path):
    """The table's transformers class loaded from a folder (MiMo: Qwen2; Kimi-K2: DeepSeek-V3)."""
    import transformers

    from bridge_ext.tables import register_transformers_configs

    register_transformers_configs()
    config = transformers.AutoConfig.from_pretrained(str(folder))
    model_class = getattr(transformers, table_for(config).model_classes[config.model_type])
    return model_class.from_pretrained(str(folder), config=config, dtype=torch.float32).eval()


def input_ids() -> torch.Tensor:
    """The text prompts of the GPT-family entries (two of 24 tokens)."""
    return torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(1))


def text_inputs(vocab: int, length: int, seed: int, low: int = 0):
    """``inputs()`` of an entry: two prompts of ``length`` random tokens, no further model inputs."""
    def make() -> tuple[torch.Tensor, dict]:
        return torch.randint(low, vocab, (2, length), generator=torch.Generator().manual_seed(seed)), {}
    return make


def image_text_inputs() -> tuple[torch.Tensor, dict]:
    """Two prompts with one 16x16 image each."""
    from bridge_ext_testing.tiny_models import tiny_vl_inputs

    inputs = tiny_vl_inputs(batch=2)
    return inputs.pop("input_ids"), inputs


# Reference forwards: the Megatron model's own logits ---------------------------------------------

def megatron_forward(built, input_ids: torch.Tensor, extra: dict) -> torch.Tensor:
    from bridge_ext_testing.forward import megatron_logits

    return megatron_logits(built.chunks, input_ids)


def gpt_family_forward(built, input_ids: torch.Tensor, extra: dict) -> torch.Tensor:
    """The forward on CPU with the sliding-window mask built there (gpt-oss)."""
    from bridge_ext_testing.forward import megatron_logits
    from bridge_ext_testing.gpt_families import cpu_forward_context

    with cpu_forward_context():
        return megatron_logits(built.chunks, input_ids)


def vision_forward(built, input_ids: torch.Tensor, extra: dict) -> torch.Tensor:
    """The image-text forward with the patch mergers' GELU exact.

    Known upstream difference, pinned in tests/cpu/test_qwen35_models.py: Megatron-Bridge's
    patch mergers (final and deepstack) use tanh-approximate GELU where Hugging Face's use the
    exact one (~5e-5 of the largest logit on the tiny models); to compare weights, both sides
    compute the same function.
    """
    from bridge_ext_testing.forward import megatron_logits

    vision = built.chunks[0].vision_model
    mergers = [vision.merger, *getattr(getattr(vision, "decoder", None), "deepstack_merger_list", [])]
    approximate = [merger.activation_func for merger in mergers]
    try:
        for merger in mergers:
            merger.activation_func = torch.nn.functional.gelu
        return megatron_logits(built.chunks, input_ids, **{k: v for k, v in extra.items() if k != "mm_token_type_ids"})
    finally:
        for merger, function in zip(mergers, approximate):
            merger.activation_func = function


@torch.no_grad()
def qwen2_5_vl_forward(built, input_ids: torch.Tensor, extra: dict) -> torch.Tensor:
    """Megatron-Bridge's ``Qwen25VLModel`` forward (it computes the MRoPE positions itself)."""
    from bridge_ext_testing.forward import causal_mask
    from bridge_ext_testing.qwen35 import cpu_current_device
    from bridge_ext_testing.tiny_qwen_moe_vl import VOCAB

    model = built.chunks[0]
    model.eval()
    with cpu_current_device():
        logits = model(input_ids=input_ids, attention_mask=causal_mask(input_ids.shape[1]), runtime_gather_output=True,
                       **extra)
    return logits[..., :VOCAB].float()


# Comparisons ------------------------------------------------------------------------------------

def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """The same names and bit-identical tensors, naming the first differences."""
    assert sorted(got) == sorted(expected), f"{what}: names differ: {sorted(set(got) ^ set(expected))[:6]}"
    differing = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not differing, f"{what}: {len(differing)} tensors differ, e.g. {differing[:4]}"


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits - reference).abs().max() / reference.abs().max()).item()


def without_prefix(pairs) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed as Megatron-Bridge keys them (no PEFT prefix)."""
    return {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in pairs}


def worker():
    """tests/distributed/worker.py, the parallel layouts' torchrun script (global LoRA values too)."""
    import sys

    folder = str(Path(__file__).resolve().parents[1] / "distributed")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import worker as module

    return module
