"""Exports of the project's tiny models, written for the vLLM judge (main environment side).

Each case is a tiny Hugging Face model, built in Megatron on CPU through Megatron-Bridge with
LoRA (random non-zero A and B) on the targets of its family. :func:`write_exports` writes
into one folder: the source folder (``source/``), the live streams as safetensors
(``base.safetensors``: ``export_hf_weights(peft=True)`` without its adapter keys,
``adapters.safetensors`` + ``adapter_config.json``: its adapter keys and
``peft_adapter_config``, ``merged.safetensors``: ``peft=False``), the saved adapter folders
(``saved_peft/``: ``save_hf_pretrained``'s default, ``saved_vllm/``: ``adapter_for="vllm"``),
for some cases ``base_fused.safetensors`` (the base stream with fused experts, which
``adapter_for="vllm"`` refuses for their class) and ``manifest.json``, which tells the judge what to build and feed.
Cases with another PEFT type write no ``saved_vllm/`` where ``adapter_for="vllm"`` refuses it
(DoRA: ``vllm_refusal`` in the manifest). :func:`write_fp8_exports` writes the ``quantize="fp8"``
folder and stream of the 128-wide ``FP8_CASES``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from bridge_ext.peft_keys import PEFT_PREFIX

GQA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
MLA_TARGETS = ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj",
               "linear_proj", "linear_fc1", "linear_fc2")
QWEN35_TARGETS = GQA_TARGETS + ("in_proj", "out_proj")
LORA = dict(dim=4, alpha=8)


@dataclass(frozen=True)
class Case:
    """One tiny model: how to make its Hugging Face folder, the LoRA targets, its MTP drafter."""

    make: Callable[[Path], Path]
    targets: tuple[str, ...]
    #: vLLM's MTP drafter class for this architecture (None: no MTP)
    drafter: str | None = None
    #: also write ``base_fused.safetensors`` (the base stream with ``expert_layout="fused"``),
    #: which the table says vLLM does not load for this class (``vllm_expert_layouts``)
    fused_base: bool = False
    #: the Megatron-Bridge PEFT type (``LoraSettings.kind``) and further ``LoRA`` fields
    peft: str = "lora"
    options: tuple[tuple[str, object], ...] = ()
    #: the live stream as a weight sync to vLLM must ask for it (``adapter_for="vllm"``): HY-V3's
    #: default stream keys adapters as PEFT does, by transformers' in-memory names (its table's
    #: ``in_memory_renames``), which vLLM's modules do not carry
    live_for_vllm: bool = False


def _qwen3(d: Path) -> Path:
    from bridge_ext_testing.tiny_dense import tiny_dense

    return tiny_dense(d, "qwen3")


def _qwen3_moe(d: Path) -> Path:
    from bridge_ext_testing.tiny_qwen_moe_vl import tiny_qwen3_moe

    return tiny_qwen3_moe(d)


def _qwen3_5_moe_text(d: Path) -> Path:
    from bridge_ext_testing.tiny_models import tiny_qwen35_moe

    return tiny_qwen35_moe(d, mtp_layers=1)


def _qwen3_5_moe_vl(d: Path) -> Path:
    from bridge_ext_testing.tiny_models import tiny_qwen35_vl

    return tiny_qwen35_vl(d, moe=True, mtp_layers=1)


def _deepseek_v3(d: Path) -> Path:
    from bridge_ext_testing.tiny_gpt_families import tiny_deepseek_v3
    from bridge_ext_testing.tiny_models import update_saved_config

    folder = tiny_deepseek_v3(d, mtp_layers=1)
    # as the published config.json says: vLLM builds the router's e_score_correction_bias only then
    update_saved_config(folder, {"topk_method": "noaux_tc"})
    return folder


def _glm4_moe(d: Path) -> Path:
    from bridge_ext_testing.tiny_gpt_families import tiny_glm4_moe

    return tiny_glm4_moe(d, mtp_layers=1)


def _glm4_moe_lite(d: Path) -> Path:
    from bridge_ext_testing.tiny_gpt_families import tiny_glm4_moe_lite

    return tiny_glm4_moe_lite(d, mtp_layers=1)


def _gpt_oss(d: Path) -> Path:
    from bridge_ext_testing.tiny_gpt_families import tiny_gpt_oss

    return tiny_gpt_oss(d)


def _qwen2_moe(d: Path) -> Path:
    from bridge_ext_testing.tiny_qwen_moe_vl import tiny_qwen2_moe

    return tiny_qwen2_moe(d)


def _qwen3_next(d: Path) -> Path:
    from bridge_ext_testing.tiny_models import tiny_qwen3_next

    return tiny_qwen3_next(d, mtp_layers=1)


def _kimi_k2(d: Path) -> Path:
    from bridge_ext_testing.tiny_gpt_families import tiny_deepseek_v3
    from bridge_ext_testing.tiny_models import update_saved_config

    folder = tiny_deepseek_v3(d, mtp_layers=1, model_type="kimi_k2")
    update_saved_config(folder, {"topk_method": "noaux_tc"})  # as for deepseek_v3
    return folder


# What the published MiMo checkpoints ship beside config.json (their config class is remote code):
# a Qwen2 config with MTP layers. vLLM reads it with trust_remote_code.
MIMO_CONFIG = '''from transformers import Qwen2Config


class MiMoConfig(Qwen2Config):
    model_type = "mimo"

    def __init__(self, *args, num_nextn_predict_layers=0, **kwargs):
        self.num_nextn_predict_layers = num_nextn_predict_layers
        super().__init__(*args, **kwargs)
'''


def _mimo(d: Path) -> Path:
    from bridge_ext_testing.tiny_gpt_families import tiny_mimo
    from bridge_ext_testing.tiny_models import update_saved_config

    folder = tiny_mimo(d, mtp_layers=1)
    (folder / "configuration_mimo.py").write_text(MIMO_CONFIG)
    update_saved_config(folder, {"auto_map": {"AutoConfig": "configuration_mimo.MiMoConfig"}})
    return folder


def _qwen3_vl_moe(d: Path) -> Path:
    """Its experts as the published checkpoints store them (``gate_up_proj [E, H, 2I]``,
    ``down_proj [E, I, H]``), the only layout vLLM 0.34's class reads
    (``is_fused_checkpoint_transposed``); transformers 5.23 saves them ``[E, 2I, H]`` / ``[E, H, I]``."""
    from safetensors.torch import load_file

    from bridge_ext_testing.tiny_qwen_moe_vl import tiny_qwen3_vl

    folder = tiny_qwen3_vl(d, moe=True)
    for path in folder.glob("*.safetensors"):
        tensors = load_file(str(path))
        for name in tensors:
            if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                tensors[name] = tensors[name].transpose(1, 2).contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


def _qwen3_vl(d: Path) -> Path:
    from bridge_ext_testing.tiny_qwen_moe_vl import tiny_qwen3_vl

    return tiny_qwen3_vl(d)


def _qwen2_5_vl(d: Path) -> Path:
    from bridge_ext_testing.tiny_qwen_moe_vl import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(d)


#: Generated types whose config class is remote code: the module of Megatron-Bridge's shipped
#: copy of it and the class. The folder gets that file beside config.json and its auto_map, as
#: the published checkpoints ship it (vLLM 0.34 has no config class of its own for them).
REMOTE_CONFIGS = {"bailing_moe_v2": ("megatron.bridge.models.bailing.configuration_bailing_moe_v2", "BailingMoeV2Config")}


def _generated(model_type: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        import importlib
        import shutil

        from bridge_ext_testing.tiny_generated import tiny_generated
        from bridge_ext_testing.tiny_models import update_saved_config

        folder = tiny_generated(d, model_type)
        if model_type in REMOTE_CONFIGS:
            module, name = REMOTE_CONFIGS[model_type]
            source = Path(importlib.import_module(module).__file__)
            shutil.copy(source, folder / source.name)
            update_saved_config(folder, {"auto_map": {"AutoConfig": f"{source.stem}.{name}"}})
        return folder

    return make


#: linears that normalise their own output (Gemma 2 / 3, EXAONE 4) take LoRA only on these
POST_NORM_TARGETS = ("linear_qkv", "linear_fc1")
#: Qwen3-Omni's vision MLPs are named linear_fc1 / fc2 too: LoRA on the language model's only
LANGUAGE_MODEL_TARGETS = ("linear_qkv", "linear_proj", "*language_model*.linear_fc1", "*language_model*.linear_fc2")
#: the tables generated from Megatron-Bridge (bridge_ext/tables/generated), with their targets
GENERATED = {"mistral": GQA_TARGETS, "gemma": GQA_TARGETS, "gemma2": POST_NORM_TARGETS,
             "gemma3_text": POST_NORM_TARGETS, "nemotron": GQA_TARGETS, "exaone4": POST_NORM_TARGETS,
             "olmoe": GQA_TARGETS, "deepseek_v2": MLA_TARGETS, "exaone_moe": GQA_TARGETS,
             "gemma3": POST_NORM_TARGETS, "mistral3": GQA_TARGETS, "mimo_v2_flash": GQA_TARGETS,
             "ernie4_5_moe": GQA_TARGETS, "hy_v3": GQA_TARGETS, "qwen2_audio": GQA_TARGETS,
             "qwen3_omni_moe": LANGUAGE_MODEL_TARGETS, "qwen2_5_omni": GQA_TARGETS,
             "falcon_h1": (*GQA_TARGETS, "in_proj"), "qwen3_asr": GQA_TARGETS, "glm4v_moe": GQA_TARGETS,
             "gemma4_text": GQA_TARGETS, "minimax_m3_vl": GQA_TARGETS, "bailing_moe_v2": GQA_TARGETS,
             "ernie4_5_vl_moe": GQA_TARGETS,
             # its tower's linears too (none normalises its output)
             "exaone4_5": (*POST_NORM_TARGETS, "*vision_model*.linear_proj", "*vision_model*.linear_fc2")}
LIVE_FOR_VLLM = ("hy_v3",)
#: generated MoE types whose vLLM class is also fed the base stream with fused experts (FUSED_BASE)
FUSED_BASE_GENERATED = ("glm4v_moe",)

def _minimax_m2(d: Path) -> Path:
    from bridge_ext_testing.tiny_frontier import tiny_minimax_m2

    return tiny_minimax_m2(d)


def _kimi_k25(d: Path) -> Path:
    from bridge_ext_testing.tiny_frontier import tiny_kimi_k25

    return tiny_kimi_k25(d)


CASES: dict[str, Case] = {
    "qwen3": Case(_qwen3, GQA_TARGETS),
    "qwen3_moe": Case(_qwen3_moe, GQA_TARGETS),
    "qwen3_5_moe_text": Case(_qwen3_5_moe_text, QWEN35_TARGETS, drafter="Qwen3_5MoeMTP"),
    "qwen3_5_moe_vl": Case(_qwen3_5_moe_vl, QWEN35_TARGETS, drafter="Qwen3_5MoeMTP"),
    "deepseek_v3": Case(_deepseek_v3, MLA_TARGETS, drafter="DeepSeekMTPModel", fused_base=True),
    "glm4_moe": Case(_glm4_moe, GQA_TARGETS, drafter="Glm4MoeMTPModel", fused_base=True),
    "glm4_moe_lite": Case(_glm4_moe_lite, MLA_TARGETS, drafter="Glm4MoeLiteMTPModel", fused_base=True),
    "gpt_oss": Case(_gpt_oss, GQA_TARGETS),
    "qwen2_moe": Case(_qwen2_moe, GQA_TARGETS),
    "qwen3_next": Case(_qwen3_next, QWEN35_TARGETS, drafter="Qwen3NextMTP"),
    "kimi_k2": Case(_kimi_k2, MLA_TARGETS, drafter="DeepSeekMTPModel", fused_base=True),
    "mimo": Case(_mimo, GQA_TARGETS, drafter="MiMoMTPModel"),
    "qwen3_vl_moe": Case(_qwen3_vl_moe, GQA_TARGETS, fused_base=True),
    "qwen3_vl": Case(_qwen3_vl, GQA_TARGETS),
    "qwen2_5_vl": Case(_qwen2_5_vl, GQA_TARGETS),
    # the other Megatron-Bridge PEFT types and MoE LoRA knobs (issue 20), on the same tiny models
    "qwen3_dora": Case(_qwen3, GQA_TARGETS, peft="dora"),
    "qwen3_canonical": Case(_qwen3, (), peft="canonical_lora"),
    "qwen3_moe_canonical": Case(_qwen3_moe, (), peft="canonical_lora"),
    "qwen3_moe_normalize": Case(_qwen3_moe, GQA_TARGETS, options=(("normalize_moe_lora", True),)),
    "qwen3_moe_router": Case(_qwen3_moe, ("linear_qkv", "router")),
    "gpt_oss_normalize": Case(_gpt_oss, GQA_TARGETS, options=(("normalize_moe_lora", True),)),
    "qwen3_5_moe_vl_normalize": Case(_qwen3_5_moe_vl, QWEN35_TARGETS, drafter="Qwen3_5MoeMTP",
                                     options=(("normalize_moe_lora", True),)),
    **{model_type: Case(_generated(model_type), targets, live_for_vllm=model_type in LIVE_FOR_VLLM,
                        fused_base=model_type in FUSED_BASE_GENERATED)
       for model_type, targets in GENERATED.items()},
    # no MTP drafter in vLLM 0.34 for MiniMax-M2 (nor trained MTP weights published)
    "minimax_m2": Case(_minimax_m2, GQA_TARGETS, fused_base=True),
    "kimi_k25": Case(_kimi_k25, MLA_TARGETS, fused_base=True),
}


def _save(pairs, path: Path) -> list[str]:
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in pairs}
    save_file(tensors, str(path))
    return sorted(tensors)


def write_exports(name: str, out: Path) -> dict:
    """Build case ``name`` in Megatron (inside ``megatron_parallel``), write its exports to ``out``."""
    from bridge_ext import export_hf_weights, peft_adapter_config, save_hf_pretrained
    from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora

    from bridge_ext.errors import ExportError

    case = CASES[name]
    hf_dir = case.make(out / "source")
    lora = LoraSettings(target_modules=case.targets, kind=case.peft, options=case.options, **LORA)
    model = build_megatron_model(hf_dir, lora=lora)
    randomize_lora(model.chunks, seed=3, std=0.1)
    streamed = list(export_hf_weights(model.chunks, peft=True, dora_adapters=case.peft == "dora",
                                      adapter_for="vllm" if case.live_for_vllm else None))
    base = _save(((n, t) for n, t in streamed if not n.startswith(PEFT_PREFIX)), out / "base.safetensors")
    adapters = _save(((n, t) for n, t in streamed if n.startswith(PEFT_PREFIX)), out / "adapters.safetensors")
    config = peft_adapter_config(model.chunks).to_dict()
    (out / "adapter_config.json").write_text(json.dumps(_jsonable(config), indent=1))
    merged = _save(export_hf_weights(model.chunks, peft=False), out / "merged.safetensors")
    if case.fused_base:
        fused = export_hf_weights(model.chunks, peft=True, expert_layout="fused")
        _save(((n, t) for n, t in fused if not n.startswith(PEFT_PREFIX)), out / "base_fused.safetensors")
    save_hf_pretrained(model.chunks, adapter_dir=out / "saved_peft")
    saved = {"peft": str(out / "saved_peft"), "vllm": str(out / "saved_vllm")}
    refusal = None  # the export's refusal of a folder for vLLM (then judged: vLLM refuses the PEFT one)
    try:
        save_hf_pretrained(model.chunks, adapter_dir=out / "saved_vllm", adapter_for="vllm")
    except ExportError as error:
        refusal = str(error)
        del saved["vllm"]
    manifest = {
        "case": name,
        "source": str(hf_dir),
        "architectures": json.loads((hf_dir / "config.json").read_text()).get("architectures"),
        "drafter": case.drafter,
        "fused_base": case.fused_base,
        "scaling": LORA["alpha"] / LORA["dim"],
        "streams": {"base": base, "merged": merged, "adapters": adapters},
        "saved": saved,
        "vllm_refusal": refusal,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


# Block-FP8 exports (quantize="fp8"). vLLM checks at build time that every FP8 GEMM fills
# whole 128x128 blocks (validate_fp8_block_shape), so these tiny models are 128 wide.
FP8_WIDTHS = dict(vocab_size=120, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=256)


def _fp8_qwen3(d: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**FP8_WIDTHS)).float().save_pretrained(d)
    return d


def _fp8_qwen3_moe(d: Path) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(**FP8_WIDTHS, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                            norm_topk_prob=True)
    Qwen3MoeForCausalLM(config).float().save_pretrained(d)
    return d


def _fp8_deepseek_v3(d: Path) -> Path:
    """MLA 128 wide: q_lora_rank 128 (vLLM's fused q_a_proj + kv_a_proj_with_mqa may end in a
    partial block only in its last part: kv_lora_rank 128 + rope 32), 1 dense + 1 MoE layer."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from bridge_ext_testing.tiny_models import update_saved_config

    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=120, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=True,
        kv_lora_rank=128, q_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, num_nextn_predict_layers=0)
    DeepseekV3ForCausalLM(config).float().save_pretrained(d)
    update_saved_config(d, {"topk_method": "noaux_tc"})  # as in _deepseek_v3
    return d


