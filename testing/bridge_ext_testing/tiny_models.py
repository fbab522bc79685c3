"""Tiny Hugging Face Qwen3.5 and Qwen3-Next models (fp32) saved to a folder, for the demo and the tests.

Five HF model types are covered:

=====================  ====================================  ==============================
function               HF model type (config.json)           HF class written
=====================  ====================================  ==============================
tiny_qwen35_dense      ``qwen3_5_text``                      ``Qwen3_5ForCausalLM``
tiny_qwen35_moe        ``qwen3_5_moe_text``                  ``Qwen3_5MoeForCausalLM``
tiny_qwen35_vl         ``qwen3_5`` (``moe=False``)           ``Qwen3_5ForConditionalGeneration``
tiny_qwen35_vl         ``qwen3_5_moe`` (``moe=True``)        ``Qwen3_5MoeForConditionalGeneration``
tiny_qwen3_next        ``qwen3_next``                        ``Qwen3NextForCausalLM``
=====================  ====================================  ==============================

Shapes: hidden 64, 4 layers ``[linear, linear, linear, full]``, 4 query heads / 2 KV heads of
dim 16 (gated attention), GDN with 2 key heads and 4 value heads of dim 16, vocab 128; MoE
with 4 experts, top-2, a gated shared expert. Weights are drawn with std 0.02 (the HF
initialiser) and then every norm weight, ``A_log`` and ``dt_bias`` gets a small random offset,
so that a wrong norm mapping (for example a missing ``+-1`` of a zero-centred norm) shows in
the logits. Router weights get a larger std so that top-k choices are far from ties.

MTP: transformers has no MTP module, ignores ``mtp.*`` on load and never writes it (and
transformers 5.12 dropped ``mtp_num_hidden_layers`` from config.json; 5.23 keeps it). These
functions therefore write random MTP tensors themselves, in the layout of the published
Qwen3.5 checkpoints (one ``mtp.fc`` / ``mtp.pre_fc_norm_embedding`` / ``mtp.pre_fc_norm_hidden``
/ ``mtp.norm`` around ``mtp.layers.<i>`` full-attention layers, MoE experts per expert:
``mtp.layers.<i>.mlp.experts.<e>.gate_proj.weight``), add them to the saved safetensors and set
``mtp_num_hidden_layers`` in config.json (under ``text_config`` for the VL types, where
Qwen3.5 checkpoints keep it and where Megatron-Bridge reads it). ``mtp_layers=0`` writes none.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 128
HIDDEN = 64
LAYER_TYPES = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
INIT_STD = 0.02
NORM_NOISE = 0.1
ROUTER_STD = 0.5

# VL token ids (inside the tiny vocabulary).
VISION_START_TOKEN_ID = 120
VISION_END_TOKEN_ID = 121
IMAGE_TOKEN_ID = 122
VIDEO_TOKEN_ID = 123


def _text_kwargs(moe: bool, mtp_layers: int) -> dict:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        # rotary dim = 16 * 0.5 = 8, i.e. 4 frequencies; the MRoPE sections (t, h, w) sum to 4.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if moe:
        kwargs.update(
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
        )
        kwargs.pop("intermediate_size")
    if mtp_layers:
        kwargs["mtp_num_hidden_layers"] = mtp_layers
    return kwargs


def _vision_kwargs() -> dict:
    return dict(
        depth=2,
        hidden_size=32,
        hidden_act="gelu_pytorch_tanh",
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=HIDDEN,
        num_position_embeddings=16,
        initializer_range=INIT_STD,
    )


@torch.no_grad()
def _perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Make norms / GDN gates non-trivial and routers well separated (see module doc)."""
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = name[: -len(leaf) - 1]
        if "norm" in owner.rsplit(".", 1)[-1] and leaf in ("weight", "bias"):
            param.add_(torch.randn(param.shape, generator=generator) * NORM_NOISE)
        elif leaf in ("A_log", "dt_bias"):
            param.add_(torch.randn(param.shape, generator=generator) * NORM_NOISE)
        elif owner.endswith("mlp.gate") and leaf == "weight":
            param.copy_(torch.randn(param.shape, generator=generator) * ROUTER_STD)


def _randn(generator: torch.Generator, *shape: int, std: float = INIT_STD) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std


