"""What a table says about block FP8: which weights the engine runs in FP8, which linears stay bf16.

Data only; :mod:`bridge_ext.fp8_export` applies it. Names are Hugging Face patterns
(``{layer}`` wildcards, :mod:`bridge_ext.patterns`), matched whole: never by substring.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from bridge_ext.patterns import NamePattern

#: How the engine splits a GEMM over its tensor-parallel ranks (vLLM's linear classes):
#: ``column`` (output rows: ColumnParallel / MergedColumnParallel / QKVParallel, MoE gate/up),
#: ``row`` (input columns: RowParallel, MoE down), ``replicated`` (ReplicatedLinear and
#: MergedReplicatedLinear: not split, but still merged).
EngineParallel = Literal["column", "row", "replicated"]


@dataclass(frozen=True)
class Fp8Gemm:
    """Weights the engine runs as one GEMM (vLLM's packed modules, e.g. ``qkv_proj`` from
    ``q_proj``, ``k_proj``, ``v_proj``), in the engine's shard order; each is quantized to FP8.

    Attributes:
        weights: Hugging Face weight-name patterns (a module's ``.weight`` or a fused expert
            parameter such as ``mlp.experts.gate_up_proj``).
        parallel: How the engine splits the GEMM over its tensor-parallel ranks.
        parts: Equal row parts each tensor holds that the engine reads as separate shards with
            their own blocks (fused ``gate_up_proj [E, 2I, H]``: 2).
    """

    weights: tuple[str, ...]
    parallel: EngineParallel
    parts: int = 1
    patterns: tuple[NamePattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.weights, str):
            object.__setattr__(self, "weights", (self.weights,))
        object.__setattr__(self, "patterns", tuple(NamePattern(text) for text in self.weights))


@dataclass(frozen=True)
class Fp8Rules:
    """A table's block-FP8 rules.

    Attributes:
        gemms: The weights quantized, grouped as the engine runs them.
        not_converted: Module-name patterns of the linear layers that stay bf16 (routers,
            shared-expert gates, ``lm_head``, small projections the engine keeps unquantized, MTP
            and vision modules outside the engine's FP8 path). Their full names, as the export
            produces them, form the config's list of modules not converted. Embeddings, norms,
            biases and other tensors of no linear layer stay bf16 without being listed.
        engine_fused: ``(engine module pattern, its Hugging Face module patterns)`` for modules
            the engine fuses and reads its skip list under the fused name (vLLM's Qwen3.5
            ``linear_attn.in_proj_ba`` from ``in_proj_b`` and ``in_proj_a``): listed for the
            engine (``ignored_layers``) when every part stays bf16.
        refused: Set for an architecture whose FP8 format no engine loads: the reason, said
            when FP8 is asked for.
    """

    gemms: tuple[Fp8Gemm, ...] = ()
    not_converted: tuple[str, ...] = ()
    engine_fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    refused: str | None = None
    module_patterns: tuple[NamePattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "module_patterns", tuple(NamePattern(text) for text in self.not_converted))


def fp8_rules(gemms: Iterable[Fp8Gemm], not_converted: Iterable[str],
              engine_fused: Iterable[tuple[str, tuple[str, ...]]] = ()) -> Fp8Rules:
    return Fp8Rules(tuple(gemms), tuple(not_converted), tuple(engine_fused))


def prefixed_gemms(gemms: Iterable[Fp8Gemm], prefix: str) -> list[Fp8Gemm]:
    """The same GEMMs under a name prefix (a decoder layer, a sub-model)."""
    return [Fp8Gemm(tuple(prefix + text for text in gemm.weights), gemm.parallel, gemm.parts) for gemm in gemms]
