"""Convert a Megatron torch_dist checkpoint on disk into a Hugging Face folder and/or a PEFT adapter folder.

No model is built: global tensors are read through the checkpoint's own metadata one at a time
(:class:`bridge_ext.checkpoint.source.CheckpointSource`) and converted by the same tables and
engine as a live model (:func:`bridge_ext.plan.plan_export`, :func:`bridge_ext.save.write_export`).
Everything that names alone or shapes alone can decide is checked before the first tensor is
read: the architecture has a table, every stored tensor has a rule, every Hugging Face name is
produced, every produced shape is the one config.json implies, every adapter fits its base.
Outputs are built beside their targets and renamed into place only when complete.

For a LoRA adapter-only checkpoint the base model comes from a Hugging Face folder
(``hf_base``), turned into Megatron tensors by the same tables in reverse.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bridge_ext.checkpoint import CheckpointReader
from bridge_ext.checkpoint.config_check import (
    check_config_fields,
    check_config_matches_run_config,
    config_matches_run_config,
    load_hf_config,
)
from bridge_ext.checkpoint.run_config import RunConfig
from bridge_ext.checkpoint.hf_base import CombinedSource, HfBaseSource, hf_folder_shapes
from bridge_ext.checkpoint.parallel_write import base_in_workers
from bridge_ext.checkpoint.reader import READ_AHEAD_BYTES
from bridge_ext.checkpoint.source import CheckpointSource
from bridge_ext.consumer import adapter_layout_for, is_mtp_adapter
from bridge_ext.engine import Mode
from bridge_ext.errors import ConvertError, OutputLocationError
from bridge_ext.expert_layouts import expert_layouts, possible_variants, source_expert_layouts
from bridge_ext.fp8_export import check_quantize
from bridge_ext.hf_files import has_safetensors
from bridge_ext.hf_folder import TensorSpec
from bridge_ext.output_folder import FoundTarget, check_distinct_outputs, check_output_target, require_an_output
from bridge_ext.peft_config import adapted_outputs
from bridge_ext.plan import ExportPlan, check_shapes, conversion_passes, fp8_plan, plan_export, refuse_adapters_for_vllm
from bridge_ext.table import ExpertLayout, MappingTable
from bridge_ext.tables import known_model_types, register_transformers_configs, table_for
from bridge_ext.value_check import ValueCheck
from bridge_ext.stream_plan import planned_layout, planned_reads
from bridge_ext.verify import Report, auto_model_class


@dataclass
class ConvertResult:
    """What a conversion wrote and how long it took."""

    model_dir: Path | None
    adapter_dir: Path | None
    checkpoint: Path
    adapter_only: bool
    tensors: int
    bytes: int
    seconds: float
    config: object = field(repr=False, default=None)
    notes: list[str] = field(default_factory=list)  # for the user: files not copied, folders removed or kept
    report: Report | None = None  # with verify=True: what the staged folders passed before being installed
    non_finite: dict[str, int] = field(default_factory=dict)  # tensor -> NaN / Inf values written

    @property
    def throughput(self) -> float:
        """Bytes written per second."""
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")


def check_output_folder(target: Path, overwrite: bool | str, protected: list[Path]) -> FoundTarget:
    """Refuse an output that is, holds or lies inside an input, a dangerous or occupied target.

    Returns what is at the target now: installing the output later fails (OutputExistsError)
    if anything else is there by then. See :func:`bridge_ext.output_folder.check_output_target`.
    """
    check_outside_inputs(target, protected)
    return check_output_target(target, overwrite)


def check_outside_inputs(target: Path, protected: list[Path]) -> None:
    """OutputLocationError if ``target`` is an input, inside one, or a folder holding one."""
    resolved = target.resolve()
    for source in protected:
        source = source.resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise OutputLocationError(f"{target}: the output would overlap the input {source} (replacing the "
                                      "output folder would delete it); choose another folder")


def resolve_config(reader: CheckpointReader, hf_base: Path | None, hf_config: Path | None,
                   model_type: str | None = None):
    """The Hugging Face config (and the folder whose tokenizer files go with it, if any).

    In order: the base folder, an explicit config, a config built from run_config.yaml for
    ``model_type``, then the ``hf_model_id`` Megatron-Bridge recorded in run_config.yaml (a
    local folder, or a Hub id already in the local cache).
    """
    if hf_base is not None:
        return load_hf_config(hf_base)
    if hf_config is not None:
        return load_hf_config(hf_config)
    if model_type is not None:
        return config_from_run_config(reader, model_type), None
    run_config = reader.run_config
    model_id = run_config.hf_model_id if run_config is not None else None
    if model_id and _is_folder(Path(model_id)):
        return load_hf_config(Path(model_id))
    if model_id:
        from transformers import AutoConfig

        register_transformers_configs()
        try:
            config = AutoConfig.from_pretrained(model_id, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the cache (or not loadable): say so below
            config = None
        if config is not None:
            check_config_fields(config, f"the cached config of {model_id}")
            return config, None
    where = f"run_config.yaml names hf_model_id {model_id!r}, which is neither a local folder nor in the local Hugging Face cache" \
        if model_id else "the checkpoint records no Hugging Face model (no run_config.yaml hf_model_id)"
    raise ConvertError(f"cannot tell the model's architecture: {where}; pass --hf-base, --hf-config or --model-type")


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # e.g. a name too long to be a path: then it is not a local folder
        return False


def config_from_run_config(reader: CheckpointReader, model_type: str):
    """A Hugging Face config of ``model_type`` built from run_config.yaml's model settings.

    Uses Megatron-Bridge's own ``megatron_to_hf_config`` of the bridge registered for that model
    type (what its ``AutoBridge.from_auto_config`` does); settings it does not map keep
    transformers' defaults, and the shape check then names any tensor they do not fit.
    """
    import torch.nn.functional as functional
    from megatron.bridge import AutoBridge
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    register_transformers_configs()
    if model_type not in CONFIG_MAPPING:
        raise ConvertError(f"unknown architecture: transformers has no model type {model_type!r}")
    _table(model_type)
    settings = dict(reader.require_run_config().model)
    # run_config.yaml names the activation by its import path; only torch.nn.functional is looked up.
    activation = getattr(functional, str(settings.get("activation_func", "")).rsplit(".", 1)[-1], None)
    settings["activation_func"] = activation if callable(activation) else functional.silu
    architecture = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type) or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    reference = CONFIG_MAPPING[model_type](architectures=[architecture])
    model_bridge = AutoBridge.from_hf_config(reference)._model_bridge
    values = model_bridge.megatron_to_hf_config(types.SimpleNamespace(**settings))
    config = type(reference)(**{key: value for key, value in values.items() if value is not None})
    check_config_fields(config, f"the config built from {reader.location.run_config_file}")
    return config


def _table(config_or_model_type):
    """The mapping table of a config (None for a bare model type: only checked to exist)."""
    model_type = getattr(config_or_model_type, "model_type", config_or_model_type)
    if model_type not in known_model_types():
        raise ConvertError(f"unknown architecture: no mapping table for model_type {model_type!r}; "
                           f"known: {', '.join(known_model_types())}")
    return None if isinstance(config_or_model_type, str) else table_for(config_or_model_type)


def check_hf_side(reader: CheckpointReader, config, config_folder: Path | None, hf_base: Path | None,
                  built_from_run_config: bool) -> list[str]:
    """The Hugging Face folders are readable and contained, and the config is the model trained.

    ``hf_base`` must hold weights (index and headers readable, nothing outside the folder); a
    config folder is checked when it has any (its index decides the expert layout). The config is
    compared with run_config.yaml unless it was built from it; returns a note per field the
    table cannot compare.
    """
    if hf_base is not None:
        hf_folder_shapes(hf_base)
    elif config_folder is not None and has_safetensors(config_folder):
        hf_folder_shapes(config_folder)
    run_config = reader.run_config
    if run_config is not None and not built_from_run_config:
        label = str(config_folder / "config.json") if config_folder else f"the config of {run_config.hf_model_id}"
        return check_config_matches_run_config(config, run_config, label).notes()
    return []


def build_source(reader: CheckpointReader, config, table: MappingTable, hf_base: Path | None,
                 layouts_found: dict[str, ExpertLayout]):
    """The checkpoint as a tensor source; for adapter-only checkpoints, with the HF base beside it."""
    run_config = reader.run_config
    checkpoint = CheckpointSource(reader, run_config.peft if run_config is not None else None, table)
    if not reader.is_adapter_only:
        return checkpoint
    from bridge_ext.hf_keys import hf_checkpoint_keys

    if hf_base is not None:
        shapes = hf_folder_shapes(hf_base)
    else:  # names and shapes suffice to export adapters alone
        shapes = hf_checkpoint_keys(config, expert_layout=expert_layouts(table, layouts_found).transformers_layout(table))
    base = HfBaseSource(shapes, table, table.dims(config), possible_variants(table, layouts_found), hf_base)
    return CombinedSource(base, checkpoint)


def base_folder_extra_shapes(plan: ExportPlan, hf_base: Path | None) -> dict[str, tuple[int, ...]]:
    """The base folder's shapes of names config.json does not imply (MTP tensors transformers does not know)."""
    if hf_base is None:
        return {}
    return {name: tuple(shape) for name, shape in hf_folder_shapes(hf_base).items() if name not in plan.hf_keys}


