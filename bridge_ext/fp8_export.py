"""Block-FP8 export: which tensors of an export are quantized, the engine's block-shape check, the config block.

An :class:`Fp8Plan` is made from the table's :class:`~bridge_ext.fp8_rules.Fp8Rules` and the
names and shapes the export will produce, before the first tensor leaves; its
:meth:`Fp8Plan.quantize` turns the bf16 stream into ``weight`` (e4m3) + ``weight_scale_inv``
(float32) pairs (:mod:`bridge_ext.fp8`), everything else unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from bridge_ext.errors import ExportError
from bridge_ext.fp8 import BLOCK, quantize_runs, scale_shape
from bridge_ext.fp8_rules import Fp8Gemm, Fp8Rules
from bridge_ext.patterns import NamePattern
from bridge_ext.table import MappingTable

QUANTIZATIONS = ("fp8",)
SCALE_SUFFIX = "_scale_inv"


def check_quantize(quantize: str | None, engine_tp_size: int | None = 1) -> None:
    """Refuse an unknown quantization name or engine size (before anything else runs)."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize must be None or one of {QUANTIZATIONS}, not {quantize!r}")
    if engine_tp_size is not None and (isinstance(engine_tp_size, bool) or not isinstance(engine_tp_size, int)
                                       or engine_tp_size < 1):
        raise ExportError(f"engine_tp_size must be a positive integer or None, not {engine_tp_size!r}")


def scale_name(name: str) -> str:
    """``...q_proj.weight`` -> ``...q_proj.weight_scale_inv``; ``...experts.gate_up_proj`` ->
    ``...experts.gate_up_proj_scale_inv`` (the names vLLM and transformers load)."""
    return name + SCALE_SUFFIX


def fp8_rules_of(table: MappingTable) -> Fp8Rules:
    rules = table.fp8
    if rules is None:
        raise ExportError(f"quantize='fp8': the table for {', '.join(table.model_types)} has no FP8 rules "
                          f"(which weights the engine runs in FP8 and which stay bf16)")
    if rules.refused:
        raise ExportError(f"quantize='fp8' is refused for {', '.join(table.model_types)}: {rules.refused}")
    return rules


