"""Megatron-Bridge's Qwen3-ASR on CPU, from the remote-code twin of transformers' tiny folder.

Megatron-Bridge 0.6.2's Qwen3ASRBridge reads the remote-code Qwen3-ASR (published Qwen/Qwen3-ASR-*:
config.json with ``thinker_config``, weights named ``thinker.*``); transformers 5.23 saves and loads
its own spelling (``audio_config`` / ``text_config``; ``model.*``, as Qwen/Qwen3-ASR-*-hf). The tiny
model is transformers' folder; :func:`remote_code_twin` writes the same model as the remote code
spells it, which Megatron-Bridge builds and loads with the workaround of
``architecture_notes.NOTES`` (its vendored config class). Supports the CPU tests; the exporter does
not use it.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_TYPE = "qwen3_asr"
#: the tiny model's head_dim 16 (8 rotary frequencies); the provider reads it from rope_scaling
MROPE_SECTION = [2, 3, 3]
#: the remote-code text config's fields, read from transformers' text config as they are
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
               "tie_word_embeddings", "attention_bias", "initializer_range")
#: the remote-code audio config's fields, read from transformers' encoder config as they are
AUDIO_FIELDS = ("num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "d_model",
                "activation_function", "n_window", "n_window_infer", "output_dim", "downsample_hidden_size",
                "scale_embedding", "initializer_range", "conv_chunksize")


def twin_path(hf_dir: str | Path) -> Path:
    hf_dir = Path(hf_dir)
    return hf_dir.with_name(hf_dir.name + ".remote_code")


def remote_code_config(hf_dir: str | Path):
    """Megatron-Bridge's vendored remote-code ``Qwen3ASRConfig`` of transformers' tiny config."""
    from megatron.bridge.models.qwen3_asr.hf_qwen3_asr.configuration_qwen3_asr import Qwen3ASRConfig

    config = json.loads((Path(hf_dir) / "config.json").read_text())
    text, audio = config["text_config"], config["audio_config"]
    rope = text["rope_parameters"]
    thinker = dict(
        text_config={**{name: text[name] for name in TEXT_FIELDS}, "rope_theta": rope["rope_theta"],
                     # text and audio positions are the same in all three sections (one rotary)
                     "rope_scaling": {"rope_type": "default", "mrope_section": MROPE_SECTION}},
        audio_config={**{name: audio[name] for name in AUDIO_FIELDS},
                      "max_source_positions": audio["max_position_embeddings"]},
        audio_token_id=config["audio_token_id"])
    return Qwen3ASRConfig(thinker_config=thinker, architectures=config["architectures"])


def remote_code_twin(hf_dir: str | Path) -> Path:
    """Write transformers' tiny folder as the remote code spells it, beside it (once)."""
    from safetensors.torch import load_file, save_file

    from bridge_ext.table_generate import bridge_spelling
    from bridge_ext.tables.architecture_notes import HF_NAME_RENAMES

    twin = twin_path(hf_dir)
    if (twin / "model.safetensors").is_file():
        return twin
    remote_code_config(hf_dir).save_pretrained(twin)
    tensors = load_file(str(Path(hf_dir) / "model.safetensors"))
    renames = HF_NAME_RENAMES[MODEL_TYPE]
    save_file({bridge_spelling(name, renames): tensor for name, tensor in tensors.items()},
              str(twin / "model.safetensors"), metadata={"format": "pt"})
    return twin


def bridge_of(hf_dir: str | Path):
    """Megatron-Bridge's AutoBridge of the twin, its config read by Megatron-Bridge's vendored class
    (transformers 5.23's own Qwen3ASRConfig has no thinker_config)."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.qwen3_asr.hf_qwen3_asr.configuration_qwen3_asr import Qwen3ASRConfig

    twin = remote_code_twin(hf_dir)
    bridge = AutoBridge.from_hf_pretrained(str(twin))
    bridge.hf_pretrained.config = Qwen3ASRConfig.from_pretrained(str(twin))
    return bridge