def convert_checkpoint(
    checkpoint: str | Path,
    *,
    model_dir: str | Path | None = None,
    adapter_dir: str | Path | None = None,
    hf_base: str | Path | None = None,
    hf_config: str | Path | None = None,
    model_type: str | None = None,
    iteration: int | None = None,
    merge: bool = False,
    dtype: torch.dtype | None = None,
    expert_layout: ExpertLayout | None = None,
    expert_adapter_layout: ExpertLayout | None = None,
    adapter_for: str = "peft",
    max_shard_size: int | str = "5GB",
    overwrite: bool | str = False,
    verify: bool = False,
    allow_overflow: bool = False,
    quantize: str | None = None,
    engine_tp_size: int | None = 1,
    workers: int | None = None,
    on_start: Callable[[int], None] | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
    notes: list[str] | None = None,
) -> ConvertResult:
    """Convert a Megatron checkpoint (root or iteration folder) to Hugging Face / PEFT folders.

    Args:
        checkpoint: A checkpoint root (``latest_checkpointed_iteration.txt``) or iteration folder.
        model_dir: Write the Hugging Face model folder here (base weights, or merged with ``merge``).
        adapter_dir: Write the PEFT adapter folder here.
        hf_base: The Hugging Face folder of the base model: its config.json and tokenizer files
            are used, and for an adapter-only checkpoint its weights are the base.
        hf_config: A config.json (or its folder) when there is no ``hf_base``; by default the
            ``hf_model_id`` recorded in run_config.yaml.
        model_type: Without ``hf_base`` / ``hf_config``: build config.json from run_config.yaml
            for this Hugging Face model type (e.g. ``qwen3``) through Megatron-Bridge's mapping.
        iteration: Which iteration of a root (default: the latest).
        merge: Merge the LoRA adapters into the base weights (``W + alpha/r * B @ A``, in fp32).
        dtype: Cast every written tensor (default: keep the checkpoint's dtype).
        expert_layout: MoE experts fused (``gate_up_proj``) or per expert; default: the base
            folder's layout, else fused.
        expert_adapter_layout: Expert adapters in PEFT's fused ``target_parameters`` layout or per expert
            (default: what ``adapter_for`` loads).
        adapter_for: ``"peft"`` or ``"vllm"``: the consumer the adapter folder is for, as for
            :func:`bridge_ext.save.save_hf_pretrained`.
        max_shard_size: Largest safetensors shard, e.g. ``"5GB"``; bounds memory use.
        overwrite: Replace output folders holding an earlier output, i.e. only the files of a Hugging
            Face model or PEFT adapter folder (only once the new ones are complete); ``"any"``:
            whatever they hold.
        verify: Check the written folders with :func:`verify_conversion` before installing them:
            a failure installs nothing (an existing folder stays as it was).
        allow_overflow: Write the infinities a cast to ``dtype`` makes of values beyond its range
            (by default such a cast is refused, naming the tensor).
        quantize: ``"fp8"``: the model folder's weights block-FP8 (docs/fp8.md), quantized after
            the ``dtype`` cast, with config.json's ``quantization_config``; ``engine_tp_size``:
            the inference engine's tensor-parallel size its block check is run at (None: none).
        workers: Convert and write the model folder's shards in this many processes at once
            (default: the cores this process may use, fewer when memory or the output's size
            says so; the bytes written are the same whatever the number). An FP8 conversion
            (``quantize``) runs in one process.
        on_start: Called with the number of tensors to write, once all checks passed.
        on_tensor: Called with each written tensor's name and size.
        notes: Collects what the user should hear about (also on failure): stale staging
            folders removed, files of the config folder not copied, a replaced folder kept.

    Raises:
        CheckpointError: the checkpoint is missing, unsafe, truncated or corrupted.
        ConvertError / ExportError: config, tables and checkpoint disagree, or the options conflict.
        OutputLocationError: an output is refused wherever it is (an input, the working directory...).
        OutputExistsError: an output folder exists and is not empty, or appeared meanwhile.
        OutputWriteError: the filesystem refused to write an output.
        VerificationError: ``verify`` failed.
    """
    from bridge_ext.save import write_export

    started = time.perf_counter()
    require_an_output(model_dir, adapter_dir)
    if merge and adapter_dir is not None:
        raise ConvertError("--merge writes the adapters into the model folder; drop the adapter folder")
    check_quantize(quantize, engine_tp_size)
    if quantize is not None and (model_dir is None or verify):
        raise ConvertError("--quantize writes a quantized model folder: give a model folder, without --verify "
                           "(which checks bf16 folders against transformers' key set)")
    checkpoint, hf_base = Path(checkpoint), Path(hf_base) if hf_base is not None else None
    protected = [checkpoint, *(Path(p) for p in (hf_base, hf_config) if p is not None)]
    outputs = [Path(p) for p in (model_dir, adapter_dir) if p is not None]
    check_distinct_outputs(*outputs)
    found_outputs = {output: check_output_folder(output, overwrite, protected) for output in outputs}
    notes = notes if notes is not None else []

    reader = CheckpointReader(checkpoint, iteration=iteration)
    adapter_only = reader.is_adapter_only
    if adapter_only:
        reader.require_run_config()
        if model_dir is not None and hf_base is None:
            raise ConvertError(f"{reader.path} is a LoRA adapter-only checkpoint: the base weights of a model "
                               "folder come from the Hugging Face base model; pass --hf-base")
    config, config_folder = resolve_config(reader, hf_base, Path(hf_config) if hf_config else None, model_type)
    for output in outputs if config_folder is not None else ():
        check_outside_inputs(output, [config_folder])  # e.g. the hf_model_id folder of run_config.yaml
    table = _table(config)
    built_from_run_config = model_type is not None and hf_base is None and hf_config is None
    notes.extend(check_hf_side(reader, config, config_folder, hf_base, built_from_run_config))
    found = source_expert_layouts(hf_base or config_folder, table)
    source = build_source(reader, config, table, hf_base, found)
    adapter_layout = adapter_layout_for(config, adapter_for, expert_adapter_layout)  # a refusal writes nothing
    plan = plan_export(source, config, expert_layouts(table, found, expert_layout, adapter_layout))
    plan = plan.with_extra_shapes(base_folder_extra_shapes(plan, hf_base))
    if adapter_dir is not None and not source.adapters():
        raise ConvertError(f"{reader.path} holds no LoRA adapters; drop the adapter folder")
    if adapter_dir is not None and adapter_for == "vllm":
        refuse_adapters_for_vllm(source, plan)
    if model_dir is not None and adapter_dir is None and source.adapters() and not merge:
        raise ConvertError(f"{reader.path} holds LoRA adapters: give an adapter folder too, or --merge")
    base_mode = None if model_dir is None else (Mode.MERGED if merge else Mode.BASE)
    # Every task on meta tensors first (base tensors too when only adapters are written: the
    # config must be the model trained): a config that does not fit fails before any output exists.
    check_shapes(source, plan, conversion_passes(source, plan, base=base_mode or Mode.BASE,
                                                 adapters=adapter_dir is not None), exported="the checkpoint")
    fp8 = fp8_plan(source, plan, base_mode, quantize, engine_tp_size)
    if on_start is not None:
        base_count = sum(len(task.hf_names) for task in plan.base_tasks) if model_dir is not None else 0
        base_count += len(fp8.parts) if fp8 is not None else 0
        adapter_count = sum(2 + (output.adapter.magnitude is not None)  # DoRA: and its magnitude
                            for output in adapted_outputs(plan.adapter_tasks, source.adapters(), plan.table)) \
            if adapter_dir is not None else 0
        on_start(base_count + adapter_count)
    written_dtype = dtype or _stored_dtype(reader)
    run_config = reader.run_config
    base_name = str(hf_base.resolve()) if hf_base else (run_config.hf_model_id if run_config else None)
    verification: list[tuple[Report, float]] = []

    def verify_staged(staged_model: Path | None, staged_adapter: Path | None) -> None:
        begun = time.perf_counter()
        staged = ConvertResult(staged_model, staged_adapter, reader.path, adapter_only, 0, 0, 0.0, config)
        verification.append((verify_conversion(staged, hf_base, run_config=reader.run_config),
                             time.perf_counter() - begun))

    values = ValueCheck(dtype, allow_overflow)  # casts, counts NaN / Inf, refuses an overflowing cast
    # Shard headers are laid out from the plan, and the checkpoint's tensors are read ahead in the
    # order the stream needs them: reading, conversion and writing overlap, no shard is held in memory.
    layout = planned_layout(source, plan, base_mode, dtype) if base_mode is not None else None
    if layout is not None and fp8 is not None:
        layout = [TensorSpec(name, kind or spec.dtype, shape) for spec in layout
                  for name, shape, kind in fp8.output_shapes(spec.name, spec.shape)]
    checkpoint_source = source.adapter_source if isinstance(source, CombinedSource) else source
    # With a layout the base tensors can go to their places from several processes at once
    # (FP8 quantization runs in this process only).
    write_base = None if layout is None or fp8 is not None else base_in_workers(
        source, checkpoint_source, plan, base_mode, layout, transform=values, workers=workers,
        read_ahead=READ_AHEAD_BYTES, on_tensor=on_tensor)
    # Workers read ahead for themselves (and are forked with no thread running here); the
    # adapters streamed here after them are small.
    reading = nullcontext() if write_base is not None else \
        checkpoint_source.read_ahead(planned_reads(source, plan, base_mode, adapter_dir is not None))
    with reading, _core_left_for_reading():
        result = write_export(
            source, plan, model_dir, adapter_dir,
            merge=merge, config_dtype=written_dtype, max_shard_size=max_shard_size,
            overwrite=overwrite, source_folder=config_folder, base_model_name=base_name, on_tensor=on_tensor,
            found=found_outputs, before_install=verify_staged if verify else None, notes=notes,
            transform=values, layout=layout, fp8=fp8, write_base=write_base,
            omit_adapter=(lambda key: is_mtp_adapter(plan, key)) if adapter_for == "vllm" else None,
            vllm_names=adapter_for == "vllm",
        )
    report, verify_seconds = verification[0] if verification else (None, 0.0)
    return ConvertResult(result.model_dir, result.adapter_dir, reader.path, adapter_only, result.tensors,
                         result.bytes, time.perf_counter() - started - verify_seconds, config, notes, report,
                         values.non_finite)