@dataclass
class Fp8Plan:
    """The quantized tensors of one export and the modules left bf16."""

    #: quantized tensor name -> its equal row parts (see :class:`~bridge_ext.fp8_rules.Fp8Gemm`)
    parts: dict[str, int]
    #: Hugging Face module names left bf16, sorted (transformers' ``modules_to_not_convert``)
    not_converted: list[str]
    #: the same plus the engine's fused names of wholly bf16 fused modules (vLLM's ``ignored_layers``)
    ignored: list[str]

    def quantize(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        return quantize_runs(pairs, self.parts.get, scale_name)

    def output_shapes(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """What one produced tensor becomes: itself, or FP8 weight + float32 scales."""
        parts = self.parts.get(name)
        if parts is None:
            return [(name, shape, None)]
        *lead, rows, cols = shape
        scales = scale_shape((*lead, rows // parts, cols))
        return [(name, shape, torch.float8_e4m3fn),
                (scale_name(name), (*scales[:-2], parts * scales[-2], scales[-1]), torch.float32)]

    def config(self) -> dict:
        return quantization_block(self.ignored, self.not_converted)


def quantization_block(ignored: list[str], not_converted: list[str]) -> dict:
    """config.json's ``quantization_config``: vLLM reads ``ignored_layers`` (falling back to
    ``modules_to_not_convert``), transformers ``modules_to_not_convert`` (falling back to
    ``ignored_layers``), so each gets its own exact list."""
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
        "ignored_layers": list(ignored),
        "modules_to_not_convert": list(not_converted),
    }


def plan_fp8(table: MappingTable, shapes: dict[str, tuple[int, ...]], engine_tp_size: int | None = 1) -> Fp8Plan:
    """The FP8 plan of an export producing ``shapes`` (name -> shape, in order). Refuses a table
    without FP8 rules, a rule that would quantize a tensor that is no matrix, and (at
    ``engine_tp_size``; None: no check) a weight whose per-rank part the engine's block check
    refuses."""
    rules = fp8_rules_of(table)
    parts: dict[str, int] = {}
    for name, shape in shapes.items():
        gemm = next((g for g in rules.gemms if any(p.match(name) is not None for p in g.patterns)), None)
        if gemm is None:
            continue
        if len(shape) not in (2, 3) or shape[-2] % gemm.parts:
            raise ExportError(f"quantize='fp8': {name} has shape {tuple(shape)}, which is no matrix (or stack of "
                              f"matrices) of {gemm.parts} equal row parts")
        parts[name] = gemm.parts
    quantized_modules = {_module(name) for name in parts}
    not_converted: list[str] = []
    for name in shapes:
        module = _module(name)
        if module in not_converted or not any(p.match(module) is not None for p in rules.module_patterns):
            continue
        if module in quantized_modules:
            raise ExportError(f"the FP8 rules of {table.model_types} both quantize and keep {module}")
        not_converted.append(module)
    if engine_tp_size is not None:
        check_engine_blocks(rules.gemms, shapes, engine_tp_size)
    return Fp8Plan(parts, sorted(not_converted), sorted(not_converted + _engine_fused(rules, not_converted)))


def _module(name: str) -> str:
    """The module a tensor belongs to: ``...q_proj.weight`` -> ``...q_proj``,
    ``...mlp.experts.gate_up_proj`` -> ``...mlp.experts``."""
    return name.rpartition(".")[0]


def _engine_fused(rules: Fp8Rules, not_converted: list[str]) -> list[str]:
    kept, names = set(not_converted), []
    for engine, members in rules.engine_fused:
        patterns = [NamePattern(member) for member in members]
        for module in not_converted:
            values = patterns[0].match(module)
            if values is not None and all(p.fill(values) in kept for p in patterns):
                names.append(NamePattern(engine).fill(values))
    return names


def check_engine_blocks(gemms: Iterable[Fp8Gemm], shapes: dict[str, tuple[int, ...]], tp: int) -> None:
    """vLLM's ``validate_fp8_block_shape`` (and FusedMoE's block check) at engine size ``tp``:
    split by rows, every per-rank part of a GEMM must be a multiple of the 128-row block (at
    ``tp`` 1, every part of a merged GEMM but the last); split by columns at ``tp`` > 1, the
    per-rank columns a multiple of 128. Raises ExportError naming the first weight that fails."""
    for gemm in gemms:
        first, others = gemm.patterns[0], gemm.patterns[1:]
        for name in shapes:
            values = first.match(name)
            if values is None:
                continue
            members = [name, *(p.fill(values) for p in others)]
            members = [member for member in members if member in shapes]
            _check_gemm(gemm, members, shapes, tp)


def _check_gemm(gemm: Fp8Gemm, members: list[str], shapes: dict[str, tuple[int, ...]], tp: int) -> None:
    if gemm.parallel == "row":
        if tp == 1:
            return
        for name in members:
            cols = shapes[name][-1]
            if cols % tp or (cols // tp) % BLOCK:
                raise _refusal(name, shapes[name], tp, f"{cols} input columns split over {tp} ranks")
        return
    split = tp if gemm.parallel == "column" else 1
    pieces = []
    for name in members:
        rows = shapes[name][-2] // gemm.parts
        if rows % split:
            raise _refusal(name, shapes[name], tp, f"{rows} output rows split over {split} ranks")
        pieces += [(name, rows // split)] * gemm.parts
    checked = pieces if split > 1 else pieces[:-1]  # vLLM lets a merged GEMM's last part end in a partial block
    for name, rows in checked:
        if rows % BLOCK:
            raise _refusal(name, shapes[name], tp, f"a part of {rows} rows per rank")


def _refusal(name: str, shape: tuple[int, ...], tp: int, what: str) -> ExportError:
    return ExportError(f"quantize='fp8' at engine tensor-parallel size {tp}: {name} {tuple(shape)} gives {what}, "
                       f"not a multiple of the {BLOCK}-wide block, which vLLM refuses (validate_fp8_block_shape); "
                       f"pick another engine_tp_size, or engine_tp_size=None to skip the check for other readers")