def _fp8_qwen3_5_moe(d: Path) -> Path:
    """Gated DeltaNet and gated attention 128 wide (vLLM's merged in_proj_qkvz and qkv_proj parts
    each whole blocks), fused experts on disk as transformers saves them, no MTP."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(0)
    config = Qwen3_5MoeTextConfig(
        vocab_size=120, hidden_size=128, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=128, linear_conv_kernel_dim=4,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=1, linear_num_value_heads=2,
        moe_intermediate_size=128, shared_expert_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=False)
    Qwen3_5MoeForCausalLM(config).float().save_pretrained(d)
    return d


FP8_CASES: dict[str, Callable[[Path], Path]] = {"qwen3_fp8": _fp8_qwen3, "qwen3_moe_fp8": _fp8_qwen3_moe,
                                                "deepseek_v3_fp8": _fp8_deepseek_v3,
                                                "qwen3_5_moe_fp8": _fp8_qwen3_5_moe}


def write_fp8_exports(name: str, out: Path) -> dict:
    """The saved FP8 folder (``fp8/``) and the live FP8 stream (``fp8.safetensors``) of case ``name``."""
    from bridge_ext import export_hf_weights, save_hf_pretrained
    from bridge_ext_testing.build import build_megatron_model

    hf_dir = FP8_CASES[name](out / "source")
    model = build_megatron_model(hf_dir)
    save_hf_pretrained(model.chunks, out / "fp8", quantize="fp8")
    stream = _save(export_hf_weights(model.chunks, quantize="fp8"), out / "fp8.safetensors")
    manifest = {"case": name, "fp8": True, "source": str(hf_dir), "folder": str(out / "fp8"),
                "streams": {"fp8": stream}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