@contextmanager
def _core_left_for_reading() -> Iterator[None]:
    """One intra-op thread fewer while converting, so that the read-ahead thread has a core.

    The conversion's tensor operations are mostly memory copies: sharing a core with the
    reader, torch's threads wait on each other (measured on 2 cores: 5x the CPU time of one thread).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stored_dtype(reader: CheckpointReader) -> torch.dtype | None:
    """The dtype most of the checkpoint's bytes are in (what config.json should record)."""
    by_dtype: dict[torch.dtype, int] = {}
    for info in reader.tensors.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    return max(by_dtype, key=by_dtype.get) if by_dtype else None


def verify_conversion(result: ConvertResult, hf_base: str | Path | None = None, *, seq_len: int = 8,
                      run_config: RunConfig | None = None) -> Report:
    """Load what was written with transformers (and PEFT), run a short forward, report.

    The model folder must load with no missing and no unexpected weight; the adapter folder
    must load strictly onto the written model folder (or ``hf_base`` when only adapters were
    written); both must give finite logits. With ``run_config`` (the Megatron side, which the
    Hugging Face config cannot sway), the written config.json must match it field by field.
    """
    from transformers import AutoConfig

    from bridge_ext.verify import (
        VerificationError,
        check_model_folder,
        hf_logits,
        load_adapter_strict,
        load_hf_model,
    )

    report = Report()
    model = None
    if result.model_dir is not None:
        written = check_model_folder(result.model_dir, report)
        model, info = _load_with_info(result.model_dir)
        # MTP layers: tensors transformers builds nothing for, checked by name in check_model_folder
        extra = _table(model.config).extra_weights
        missing = info["missing_keys"]
        unexpected = [name for name in info["unexpected_keys"] if extra is None or not extra.holds(name)]
        if missing or unexpected:
            raise VerificationError(f"{result.model_dir}: transformers reports missing {sorted(missing) or 'none'}; "
                                    f"unexpected {sorted(unexpected) or 'none'}")
        report.add(f"transformers loaded {result.model_dir} ({len(written)} tensors): nothing missing or unexpected")
        if run_config is not None:
            report.add(config_matches_run_config(result.model_dir, run_config))
    if result.adapter_dir is not None:
        base_dir = result.model_dir or (Path(hf_base) if hf_base is not None else None)
        if base_dir is None:
            raise VerificationError("verifying an adapter folder needs its base model: pass --hf-base")
        model = load_adapter_strict(model if model is not None else load_hf_model(base_dir), result.adapter_dir, report)
    vocab = AutoConfig.from_pretrained(str(result.model_dir or hf_base)).get_text_config().vocab_size
    input_ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    logits = hf_logits(model, input_ids)
    if not torch.isfinite(logits).all():
        raise VerificationError("the forward pass gave non-finite logits")
    report.add(f"forward pass on {seq_len} tokens: logits {tuple(logits.shape)}, all finite")
    return report


def _load_with_info(model_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    model, info = auto_model_class(config).from_pretrained(str(model_dir), dtype=torch.float32,
                                                           output_loading_info=True)
    return model.eval(), info
