"""``bridge-ext convert`` on inputs that used to pass silently or crash: malformed names,
run_config.yaml that is not a file, numbers out of range, configs that lie about fields
shapes cannot see, and ``--overwrite`` of folders that are no earlier output.

Full-message asserts, as in test_convert_bad_input.py, whose helpers these tests share.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from bridge_ext.cli import EXIT_CHECKPOINT, EXIT_MISMATCH, EXIT_OUTPUT_EXISTS
from test_convert_bad_input import ITER, assert_nothing_written, convert, copy_checkpoint, hf_base_copy


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# ---------------------------------------------------------------- malformed names
def test_nul_byte_in_a_data_file_name_is_malformed_metadata(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    metadata_file = root / ITER / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # our own test file
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first].relative_path = "__0_0.distcp\x00x"
    metadata_file.write_bytes(pickle.dumps(metadata))
    code, message = convert(root, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    assert message == (f"error: {metadata_file}: the data file name '__0_0.distcp\\x00x' holds a NUL byte, "
                       "which no file name can"), message
    assert_nothing_written(out)


def test_nul_byte_in_an_index_file_name_is_malformed_input(qwen3_ckpts, qwen3_hf, tmp_path, out):
    from safetensors import safe_open

    base = hf_base_copy(qwen3_hf, tmp_path)
    with safe_open(str(base / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    index = base / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, "model.safetensors\x00x")}))
    code, message = convert(qwen3_ckpts / "adapter", "--hf-base", base, "--model-out", out / "model", "--merge")
    assert code == EXIT_MISMATCH, message
    assert message == (f"error: {index}: the file name 'model.safetensors\\x00x' holds a NUL byte, "
                       "which no file name can"), message
    assert_nothing_written(out)


# ---------------------------------------------------------------- run_config.yaml that is not a file
@pytest.mark.parametrize("kind", ["a directory", "a pipe"])
def test_run_config_that_is_not_a_file_is_named_not_taken_as_absent(qwen3_ckpts, qwen3_hf, tmp_path, out, kind):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    run_config = root / ITER / "run_config.yaml"
    run_config.unlink()
    run_config.mkdir() if kind == "a directory" else os.mkfifo(run_config)
    code, message = convert(root, "--hf-base", qwen3_hf, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    named = "a directory, where a file is expected" if kind == "a directory" else "not a regular file (a pipe)"
    assert message == f"error: {run_config}: {named}", message
    assert_nothing_written(out)


# ---------------------------------------------------------------- numbers
def with_run_config(root: Path, tmp_path: Path, section: str, **changes) -> Path:
    import yaml

    copy = copy_checkpoint(root, tmp_path)
    file = copy / ITER / "run_config.yaml"
    settings = yaml.safe_load(file.read_text())
    settings[section].update(changes)
    file.write_text(yaml.safe_dump(settings))
    return copy


@pytest.mark.parametrize(("field", "value", "wanted"), [
    ("alpha", float("nan"), "nan; it must be a finite number above 0"),
    ("alpha", float("inf"), "inf; it must be a finite number above 0"),
    ("alpha", -8, "-8; it must be a finite number above 0"),
    ("dropout", 7.5, "7.5; it must be a probability from 0 to 1"),
    ("dim", 4.5, "4.5; it must be an integer of at least 1"),
    ("dim", True, "True; it must be an integer of at least 1"),
])
def test_lora_numbers_out_of_range_are_refused(qwen3_ckpts, tmp_path, out, field, value, wanted):
    root = with_run_config(qwen3_ckpts / "lora", tmp_path, "peft", **{field: value})
    code, message = convert(root, "--adapter-out", out / "adapter", "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    assert message == f"error: {root / ITER / 'run_config.yaml'}: peft.{field} is {wanted}", message
    assert_nothing_written(out)


def test_a_live_adapter_config_with_a_nan_alpha_is_refused():
    from types import SimpleNamespace

    from bridge_ext.errors import ExportError
    from bridge_ext.peft_config import _check_lora_numbers
    from bridge_ext.source import Adapter

    adapter = Adapter(module="decoder.layers.0.mlp.linear_fc1", lora_a="a", lora_b="b", alpha=float("nan"),
                      rank=4, dropout=1.5)
    with pytest.raises(ExportError) as refused:
        _check_lora_numbers(adapter)
    assert str(refused.value) == ("LoRA adapter of decoder.layers.0.mlp.linear_fc1: alpha nan (must be a finite "
                                  "number above 0), dropout 1.5 (must be a probability from 0 to 1); "
                                  "PEFT cannot load it")
    _check_lora_numbers(SimpleNamespace(module="m", rank=4, alpha=8.0, dropout=0.1))  # accepted


def test_a_config_with_a_nan_is_not_written_as_non_standard_json(qwen3_ckpts, qwen3_hf, tmp_path, out):
    base = hf_base_copy(qwen3_hf, tmp_path)
    settings = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**settings, "initializer_range": float("nan")}))
    code, message = convert(qwen3_ckpts / "dense", "--hf-base", base, "--model-out", out / "model")
    assert code == EXIT_MISMATCH, message
    assert message == ("error: the Hugging Face config holds a non-finite number (initializer_range = nan); "
                       "config.json would not be standard JSON"), message
    assert_nothing_written(out)


# ---------------------------------------------------------------- the Megatron side is the reference
def test_verify_compares_the_written_config_with_run_config(qwen3_ckpts, qwen3_hf, tmp_path):
    from bridge_ext.checkpoint import CheckpointReader
    from bridge_ext.convert import ConvertResult, verify_conversion
    from bridge_ext.errors import VerificationError

    run_config = CheckpointReader(qwen3_ckpts / "dense").run_config
    written = hf_base_copy(qwen3_hf, tmp_path)  # what a conversion of this checkpoint writes
    result = ConvertResult(written, None, qwen3_ckpts / "dense", False, 0, 0, 0.0)
    report = verify_conversion(result, run_config=run_config)
    assert any(line.startswith(f"{written / 'config.json'} matches run_config.yaml in all ") for line in report.lines)
    settings = json.loads((written / "config.json").read_text())
    (written / "config.json").write_text(json.dumps({**settings, "hidden_act": "gelu"}))
    with pytest.raises(VerificationError) as refused:
        verify_conversion(result, run_config=run_config)
    assert str(refused.value) == (
        f"{written / 'config.json'} describes another model than the checkpoint's {run_config.path} (converting "
        "would silently compute something else): activation: config.json has hidden_act = 'gelu' "
        "(torch.nn.functional.gelu), run_config.yaml has activation_func = 'torch.nn.functional.silu'. "
        "Use the Hugging Face config of the model that was trained.")


CONFIG_LIES = {  # the reproductions: exit 0 and a wrong model before; shapes all agree
    "activation": ({"hidden_act": "gelu"},
                   "activation: config.json has hidden_act = 'gelu' (torch.nn.functional.gelu), run_config.yaml has "
                   "activation_func = 'torch.nn.functional.silu'"),
    "rope scaling": ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
                     "rotary embedding: config.json has rope_parameters.rope_type = 'linear', run_config.yaml has "
                     "position_embedding_type = 'default' (position_embedding_type = 'rope', rope_scaling = False)"),
    "sliding window": ({"use_sliding_window": True, "sliding_window": 4, "layer_types": ["sliding_attention"] * 2},
                       "sliding window: config.json has sliding_window = 4, run_config.yaml has window_size = None"),
}


@pytest.mark.parametrize("lie", CONFIG_LIES)
def test_a_base_config_that_lies_about_what_shapes_cannot_see_is_refused(qwen3_ckpts, qwen3_hf, tmp_path, out, lie):
    change, named = CONFIG_LIES[lie]
    base = hf_base_copy(qwen3_hf, tmp_path)
    settings = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**settings, **change}))
    code, message = convert(qwen3_ckpts / "dense", "--hf-base", base, "--model-out", out / "model", "--verify")
    assert code == EXIT_MISMATCH, message
    assert message == (f"error: {base / 'config.json'} describes another model than the checkpoint's "
                       f"{qwen3_ckpts / 'dense' / ITER / 'run_config.yaml'} (converting would silently compute "
                       f"something else): {named}. Use the Hugging Face config of the model that was trained."), message
    assert_nothing_written(out)


# ---------------------------------------------------------------- --overwrite replaces only an earlier output
def test_overwrite_refuses_a_folder_that_is_no_earlier_output(qwen3_ckpts, out):
    home = out / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("secret")
    for name in (".bashrc", "notes.txt", "config.json"):
        (home / name).write_text("mine")
    code, message = convert(qwen3_ckpts / "dense", "--model-out", home, "--overwrite")
    assert code == EXIT_OUTPUT_EXISTS, message
    assert message == (f"error: {home} holds what no Hugging Face model or PEFT adapter folder holds (.bashrc, .ssh/, "
                       "notes.txt): --overwrite replaces only an earlier output; move those away, or pass "
                       "--overwrite-any to replace the folder whatever it holds"), message
    assert (home / ".ssh" / "id_rsa").read_text() == "secret" and sorted(os.listdir(home)) == [
        ".bashrc", ".ssh", "config.json", "notes.txt"]
    assert_nothing_written(out, "home")


def test_overwrite_replaces_an_earlier_output_and_says_so(qwen3_ckpts, out):
    model = out / "model"
    code, message = convert(qwen3_ckpts / "dense", "--model-out", model)
    assert code == 0, message
    before = sorted(os.listdir(model))
    code, message = convert(qwen3_ckpts / "dense", "--model-out", model, "--overwrite")
    assert code == 0, message
    assert (f"replaced {model}: the folder that was there ({len(before)} entries: {', '.join(before[:6])}"
            f"{', ...' if len(before) > 6 else ''}) was deleted") in message, message
    assert sorted(os.listdir(model)) == before
    assert_nothing_written(out, "model")


def test_a_signal_during_the_install_says_the_output_is_installed(qwen3_ckpts, out, monkeypatch):
    import signal

    from bridge_ext import output_folder

    model = out / "model"
    assert convert(qwen3_ckpts / "dense", "--model-out", model)[0] == 0
    install = output_folder._install

    def signalled_while_renaming(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # held back until the renames are done
        return install(*args, **kwargs)

    monkeypatch.setattr(output_folder, "_install", signalled_while_renaming)
    code, message = convert(qwen3_ckpts / "dense", "--model-out", model, "--overwrite")
    assert code == 128 + signal.SIGTERM, message
    (kept,) = [path for path in out.iterdir() if path.name.startswith(".model.replaced-")]
    assert message == (f"note: {model} was installed, complete, before the signal arrived; the folder it replaced "
                       f"is kept at {kept}: remove it (or move it back) yourself error: stopped by SIGTERM: the "
                       "outputs were installed, complete (see the notes)"), message
    assert (model / "config.json").is_file() and (kept / "config.json").is_file()


def test_a_reader_that_leaves_early_does_not_fail_a_conversion(qwen3_ckpts, out):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    convert_command = [sys.executable, "-c", "from bridge_ext.cli import main; main()", "convert",
                       str(qwen3_ckpts / "dense"), "--model-out", str(out / "model")]
    script = " ".join(f"'{part}'" for part in convert_command) + " | true; exit ${PIPESTATUS[0]}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and (out / "model" / "config.json").is_file()


def test_a_long_output_name_gets_a_staging_name_that_fits(qwen3_ckpts, out):
    model = out / ("m" * 240)  # 240 bytes: a legal name, 270 with the staging marks
    code, message = convert(qwen3_ckpts / "dense", "--model-out", model)
    assert code == 0, message
    assert (model / "config.json").is_file()
    code, message = convert(qwen3_ckpts / "dense", "--model-out", model, "--overwrite")
    assert code == 0, message
    assert sorted(os.listdir(out)) == [model.name]


def test_a_config_json_linked_from_outside_carries_none_of_its_own_keys(qwen3_ckpts, qwen3_hf, tmp_path, out):
    base = hf_base_copy(qwen3_hf, tmp_path)
    outside = tmp_path / "elsewhere.json"
    settings = json.loads((base / "config.json").read_text())
    outside.write_text(json.dumps({**settings, "api_token": "hunter2"}))
    (base / "config.json").unlink()
    (base / "config.json").symlink_to(outside)
    code, message = convert(qwen3_ckpts / "dense", "--hf-base", base, "--model-out", out / "model")
    assert code == 0, message
    assert (f"note not copied from {base}: config.json (a symbolic link to {outside.resolve()}, outside {base}); written from the "
            "fields transformers' Qwen3Config defines (1 other keys of it left out, e.g. api_token)") in message, message
    written = json.loads((out / "model" / "config.json").read_text())
    assert "api_token" not in written and written["num_attention_heads"] == settings["num_attention_heads"]


def test_moe_routing_normalisation_is_cross_checked(qwen3_ckpts):
    from dataclasses import replace

    from transformers import Qwen3MoeConfig

    from bridge_ext.checkpoint import CheckpointReader
    from bridge_ext.checkpoint.config_check import ConfigMismatchError, check_config_matches_run_config

    recorded = CheckpointReader(qwen3_ckpts / "dense").run_config
    trained = replace(recorded, model={**recorded.model, "num_moe_experts": 8, "moe_ffn_hidden_size": 32,
                                       "moe_router_topk": 2, "moe_router_pre_softmax": False})

    def moe_config(normalised: bool) -> Qwen3MoeConfig:
        return Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                              num_experts=8, moe_intermediate_size=32, num_experts_per_tok=2,
                              norm_topk_prob=normalised)

    check_config_matches_run_config(moe_config(True), trained, "moe/config.json")  # softmax after top-k: sums to 1
    with pytest.raises(ConfigMismatchError) as refused:
        check_config_matches_run_config(moe_config(False), trained, "moe/config.json")
    assert ("mixture of experts: config.json has norm_topk_prob = False (top-k weights not summing to one), "
            "run_config.yaml has moe_router_pre_softmax = False with moe_router_score_function = 'softmax' (top-k "
            "weights summing to one)") in str(refused.value)
