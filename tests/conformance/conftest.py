"""The contract's parametrisation: every check over the entries it applies to, one build per entry."""

from __future__ import annotations

import pytest

from .memo import Memo
from .registry import BY_NAME, ENTRIES


def too_old(entry) -> str | None:
    """Why the installed transformers cannot run the entry (the compatibility job's oldest step)."""
    import transformers
    from packaging.version import Version

    if entry.needs_transformers is None:
        return None
    version, reason = entry.needs_transformers
    return reason if Version(transformers.__version__) < Version(version) else None


def pytest_generate_tests(metafunc) -> None:
    """A check taking ``built`` runs on each entry its ``applies`` predicate keeps (all by
    default); an entry's known exception for the check is a skip carrying the entry's reason."""
    if "built" not in metafunc.fixturenames:
        return
    applies = getattr(metafunc.function, "applies", lambda entry: True)
    params = []
    for entry in ENTRIES:
        if not applies(entry):
            continue
        reason = entry.exceptions.get(metafunc.function.__name__) or too_old(entry)
        marks = [pytest.mark.skip(reason=f"{entry.name}: {reason}")] if reason else []
        params.append(pytest.param(entry.name, id=entry.name, marks=marks))
    metafunc.parametrize("built", params, indirect=True, scope="module")


@pytest.fixture(scope="module")
def built(request, megatron_cpu, tmp_path_factory):
    """The entry's Megatron model, built from its tiny Hugging Face model, LoRA values set."""
    from bridge_ext_testing.build import build_megatron_model

    entry = BY_NAME[request.param]
    hf_dir = entry.make(tmp_path_factory.mktemp(entry.name) / "hf")
    model = build_megatron_model(hf_dir, lora=entry.lora)
    model.entry, model.memo, model.folder = entry, Memo(), tmp_path_factory.mktemp(f"{entry.name}_out")
    entry.values(model)
    return model
