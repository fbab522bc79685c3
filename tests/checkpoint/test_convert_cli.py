"""The ``bridge-ext convert`` command: help, summary, progress, --verify; and the convert demo."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from bridge_ext.cli import convert, main
from bridge_ext.convert import convert_checkpoint
from bridge_ext_testing.convert_demo import run_convert_demo


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["convert", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_help_documents_every_option_examples_and_exit_codes():
    code, text = invoke("--help")
    assert code == 0
    options = [opt for param in convert.params if isinstance(param, click.Option)
               for opt in (*param.opts, *param.secondary_opts)]
    assert len(options) >= 14
    assert [opt for opt in options if opt not in text] == []
    assert all(param.help for param in convert.params if isinstance(param, click.Option))
    assert "Examples:" in text and text.count("bridge-ext convert ") >= 4
    codes = re.findall(r"^\s+(\d)\s+\S", text.split("Exit codes:")[1], flags=re.M)
    assert codes == ["0", "1", "2", "3", "4", "5", "6", "7", "8"]
    assert "128+n" in text


def test_convert_prints_a_summary_and_verifies(qwen3_ckpts, qwen3_hf, tmp_path):
    code, text = invoke(qwen3_ckpts / "lora", "--hf-base", qwen3_hf, "--model-out", tmp_path / "m",
                        "--adapter-out", tmp_path / "a", "--verify", "--progress")
    assert code == 0, text
    assert re.search(r"53 tensors, [\d.]+ MiB in [\d.]+ s \([\d.]+ MiB/s\)", text), text
    assert "ok  transformers loaded" in text and "nothing missing or unexpected" in text
    assert "ok  PEFT loaded 28 adapter tensors: no missing, no unexpected key" in text
    assert "all finite" in text


def test_progress_total_is_what_gets_written(qwen3_ckpts, qwen3_hf, tmp_path):
    for root, outputs in ((qwen3_ckpts / "lora", {"model_dir": tmp_path / "m", "adapter_dir": tmp_path / "a"}),
                          (qwen3_ckpts / "adapter", {"adapter_dir": tmp_path / "b"}),
                          (qwen3_ckpts / "adapter", {"model_dir": tmp_path / "c", "merge": True})):
        totals, written = [], []
        result = convert_checkpoint(root, hf_base=qwen3_hf, on_start=totals.append,
                                    on_tensor=lambda name, nbytes: written.append(nbytes), **outputs)
        assert totals == [len(written)] == [result.tensors] and sum(written) == result.bytes


def test_convert_demo_on_qwen3(tmp_path):
    lines = []
    report = run_convert_demo(tmp_path, lines.append, example="qwen3")
    assert any("bit-exact" in line for line in report.lines)
    assert any("transformers + PEFT vs the saved Megatron model" in line for line in report.lines)
    assert (tmp_path / "checkpoints" / "adapter-only" / "latest_checkpointed_iteration.txt").is_file()
    assert any(line.startswith("  ok  ") for line in lines)


def test_demo_without_the_test_support_package_names_it_and_exits_8(monkeypatch):
    import sys

    class NotInstalled:  # finds bridge_ext_testing nowhere, as where it is not installed
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "bridge_ext_testing":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    for name in [name for name in sys.modules if name.split(".")[0] == "bridge_ext_testing"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [NotInstalled, *sys.meta_path])
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 8, result.output
    assert result.output.strip().splitlines() == [
        "error: the demo needs the test-support package bridge_ext_testing, which is not installed: "
        "run `bash scripts/install.sh` in a clone of the repository"]


def _documented_family_codes() -> dict[str, int]:
    """docs/convert.md's table of error family -> exit code."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "convert.md").read_text()
    return {name: int(code) for name, code in re.findall(r"^\| `(\w+Error)` \| (\d+) \|$", text, flags=re.M)}


def test_every_error_family_has_a_documented_exit_code():
    from bridge_ext import errors

    families = {name for name, value in vars(errors).items() if isinstance(value, type)
                and issubclass(value, errors.BridgeExtError) and value is not errors.BridgeExtError}
    assert families and families == set(_documented_family_codes())


@pytest.mark.parametrize(("family", "code"), sorted(_documented_family_codes().items()))
def test_convert_exits_with_the_documented_code_of_each_error_family(family, code, monkeypatch, tmp_path):
    import bridge_ext.convert
    from bridge_ext import errors

    error_class = getattr(errors, family)
    try:
        error = error_class(f"a {family} for the test")
    except TypeError:  # the families that name their path
        error = error_class(f"a {family} for the test", tmp_path)

    def raising(*args, **kwargs):
        raise error

    monkeypatch.setattr(bridge_ext.convert, "convert_checkpoint", raising)
    status, output = invoke(tmp_path / "ckpt", "--model-out", tmp_path / "out")
    assert status == code, output
    assert output.strip().splitlines()[-1].endswith(f"a {family} for the test"), output


def test_the_library_refuses_to_write_nothing_with_one_error(tmp_path):
    from bridge_ext import ConvertError, save_hf_pretrained

    for call in (lambda: save_hf_pretrained(object()), lambda: convert_checkpoint(tmp_path / "nowhere")):
        with pytest.raises(ConvertError, match=r"^nothing to write: give model_dir, adapter_dir or both$"):
            call()