def _mtp_tensors(text: dict, moe: bool, mtp_layers: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random MTP weights in the published Qwen3.5 layout (per-expert MTP experts)."""
    hidden = text["hidden_size"]
    head_dim = text["head_dim"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]

    def norm(size: int) -> torch.Tensor:
        return _randn(generator, size, std=NORM_NOISE)  # zero-centred norms: weight ~ 0

    tensors = {
        "mtp.fc.weight": _randn(generator, hidden, 2 * hidden),
        "mtp.pre_fc_norm_embedding.weight": norm(hidden),
        "mtp.pre_fc_norm_hidden.weight": norm(hidden),
        "mtp.norm.weight": norm(hidden),
    }
    for i in range(mtp_layers):
        p = f"mtp.layers.{i}."
        tensors.update(
            {
                p + "input_layernorm.weight": norm(hidden),
                p + "post_attention_layernorm.weight": norm(hidden),
                p + "self_attn.q_proj.weight": _randn(generator, 2 * heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": _randn(generator, kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": _randn(generator, kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": _randn(generator, hidden, heads * head_dim),
                p + "self_attn.q_norm.weight": norm(head_dim),
                p + "self_attn.k_norm.weight": norm(head_dim),
            }
        )
        if moe:
            inter, shared = text["moe_intermediate_size"], text["shared_expert_intermediate_size"]
            tensors[p + "mlp.gate.weight"] = _randn(generator, text["num_experts"], hidden, std=ROUTER_STD)
            for e in range(text["num_experts"]):
                tensors[p + f"mlp.experts.{e}.gate_proj.weight"] = _randn(generator, inter, hidden)
                tensors[p + f"mlp.experts.{e}.up_proj.weight"] = _randn(generator, inter, hidden)
                tensors[p + f"mlp.experts.{e}.down_proj.weight"] = _randn(generator, hidden, inter)
            tensors[p + "mlp.shared_expert.gate_proj.weight"] = _randn(generator, shared, hidden)
            tensors[p + "mlp.shared_expert.up_proj.weight"] = _randn(generator, shared, hidden)
            tensors[p + "mlp.shared_expert.down_proj.weight"] = _randn(generator, hidden, shared)
            tensors[p + "mlp.shared_expert_gate.weight"] = _randn(generator, 1, hidden)
        else:
            inter = text["intermediate_size"]
            tensors[p + "mlp.gate_proj.weight"] = _randn(generator, inter, hidden)
            tensors[p + "mlp.up_proj.weight"] = _randn(generator, inter, hidden)
            tensors[p + "mlp.down_proj.weight"] = _randn(generator, hidden, inter)
    return tensors


def add_saved_tensors(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add tensors transformers does not save (MTP) to a ``save_pretrained`` folder: one more
    shard listed in the index when sharded, else into ``model.safetensors``."""
    from safetensors.torch import load_file, save_file

    index_path = out / "model.safetensors.index.json"
    if index_path.exists():
        shard = "model-mtp.safetensors"
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        index = json.loads(index_path.read_text())
        index["weight_map"].update({name: shard for name in tensors})
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    else:
        path = out / "model.safetensors"
        state = load_file(str(path))
        clash = set(state) & set(tensors)
        if clash:
            raise RuntimeError(f"save_pretrained already wrote MTP tensors: {sorted(clash)[:3]}")
        state.update(tensors)
        save_file(state, str(path), metadata={"format": "pt"})


def update_saved_config(out: Path, updates: dict, *, nested: bool = False) -> None:
    """Set ``updates`` in the folder's config.json (in ``text_config`` when ``nested``)."""
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    (config["text_config"] if nested else config).update(updates)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _finish(model, out: Path, text: dict, moe: bool, mtp_layers: int, nested: bool, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if mtp_layers:
        generator = torch.Generator().manual_seed(seed + 1000)
        add_saved_tensors(out, _mtp_tensors(text, moe, mtp_layers, generator))
        update_saved_config(out, {"mtp_num_hidden_layers": mtp_layers}, nested=nested)
    return out


def tiny_qwen35_dense(directory: str | Path, mtp_layers: int = 1, *, seed: int = 0) -> Path:
    """Save a tiny ``qwen3_5_text`` model (``Qwen3_5ForCausalLM``) to ``directory``."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(seed)
    text = _text_kwargs(moe=False, mtp_layers=mtp_layers)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text)).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    return _finish(model, Path(directory), text, False, mtp_layers, nested=False, seed=seed)


def tiny_qwen35_moe(directory: str | Path, mtp_layers: int = 1, *, seed: int = 0) -> Path:
    """Save a tiny ``qwen3_5_moe_text`` model (``Qwen3_5MoeForCausalLM``) to ``directory``."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(seed)
    text = _text_kwargs(moe=True, mtp_layers=mtp_layers)
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**text)).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    return _finish(model, Path(directory), text, True, mtp_layers, nested=False, seed=seed)


