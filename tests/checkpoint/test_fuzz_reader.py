"""Random damage to a real tiny checkpoint: every outcome is a clean error or the right conversion.

Seeded and bounded: bit flips, truncations and byte insertions in ``.metadata``, in the
``.distcp`` records and in ``run_config.yaml`` of the tiny Qwen3 checkpoint, each converted
in-process. An outcome passes when it is a :class:`~bridge_ext.errors.BridgeExtError` (the CLI
turns those into its exit codes) or a folder equal, tensor for tensor, to the conversion of the
undamaged checkpoint. Any other exception fails the test, listing every case that produced one.
A bit flipped inside a tensor's values must be refused too: the reader checks each record's CRC-32.
Besides the real checkpoint, the seeds include the crafted shapes of :mod:`hostile_factory`
(staggered chunks, a chunk repeated through the memo, a view of a larger storage), smaller.
"""

from __future__ import annotations

import math
import pickle
import random
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hostile_factory
from bridge_ext.checkpoint import CheckpointError, safe_unpickle
from bridge_ext.convert import convert_checkpoint
from bridge_ext.errors import BridgeExtError

ITER = "iter_0000010"
SEED = 20261130
CASES_PER_FILE_KIND = 75  # .metadata and the .distcp
RUN_CONFIG_CASES = 30


@dataclass(frozen=True)
class Mutation:
    file: str  # name inside the iteration folder
    kind: str  # "flip", "truncate" or "insert"
    position: int
    detail: int  # bit for a flip, byte count for an insertion

    def apply(self, data: bytes) -> bytes:
        if self.kind == "flip":
            return data[: self.position] + bytes([data[self.position] ^ (1 << self.detail)]) + data[self.position + 1:]
        if self.kind == "truncate":
            return data[: self.position]
        inserted = random.Random(self.position).randbytes(self.detail)
        return data[: self.position] + inserted + data[self.position:]


def mutations(rng: random.Random, file: str, size: int, count: int) -> list[Mutation]:
    found = []
    for _ in range(count):
        kind = rng.choice(["flip", "flip", "truncate", "insert"])
        position = rng.randrange(size)
        detail = rng.randrange(8) if kind == "flip" else rng.randrange(1, 9)
        found.append(Mutation(file, kind, position, detail))
    return found


