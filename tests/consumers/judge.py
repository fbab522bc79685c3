"""vLLM judges bridge_ext's exports: run in the consumer environment (``.venv-consumers``).

``python judge.py MANIFEST... --out VERDICTS.json``. For each export folder (see
``exports.py``) it uses vLLM's own code on CPU, with a world of one (gloo):

- ``base`` / ``merged``: vLLM's model class for ``config.architectures`` is built, every
  parameter set to NaN (an integer one to -1: DeepSeek-V4's hash-routing table), the stream
  fed to its ``load_weights``; every parameter must be in the
  set it reports loaded and hold no NaN. ``base`` must equal, value for value, what the same
  class loads from the source files; each tensor of the stream that the class ignores (loads
  nothing from when fed alone) is listed.
- ``live`` / ``saved_peft`` / ``saved_vllm``: the adapters through ``WorkerLoRAManager`` on the
  base-loaded model, as RL frameworks feed it: live tensors through ``PEFTHelper.from_dict`` +
  ``LoRAModel.from_lora_tensors`` (what verl's tensor request does), a saved folder through
  ``add_adapter(LoRARequest(path))``. Then, for every LoRA-wrapped module, ``B @ A`` read
  back from vLLM's LoRA buffers (scaling folded in by vLLM) must equal the trained delta
  (vLLM's merged-stream parameter minus its base-stream parameter), and every parameter the
  merged stream changes must be covered by a LoRA buffer (else vLLM drops that adapter).
- ``mtp``: the MTP drafter class fed the base stream and the merged stream, judged as above.
- ``fp8_folder`` / ``fp8_stream``: a ``quantize="fp8"`` folder and stream into the class built
  from that folder (vLLM's ``Fp8Config``): every parameter but the attention KV-cache scales
  written, each FP8 weight dequantized by its loaded scales within half an e4m3 step of what the
  class loads from the bf16 source (:func:`judge_fp8`).

Device workarounds (no vLLM code is changed): vLLM's CUDA wheel on a machine without a GPU
runs on its ``UnspecifiedPlatform``, which names no attention backend, no LoRA kernel
wrapper and no device type, and no block-FP8 linear kernel claims it (the CPU ones need
``vllm._C``); the judge names the CPU ones (they are only built here, never run) and turns
vLLM's pinned-memory copies of adapters off (they need a CUDA driver). vLLM's CPU platform
itself needs triton-cpu.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

PORT = 29561


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:400] if lines else ''}"


def _attention_backend_workaround() -> None:
    from vllm.platforms import current_platform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    def backend(cls, *args, attn_selector_config=None, **kwargs) -> str:
        if attn_selector_config is not None and getattr(attn_selector_config, "use_mla", False):
            return "vllm.v1.attention.backends.mla.cpu_mla.CPUMLABackend"
        return "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"

    platform = type(current_platform)
    platform.get_attn_backend_cls = classmethod(backend)
    platform.current_device = classmethod(lambda cls: torch.device("cpu"))
    platform.device_type = "cpu"  # buffers made with device=current_platform.device_type (DSA top-k indices)
    platform.is_cpu = classmethod(lambda cls: True)  # e.g. MoE picks its CPU experts kernel
    platform.get_mla_prefill_backend_cls = classmethod(lambda cls, *args, **kwargs: resolve_obj_by_qualname(
        "vllm.v1.attention.backends.mla.prefill.cpu_sdpa.CPUSDPAMLAPrefillBackend"))
    import vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method as moe_method
    from vllm.model_executor.layers.fused_moe.oracle import unquantized as moe_oracle

    select = moe_oracle.select_unquantized_moe_backend

    def select_moe_kernel(*args, **kwargs):
        try:
            return select(*args, **kwargs)
        except (NotImplementedError, ValueError):  # none for this device: Triton's (LoRA needs it), never run
            backend = moe_oracle.UnquantizedMoeBackend.TRITON
            return backend, moe_oracle.backend_to_kernel_cls(backend)[0]

    moe_method.select_unquantized_moe_backend = select_moe_kernel
    import vllm.model_executor.kernels.linear as linear_kernels
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUFp8BlockScaledMMKernel

    choose = linear_kernels.choose_scaled_mm_linear_kernel

    def choose_linear_kernel(*args, **kwargs):
        try:
            return choose(*args, **kwargs)
        except ValueError:  # none for this device (the CPU ones need vllm._C): the CPU block-FP8 one, never run
            return CPUFp8BlockScaledMMKernel

    linear_kernels.choose_scaled_mm_linear_kernel = choose_linear_kernel
    platform.get_punica_wrapper = classmethod(
        lambda cls: "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU")
    import vllm.lora.lora_model
    import vllm.lora.lora_weights
    import vllm.lora.model_manager

    for module in (vllm.lora.lora_model, vllm.lora.lora_weights, vllm.lora.model_manager):
        module.PIN_MEMORY = False  # pinned memory needs a CUDA driver


def _configs(source: str, lora: dict | None = None, drafter: bool = False, dtype: torch.dtype = torch.float32):
    from vllm.config import DeviceConfig, LoRAConfig, ModelConfig, VllmConfig

    # a folder whose config class is remote code (MiMo's, as published) is read as users read it
    remote = "auto_map" in json.loads((Path(source) / "config.json").read_text())
    model_config = ModelConfig(model=source, dtype=dtype, skip_tokenizer_init=True, enforce_eager=True,
                               trust_remote_code=remote)
    lora_config = LoRAConfig(lora_dtype=torch.float32, **lora) if lora is not None else None
    config = VllmConfig(model_config=model_config, device_config=DeviceConfig("cpu"), lora_config=lora_config)
    if drafter:  # the drafter classes read the draft model's config from here
        speculative = _Speculative(draft_model_config=model_config, target_model_config=model_config,
                                   method="mtp", num_speculative_tokens=1,
                                   use_multi_module_mtp=lambda: False)
        object.__setattr__(config, "speculative_config", speculative)
    return config


class _Speculative(SimpleNamespace):
    """What the drafter classes read of vLLM's speculative config; any other option is off."""

    def __getattr__(self, name: str):
        return None