def tiny_qwen35_vl(directory: str | Path, moe: bool = False, mtp_layers: int = 1, *, seed: int = 0) -> Path:
    """Save a tiny ``qwen3_5`` (or ``qwen3_5_moe`` with ``moe=True``) vision-language model.

    The vision tower has 2 blocks of width 32 (2 heads), patch 4, temporal patch 2, spatial
    merge 2 and 16 position embeddings; its output width is the text hidden size (64). Use
    :func:`tiny_vl_inputs` for a matching image prompt.
    """
    if moe:
        from transformers import Qwen3_5MoeConfig as Config
        from transformers import Qwen3_5MoeForConditionalGeneration as Model
    else:
        from transformers import Qwen3_5Config as Config
        from transformers import Qwen3_5ForConditionalGeneration as Model

    torch.manual_seed(seed)
    text = _text_kwargs(moe=moe, mtp_layers=mtp_layers)
    config = Config(
        text_config=dict(text),
        vision_config=_vision_kwargs(),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
        tie_word_embeddings=False,
    )
    model = Model(config).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    return _finish(model, Path(directory), text, moe, mtp_layers, nested=True, seed=seed)


def tiny_vl_inputs(batch: int = 1, text_before: int = 5, text_after: int = 6, *, seed: int = 0) -> dict:
    """Inputs for the tiny VL models with one 16x16 image per sample.

    Returns ``input_ids [B, T]``, ``pixel_values [B*16, 96]``, ``image_grid_thw [B, 3]`` (each
    image 1 x 4 x 4 patches, i.e. 4 image tokens after the 2 x 2 spatial merge, framed by vision
    start/end tokens) and ``mm_token_type_ids [B, T]`` (1 at image tokens, as the Qwen3.5
    processor returns it; transformers 5.23 needs it to compute MRoPE positions, Megatron-Bridge's
    ``Qwen3VLModel`` accepts and ignores it).
    """
    generator = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 4, 4]] * batch)
    tokens_per_image = int(grid[0].prod()) // 4
    rows = []
    for _ in range(batch):
        before = torch.randint(3, 118, (text_before,), generator=generator)
        after = torch.randint(3, 118, (text_after,), generator=generator)
        image = torch.tensor([VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * tokens_per_image + [VISION_END_TOKEN_ID])
        rows.append(torch.cat([before, image, after]))
    patch_dim = 3 * 2 * 4 * 4  # in_channels * temporal_patch * patch * patch
    pixel_values = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=generator)
    input_ids = torch.stack(rows)
    return {
        "input_ids": input_ids,
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN_ID).long(),
    }


def tiny_qwen3_next(directory: str | Path, mtp_layers: int = 1, *, seed: int = 0) -> Path:
    """Save a tiny ``qwen3_next`` model (``Qwen3NextForCausalLM``) to ``directory``.

    The Qwen3.5-MoE shapes above (4 layers ``[linear, linear, linear, full]``, GDN 2 key / 4
    value heads, 4 experts + gated shared expert, gated attention); Qwen3-Next fuses the GDN
    projections into ``in_proj_qkvz`` / ``in_proj_ba`` and keeps experts per expert. Plain
    RoPE (no MRoPE), rotary dim ``16 * 0.25 = 4``. MTP tensors as for Qwen3.5 (per-expert MTP
    experts, the published Qwen3-Next layout), ``mtp_num_hidden_layers`` in config.json.
    """
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    text = _text_kwargs(moe=True, mtp_layers=mtp_layers)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    model = Qwen3NextForCausalLM(Qwen3NextConfig(**text)).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    return _finish(model, Path(directory), text, True, mtp_layers, nested=False, seed=seed)