def written(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def crafted_seed(kind: str, folder: Path) -> None:
    """The issue-#27 shapes, small: staggered chunks, a chunk repeated through the memo, a view of a larger storage."""
    if kind == "staggered":
        hostile_factory.add_staggered_tensor(folder, rows=8, columns=100)
    elif kind == "memo":
        hostile_factory.repeat_chunk(folder, "decoder.final_layernorm.weight", 5000)
    elif kind == "view":
        hostile_factory.view_of_large_storage(folder, "decoder.final_layernorm.weight", storage_bytes=1 << 20)


SEEDS = {"real": CASES_PER_FILE_KIND, "staggered": 15, "memo": 15, "view": 15}  # seed: cases per file kind


@pytest.mark.parametrize("seed", SEEDS)
def test_damaged_checkpoints_fail_cleanly_or_convert_correctly(qwen3_ckpts, tmp_path, seed):
    source = tmp_path / "seed"
    shutil.copytree(qwen3_ckpts / "dense", source)
    crafted_seed(seed, source / ITER)
    try:  # the seed itself: the real one and the view convert; the staggered and memo ones are refused
        expected = written(convert_checkpoint(source, model_dir=tmp_path / "expected").model_dir)
    except BridgeExtError:
        expected = written(convert_checkpoint(qwen3_ckpts / "dense", model_dir=tmp_path / "expected").model_dir)
    folder = source / ITER
    rng = random.Random(SEED)
    count = SEEDS[seed]
    cases = mutations(rng, ".metadata", (folder / ".metadata").stat().st_size, count)
    cases += mutations(rng, "__0_0.distcp", (folder / "__0_0.distcp").stat().st_size, count)
    cases += mutations(rng, "run_config.yaml", (folder / "run_config.yaml").stat().st_size,
                       RUN_CONFIG_CASES * count // CASES_PER_FILE_KIND)

    started = time.perf_counter()
    outcomes: dict[str, int] = {}
    failures = []
    for number, mutation in enumerate(cases):
        root = tmp_path / f"case{number}"
        shutil.copytree(source, root)
        target = root / ITER / mutation.file
        target.write_bytes(mutation.apply(target.read_bytes()))
        try:
            result = convert_checkpoint(root, model_dir=tmp_path / f"out{number}")
        except BridgeExtError as error:
            outcome = f"refused: {type(error).__name__}"
        except Exception as error:  # noqa: BLE001 - the finding this test exists for
            failures.append(f"{mutation}: {type(error).__name__}: {error}")
            continue
        else:
            if not same(written(result.model_dir), expected):
                failures.append(f"{mutation}: converted, but the values differ from the undamaged checkpoint's")
                continue
            outcome = "converted identically"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(root)
    elapsed = time.perf_counter() - started
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    assert sum(outcomes.values()) == len(cases)
    assert any(name.startswith("refused") for name in outcomes), outcomes  # the damage was noticed at all
    print(f"{len(cases)} damaged checkpoints in {elapsed:.1f} s: {outcomes}")  # real seed: about 10 s on 2 idle cores


@pytest.mark.parametrize("seed, count", [("real", 600), ("staggered", 100), ("memo", 100)])
def test_allowlisted_unpickler_survives_random_damage(qwen3_ckpts, tmp_path, seed, count):
    """Mutated copies of a real .metadata, and of the crafted ones (flips, cuts, insertions, repeated slices)."""
    folder = tmp_path / "seed"
    shutil.copytree(qwen3_ckpts / "dense" / ITER, folder)
    crafted_seed(seed, folder)
    real = (folder / ".metadata").read_bytes()
    rng = random.Random(SEED)
    loaded = refused = 0
    started = time.perf_counter()
    for _ in range(count):
        data = bytearray(real)
        for _ in range(rng.randrange(1, 4)):
            operation = rng.randrange(4)
            position = rng.randrange(len(data))
            if operation == 0:
                data[position] ^= 1 << rng.randrange(8)
            elif operation == 1:
                del data[position:]
            elif operation == 2:
                data[position:position] = rng.randbytes(rng.randrange(1, 6))
            else:  # repeat a slice: opcode sequences out of context (marks, memo, nesting)
                length = rng.randrange(1, 64)
                data[position:position] = data[position:position + length] * rng.randrange(2, 50)
            if not data:
                data = bytearray(b".")
        try:
            safe_unpickle(bytes(data), "fuzz.metadata")
            loaded += 1
        except CheckpointError:
            refused += 1
    assert loaded + refused == count and refused > 0
    print(f"{count} damaged pickles in {time.perf_counter() - started:.1f} s: {loaded} loaded, {refused} refused")


@pytest.mark.parametrize("depth", [101, 5000])
def test_unpickler_refuses_nesting_through_late_filling(depth):
    """Lists built first and nested afterwards (APPEND on memoised lists): the depth is still seen."""
    lists = depth + 1  # list 0 holds list 1 ... holds list ``depth``: nested ``depth`` deep
    body = b"\x80\x04" + b"]\x94" * lists
    for number in range(lists - 1):
        body += b"j" + struct.pack("<I", number) + b"j" + struct.pack("<I", number + 1) + b"a0"
    data = body + b"j" + struct.pack("<I", 0) + b"."
    with pytest.raises(CheckpointError, match=f"objects nested {depth} deep"):
        safe_unpickle(data)
    assert pickle.loads(data)  # what the check prevents building: a real nested list


# Hostile values in every field the reader takes a name or a number from: file names with NUL
# bytes and other characters no data file has, and NaN, infinities, huge and negative numbers.
HOSTILE_NAMES = ["__0_0.distcp\x00", "\x00", "__0_0.distcp\x00../x", "", ".", "..", "../__0_0.distcp",
                 "/etc/passwd", "a\\b", "__0_0.distcp/"]
HOSTILE_NUMBERS = [float("nan"), float("inf"), -float("inf"), 2**63, 10**30, -1, -(2**63), 0.5, True, "7"]


def _metadata_field_mutations(rng: random.Random) -> list[tuple[str, object]]:
    """(field, value) pairs: one hostile value in one field of one entry of the .metadata."""
    cases = [("storage.relative_path", name) for name in HOSTILE_NAMES]
    for field in ("storage.offset", "storage.length", "chunk.offsets", "chunk.sizes", "tensor.size"):
        cases += [(field, number) for number in rng.sample(HOSTILE_NUMBERS, 5)]
    return cases


def _mutate_metadata(metadata, field: str, value, rng: random.Random) -> None:
    kind, _, attribute = field.partition(".")
    if kind == "storage":
        info = metadata.storage_data[rng.choice(sorted(metadata.storage_data, key=str))]
        setattr(info, attribute, value)
        return
    tensors = [m for m in metadata.state_dict_metadata.values() if hasattr(m, "chunks") and m.chunks]
    tensor = rng.choice(tensors)
    if kind == "tensor":
        tensor.size = (value, *tuple(tensor.size)[1:])
    else:
        chunk = rng.choice(tensor.chunks)
        old = tuple(getattr(chunk, attribute))
        setattr(chunk, attribute, (value, *old[1:]))


def _peft_accepts(field: str, value) -> bool:
    """Whether PEFT loads an adapter with this LoRA number (dim must also be the stored rank: refused)."""
    number = type(value) in (int, float) and math.isfinite(value)
    return number and (0 < value if field == "peft.alpha" else 0 <= value <= 1 if field == "peft.dropout" else False)


def test_hostile_names_and_numbers_in_metadata_and_run_config_fail_cleanly(qwen3_ckpts, tmp_path):
    import yaml

    source = qwen3_ckpts / "lora"
    rng = random.Random(SEED + 1)
    metadata = (source / ITER / ".metadata").read_bytes()
    cases: list[tuple[str, object]] = _metadata_field_mutations(rng)
    cases += [(f"peft.{name}", number) for name in ("alpha", "dim", "dropout") for number in HOSTILE_NUMBERS]
    expected = written(convert_checkpoint(source, adapter_dir=tmp_path / "expected").adapter_dir)
    failures, refused = [], 0
    for number, (field, value) in enumerate(cases):
        root = tmp_path / f"case{number}"
        shutil.copytree(source, root)
        if field.startswith("peft."):
            file = root / ITER / "run_config.yaml"
            settings = yaml.safe_load(file.read_text())
            settings["peft"][field.removeprefix("peft.")] = value
            file.write_text(yaml.safe_dump(settings))
        else:
            loaded = pickle.loads(metadata)  # our own test file
            _mutate_metadata(loaded, field, value, rng)
            (root / ITER / ".metadata").write_bytes(pickle.dumps(loaded))
        try:
            result = convert_checkpoint(root, adapter_dir=tmp_path / f"out{number}")
        except BridgeExtError:
            refused += 1
        except Exception as error:  # noqa: BLE001 - the finding this test exists for
            failures.append(f"{field} = {value!r}: {type(error).__name__}: {error}")
        else:
            # a damaged entry of a tensor an adapter export does not read changes nothing; a LoRA
            # number is written only when PEFT accepts it (a huge alpha is finite and positive)
            accepted = _peft_accepts(field, value) if field.startswith("peft.") \
                else same(written(result.adapter_dir), expected)
            if not accepted:
                failures.append(f"{field} = {value!r}: converted")
        shutil.rmtree(root)
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    assert refused > len(cases) // 2
