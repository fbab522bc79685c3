"""Check exported folders the way their consumers will read them: transformers and PEFT.

* every tensor name of the model folder against the architecture's own key set (names the
  table marks as outside transformers' key set, e.g. MTP layers, are listed apart);
* the adapter folder loaded by ``PeftModel.from_pretrained`` with no missing and no
  unexpected key: the expected keys are PEFT's own ``get_peft_model_state_dict`` of the
  wrapped model, compared with the file's keys (PEFT itself only warns);
* logits of the Hugging Face model (with the adapter) for given input ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from bridge_ext.checkpoint.control_files import SMALL_JSON_LIMIT, read_json_file
from bridge_ext.errors import SafetensorsFolderError, VerificationError
from bridge_ext.hf_files import SINGLE_FILE, list_safetensors
from bridge_ext.peft_keys import PEFT_PREFIX
from bridge_ext.tables import known_model_types, register_transformers_configs, table_for


@dataclass
class Report:
    """What was checked, one line per check, for people to read."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)


def folder_tensor_names(folder: str | Path, file_name: str = SINGLE_FILE) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in a Hugging Face (or adapter) folder; VerificationError
    naming the file when the folder's safetensors are missing or damaged."""
    try:
        stored = list_safetensors(folder, file_name)
    except SafetensorsFolderError as error:
        raise VerificationError(str(error)) from None
    return {name: tensor.shape for name, tensor in stored.items()}


def require_same_keys(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Fail naming every missing, unexpected and wrongly shaped key."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if missing or unexpected or wrong_shape:
        raise VerificationError(
            f"{what}: missing {missing or 'none'}; unexpected {unexpected or 'none'}; wrong shape {wrong_shape or 'none'}"
        )


def _table_or_none(config):
    """The architecture's table, or None for a model type without one (only transformers' view)."""
    return table_for(config) if config.model_type in known_model_types() else None


def _register_config_of(model_dir: str | Path) -> None:
    """Register the transformers config of the folder's model type only (one table's registration
    imports Megatron-Bridge); a folder without a readable config.json is left to transformers' error."""
    file = Path(model_dir) / "config.json"
    settings = read_json_file(file, SMALL_JSON_LIMIT) if file.is_file() else None
    model_type = settings.get("model_type") if isinstance(settings, dict) else None
    register_transformers_configs(model_type if isinstance(model_type, str) else "")


def check_model_folder(model_dir: str | Path, report: Report, *, expert_layout: str | None = None) -> dict[str, tuple[int, ...]]:
    """Every name and shape in ``model_dir`` equals the architecture's checkpoint key set."""
    from transformers import AutoConfig

    _register_config_of(model_dir)
    from bridge_ext.hf_keys import hf_checkpoint_keys

    config = AutoConfig.from_pretrained(str(model_dir))
    table = _table_or_none(config)
    written = folder_tensor_names(model_dir)
    extra = table.extra_weights if table is not None else None
    outside = {name: shape for name, shape in written.items() if extra is not None and extra.holds(name)}
    if outside and not extra.count(config):
        raise VerificationError(f"{len(outside)} tensors under {list(extra.prefixes)}, but config.json declares "
                                f"no such layers ({extra.count_key})")
    main = {name: shape for name, shape in written.items() if name not in outside}
    inside = {family.name for family in table.expert_families if not family.extra} if table is not None else set()
    found = {layout for family, layout in table.expert_layouts_of(main).items() if family in inside} if inside else set()
    layout = expert_layout or (found.pop() if len(found) == 1 else "per_expert")
    require_same_keys(main, hf_checkpoint_keys(config, expert_layout=layout), f"{model_dir}")
    report.add(f"{len(main)} tensor names and shapes equal the {config.model_type} checkpoint key set"
               + (f"; {len(outside)} tensors outside it (under {list(extra.prefixes)}) beside them" if outside else ""))
    return written


def auto_model_class(config):
    """The transformers class that loads a folder of ``config``: its table's ``hf_auto_class``
    (for a model type without a table, transformers' own registry of image-text models decides),
    or the table's model class where that Auto class has none for the config (audio / omni models)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    table = _table_or_none(config)
    if table is not None:
        auto = getattr(transformers, table.hf_auto_class)
    else:
        image_text = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        auto = transformers.AutoModelForImageTextToText if image_text else transformers.AutoModelForCausalLM
    if type(config) not in auto._model_mapping:  # audio / omni models: no such auto class, the table's class
        from bridge_ext.hf_keys import model_class_for

        return model_class_for(config)
    return auto


def load_hf_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The folder loaded with transformers' Auto class for its architecture (:func:`auto_model_class`)."""
    from transformers import AutoConfig

    _register_config_of(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir))
    model = auto_model_class(config).from_pretrained(str(model_dir), dtype=dtype).eval()
    table = _table_or_none(config)
    if table is not None and table.repair_hf_model is not None:  # e.g. a remote-code rotary buffer left unset
        table.repair_hf_model(model)
    return model


def load_adapter_strict(base_model, adapter_dir: str | Path, report: Report):
    """``PeftModel.from_pretrained``, then fail on any missing or unexpected adapter key."""
    from peft import PeftModel, get_peft_model_state_dict

    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    expected = get_peft_model_state_dict(peft_model)
    saved = folder_tensor_names(adapter_dir, "adapter_model.safetensors")
    # transformers builds no module for the table's extra weights (MTP), so PEFT cannot load their adapters.
    table = _table_or_none(base_model.config)
    extra = table.extra_weights if table is not None else None
    prefixes = tuple(PEFT_PREFIX + prefix for prefix in extra.prefixes) if extra is not None else ()
    outside = {key for key in saved if prefixes and key.startswith(prefixes)}
    saved = {key: shape for key, shape in saved.items() if key not in outside}
    expected_shapes = {key: tuple(tensor.shape) for key, tensor in expected.items()}
    require_same_keys(saved, expected_shapes, f"{adapter_dir}: PEFT expects {len(expected)} keys")
    report.add(f"PEFT loaded {len(saved)} adapter tensors: no missing, no unexpected key"
               + (f"; {len(outside)} adapter tensors outside transformers' model beside them" if outside else ""))
    return peft_model


@torch.no_grad()
def hf_logits(model, input_ids: torch.Tensor, **model_inputs) -> torch.Tensor:
    return model(input_ids=input_ids, **model_inputs).logits.float()


def compare_logits(ours: torch.Tensor, reference: torch.Tensor, report: Report, *, what: str,
                   relative_tolerance: float) -> float:
    """Max |difference| relative to the largest |logit|; fails above the tolerance."""
    if ours.shape != reference.shape:
        raise VerificationError(f"{what}: logits shapes differ, {tuple(ours.shape)} vs {tuple(reference.shape)}")
    relative = ((ours - reference).abs().max() / reference.abs().max()).item()
    if not relative <= relative_tolerance:
        raise VerificationError(f"{what}: logits differ by {relative:.2e} of the largest logit (> {relative_tolerance:g})")
    report.add(f"{what}: logits agree to {relative:.1e} of the largest logit")
    return relative