_DISTRIBUTED = False


def build(source: str, class_name: str | None = None, lora: dict | None = None, dtype: torch.dtype = torch.float32):
    """vLLM's model class for the source folder (or ``class_name``), its parameters NaN."""
    global _DISTRIBUTED
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import get_model_architecture
    from vllm.model_executor.models import ModelRegistry

    config = _configs(source, lora, drafter=class_name is not None, dtype=dtype)
    with set_current_vllm_config(config):
        from vllm.distributed import init_distributed_environment, initialize_model_parallel
        from vllm.distributed.parallel_state import destroy_model_parallel

        if not _DISTRIBUTED:
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{PORT}")
            _DISTRIBUTED = True
        destroy_model_parallel()
        initialize_model_parallel(1, 1)  # per config: the expert-parallel group exists only for MoE models
        if class_name is None:
            cls, _ = get_model_architecture(config.model_config)
        else:
            cls, _ = ModelRegistry.resolve_model_cls([class_name], config.model_config)
        with torch.device("cpu"):
            model = cls(vllm_config=config, prefix="")
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(math.nan if param.is_floating_point() else -1)  # an integer table: -1 is no index
    return model, config


def stream(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        for name in handle.keys():
            yield name, handle.get_tensor(name)


def source_stream(folder: Path):
    for path in sorted(folder.glob("*.safetensors")):
        yield from stream(path)


def load(model, config, pairs) -> dict:
    """Feed ``pairs`` to ``load_weights``; what it reports and what it leaves unwritten."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(config), torch.no_grad():
        loaded = model.load_weights(pairs)
    params = dict(model.named_parameters())
    not_reported = sorted(set(params) - set(loaded or ()))
    nan = sorted(name for name, p in params.items() if (torch.isnan(p) if p.is_floating_point() else p < 0).any())
    return {"not_reported": not_reported, "nan": nan}


def ignored(source: str, class_name: str | None, pairs: list, dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of ``pairs`` from which the class loads nothing when fed alone."""
    model, config = build(source, class_name, dtype=dtype)
    from vllm.config import set_current_vllm_config

    out = []
    for name, tensor in pairs:
        with set_current_vllm_config(config), torch.no_grad():
            try:
                loaded = model.load_weights([(name, tensor)])
            except Exception:  # a loader that wants companions (one of a stacked group)
                continue
        if not loaded:
            out.append(name)
    return out


def compare(model, reference) -> list[str]:
    ref = dict(reference.named_parameters())
    bad = []
    for name, param in model.named_parameters():
        if not torch.equal(param, ref[name]):
            bad.append(name)
    return bad


def judge_stream(folder: Path, manifest: dict, kind: str, class_name: str | None, reference_models: dict) -> dict:
    source = manifest["source"]
    key = class_name or "main"
    if key not in reference_models:
        reference, config = build(source, class_name)
        load(reference, config, source_stream(Path(source)))
        reference_models[key] = reference
    reference = reference_models[key]
    model, config = build(source, class_name)
    result = load(model, config, stream(folder / f"{kind}.safetensors"))
    result["ignored"] = ignored(source, class_name, list(stream(folder / f"{kind}.safetensors")))
    if kind == "base":
        result["differs_from_source"] = compare(model, reference)
    result["ok"] = not (result["not_reported"] or result["nan"] or result.get("differs_from_source"))
    return result, model


def lora_deltas(module, slot: int) -> dict[str, torch.Tensor]:
    """``B @ A`` per base parameter of one vLLM LoRA layer (parameter suffix -> delta)."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.fused_moe import FusedMoEWithLoRA

    if isinstance(module, FusedMoEWithLoRA):
        w13 = []
        for a, b in zip(module.w13_lora_a_stacked, module.w13_lora_b_stacked):
            a_, b_ = a[slot], b[slot]  # (E, r, H), (E, out, r)
            if a_.shape[0] != b_.shape[0]:
                a_ = a_.expand(b_.shape[0], -1, -1)
            w13.append(torch.bmm(b_, a_))
        a2, b2 = module.w2_lora_a_stacked[0][slot], module.w2_lora_b_stacked[0][slot]
        if b2.shape[0] != a2.shape[0]:
            b2 = b2.expand(a2.shape[0], -1, -1)
        return {"w13_weight": torch.cat(w13, dim=1), "w2_weight": torch.bmm(b2, a2)}
    if isinstance(module, BaseLinearLayerWithLoRA):
        parts = [b[slot, 0] @ a[slot, 0] for a, b in zip(module.lora_a_stacked, module.lora_b_stacked)]
        return {"weight": torch.cat(parts, dim=0)}
    return {}  # embeddings, logits: no adapter of bridge_ext's targets


def judge_adapter(manager, model, how: str, folder: Path, manifest: dict, trained: dict, names: set) -> dict:
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.request import LoRARequest

    adapter_id = {"live": 1, "saved_peft": 2, "saved_vllm": 3}[how]
    try:
        if how == "live":
            tensors = dict(stream(folder / "adapters.safetensors"))
            config = json.loads((folder / "adapter_config.json").read_text())
            helper = PEFTHelper.from_dict(config)
            mapper = getattr(model, "hf_to_vllm_mapper", None)
            lora = LoRAModel.from_lora_tensors(
                adapter_id, tensors, helper, device="cpu", dtype=torch.float32,
                model_vocab_size=model.config.get_text_config().vocab_size if hasattr(model, "config") else None,
                weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
                skip_prefixes=getattr(model, "lora_skip_prefixes", None))
            manager._adapter_manager.add_adapter(lora)
            manager._adapter_manager.activate_adapter(adapter_id)
        else:
            path = manifest["saved"][how.removeprefix("saved_")]
            manager.add_adapter(LoRARequest(how, adapter_id, path))
    except Exception as error:  # noqa: BLE001 (the verdict names vLLM's refusal)
        return {"ok": False, "error": _first_line(error), "trace": traceback.format_exc()[-1500:]}
    adapters = manager._adapter_manager
    slot = adapters.lora_index_to_id.index(adapter_id)
    covered, wrong, zero = set(), [], []
    for name, module in adapters.modules.items():
        for suffix, delta in lora_deltas(module, slot).items():
            # FusedMoE keeps its weights in routed_experts (vLLM 0.34)
            param = next((p for p in (f"{name}.{suffix}", f"{name}.routed_experts.{suffix}") if p in names),
                         f"{name}.{suffix}")
            covered.add(param)
            want = trained.get(param)
            if want is None:
                if delta.abs().max() > 0:
                    wrong.append(f"{param}: vLLM applies a delta the merged stream does not have")
                continue
            if want.shape != delta.shape:
                wrong.append(f"{param}: delta {tuple(delta.shape)} vs trained {tuple(want.shape)}")
            elif not torch.allclose(delta, want, rtol=1e-4, atol=1e-6):
                if delta.abs().max() == 0:
                    zero.append(param)
                else:
                    worst = (delta - want).abs().max().item()
                    wrong.append(f"{param}: max |B@A - trained| {worst:.3g}")
    dropped = sorted(set(trained) - covered)
    adapters.deactivate_adapter(adapter_id)
    adapters.remove_adapter(adapter_id)
    result = {"wrong": wrong, "zero": zero, "dropped": dropped, "checked": len(covered)}
    result["ok"] = not (wrong or zero or dropped)
    return result


def trained_deltas(base_model, merged_model) -> dict[str, torch.Tensor]:
    """vLLM parameter -> merged minus base, where the merged stream changed it."""
    merged = dict(merged_model.named_parameters())
    out = {}
    for name, param in base_model.named_parameters():
        delta = merged[name].detach() - param.detach()
        if delta.abs().max() > 0:
            out[name] = delta
    return out


def judge_case(manifest_path: Path) -> dict:
    folder = manifest_path.parent
    manifest = json.loads(manifest_path.read_text())
    verdict: dict = {}
    references: dict = {}

    def guarded(kind, fn):
        try:
            verdict[kind] = fn()
        except Exception as error:  # noqa: BLE001
            verdict[kind] = {"ok": False, "error": _first_line(error),
                             "trace": traceback.format_exc()[-1500:]}

    models = {}

    def base_and_merged(kind):
        result, model = judge_stream(folder, manifest, kind, None, references)
        models[kind] = model
        return result

    guarded("base", lambda: base_and_merged("base"))
    guarded("merged", lambda: base_and_merged("merged"))
    if manifest["streams"]["adapters"] and "base" in models and "merged" in models:
        trained = trained_deltas(models["base"], models["merged"])
        names = {name for name, _ in models["base"].named_parameters()}
        guarded("live", lambda: judge_adapters(folder, manifest, trained, names, verdict))
    if manifest.get("drafter"):
        for kind in ("base", "merged"):
            guarded(f"mtp_{kind}", lambda kind=kind: judge_stream(folder, manifest, kind, manifest["drafter"],
                                                                references)[0])
    if manifest.get("fused_base"):
        for kind, drafter in (("base_fused", None), ("mtp_base_fused", manifest.get("drafter"))):
            if kind == "base_fused" or drafter:
                guarded(kind, lambda drafter=drafter: judge_stream(folder, manifest, "base_fused", drafter,
                                                                   references)[0])
    return verdict


# vLLM's Fp8Config also gives each attention layer KV-cache scales; they are 1.0 unless a
# checkpoint with a static FP8 KV cache sets them, and a dynamic block-FP8 export has none
KV_CACHE_SCALES = (".attn.q_scale", ".attn.k_scale", ".attn.v_scale", ".attn.prob_scale")
E4M3_MAX = 448.0


def _blocks(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A ``[..., ceil(N/128), ceil(K/128)]`` scale grid spread over its ``[..., N, K]`` weight."""
    full = scale.repeat_interleave(128, dim=-2).repeat_interleave(128, dim=-1)
    return full[..., : shape[-2], : shape[-1]]


def judge_fp8(manifest: dict, pairs: list, reference) -> dict:
    """Build vLLM's class from the FP8 folder (its Fp8Config: block-FP8 linears and MoE), feed
    ``pairs``; every parameter but the KV-cache scales written, every FP8 weight dequantized by
    its loaded ``*_scale_inv`` within half an e4m3 step of what the class loads from the bf16
    source, every other parameter equal to it."""
    model, config = build(manifest["folder"], dtype=torch.bfloat16)
    result = load(model, config, iter(pairs))
    kv = sorted(name for name, _ in model.named_parameters() if name.endswith(KV_CACHE_SCALES))
    result["not_reported"] = [name for name in result["not_reported"] if name not in kv]
    result["nan"] = [name for name in result["nan"] if name not in kv]
    result["kv_cache_scales"] = len(kv)
    params, ref = dict(model.named_parameters()), dict(reference.named_parameters())
    quantized, off, differs, worst = [], [], [], 0.0
    for name, param in params.items():
        if name in kv or name.endswith("_scale_inv"):
            continue
        if param.dtype != torch.float8_e4m3fn:
            if not torch.equal(param, ref[name]):
                differs.append(name)
            continue
        scale = params.get(name + "_scale_inv")
        if scale is None:
            off.append(f"{name}: FP8 without a loaded scale")
            continue
        quantized.append(name)
        spread = _blocks(scale.float(), param.shape)
        error = (param.float() * spread - ref[name].float()).abs()
        # half an e4m3 step at the block's amax, plus the bf16 rounding of the reference
        allowed = 16.0 * spread + ref[name].float().abs() * 2.0**-8
        if (error > allowed).any():
            off.append(f"{name}: dequantized off by {(error - allowed).max().item():.3g} over the bound")
        worst = max(worst, (error / (spread * E4M3_MAX)).max().item())
    result.update(quantized=quantized, off=off, differs_from_source=differs, worst_block_error=worst,
                  ignored=ignored(manifest["folder"], None, pairs, dtype=torch.bfloat16))
    result["ok"] = not (result["not_reported"] or result["nan"] or off or differs or result["ignored"])
    return result


def judge_fp8_case(manifest_path: Path) -> dict:
    manifest = json.loads(manifest_path.read_text())
    reference, config = build(manifest["source"], dtype=torch.bfloat16)
    load(reference, config, source_stream(Path(manifest["source"])))
    verdict = {}
    for kind, pairs in (("fp8_folder", lambda: list(source_stream(Path(manifest["folder"])))),
                        ("fp8_stream", lambda: list(stream(manifest_path.parent / "fp8.safetensors")))):
        try:
            verdict[kind] = judge_fp8(manifest, pairs(), reference)
        except Exception as error:  # noqa: BLE001
            verdict[kind] = {"ok": False, "error": _first_line(error), "trace": traceback.format_exc()[-1500:]}
    return verdict


def judge_adapters(folder: Path, manifest: dict, trained: dict, names: set, verdict: dict) -> dict:
    """Build the LoRA-wrapped model once, judge each adapter route on it."""
    from vllm.config import set_current_vllm_config
    from vllm.lora.worker_manager import WorkerLoRAManager

    config = json.loads((folder / "adapter_config.json").read_text())
    # default engine options: vision-tower adapters are applied only with enable_tower_connector_lora
    # (which needs the multimodal processor, hence a tokenizer the tiny models lack)
    lora = {"max_lora_rank": max(8, int(config["r"])), "max_loras": 3}
    model, vllm_config = build(manifest["source"], lora=lora)
    load(model, vllm_config, stream(folder / "base.safetensors"))
    with set_current_vllm_config(vllm_config):
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        # as vLLM's loader does after load_weights (MoE layers make their kernels here)
        process_weights_after_loading(model, vllm_config.model_config, torch.device("cpu"))
        manager = WorkerLoRAManager(vllm_config, torch.device("cpu"), getattr(model, "embedding_modules", {}))
        manager.create_lora_manager(model, vllm_config)
        for how in ("saved_peft", "saved_vllm"):
            if how.removeprefix("saved_") in manifest["saved"]:
                verdict[how] = judge_adapter(manager, model, how, folder, manifest, trained, names)
        return judge_adapter(manager, model, "live", folder, manifest, trained, names)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifests", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    _attention_backend_workaround()
    verdicts = {}
    for path in args.manifests:
        manifest = json.loads(path.read_text())
        verdicts[manifest["case"]] = (judge_fp8_case if manifest.get("fp8") else judge_case)(path)
    args.out.write_text(json.dumps(verdicts, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.exit(main())
