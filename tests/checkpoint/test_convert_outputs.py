"""``bridge-ext convert`` never destroys or corrupts data at or around its outputs.

Dangerous targets are refused, an old folder is replaced only by renames (and put back when
anything fails), a target that appears meanwhile is never replaced, outputs honour the umask,
errors of the filesystem and stop signals leave nothing partial behind, and files of the config
folder are copied only when they are regular files inside it. Most cases run the command in
this process; signals, two concurrent runs, the file size limit and a full tmpfs need processes
of their own: they are started together (``background_runs``), those to be signalled paused
mid-write by ``convert_slowly.py``.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError
from safetensors.torch import load_file

from bridge_ext import cli, output_folder, verify
from bridge_ext import convert as convert_module
from bridge_ext.cli import EXIT_OUTPUT_EXISTS, EXIT_OUTPUT_IO, EXIT_USAGE, EXIT_VERIFY, main
from bridge_ext.errors import OutputLocationError
from bridge_ext.output_folder import STAGING_MARK, atomic_directory, check_output_target, sweep_stale_staging
from bridge_ext.save import ShardedSafetensorsWriter, companion_refusal, copy_companion_files

HERE = Path(__file__).parent
REPO = HERE.parent.parent
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors"]  # of the dense checkpoint
DENSE_TENSORS = 25
FILE_SIZE_LIMIT = 100_000  # bytes; the dense model's safetensors file is about 315 kB


def run(*args: str | Path) -> tuple[int, str]:
    """``bridge-ext convert ARGS`` in this process: exit code and output (stdout and stderr), unwrapped."""
    result = CliRunner().invoke(main, ["convert", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, " ".join(result.output.split())


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def staging_folders(parent: Path) -> list[Path]:
    return sorted(path for path in parent.iterdir() if STAGING_MARK in path.name)


@pytest.fixture
def out(tmp_path) -> Path:
    """The output parent: must hold nothing but what a test put there."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def make_undeletable(path: Path) -> None:
    """Immutable for root (chattr +i), a read-only parent folder otherwise."""
    if os.geteuid() != 0:
        path.parent.chmod(0o555)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root where chattr +i does not work: nothing can be made unremovable for root")


def make_deletable(path: Path) -> None:
    if os.geteuid() != 0:
        path.parent.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@contextmanager
def read_only_folder(folder: Path):
    """Make ``folder`` refuse new entries: immutable for root, mode 0555 otherwise."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
    else:
        make_undeletable(folder)
    try:
        yield
    finally:
        folder.chmod(0o755) if os.geteuid() != 0 else make_deletable(folder)


# -- refused targets ---------------------------------------------------------------------------


@pytest.mark.parametrize("target, cwd", [(".", "work"), ("..", "work/inner")])
def test_the_working_directory_or_its_parent_is_refused_even_with_overwrite(qwen3_ckpts, out, monkeypatch,
                                                                             target, cwd):
    (out / cwd).mkdir(parents=True)
    (out / "work" / "keep.txt").write_text("mine")
    monkeypatch.chdir(out / cwd)
    code, message = run(qwen3_ckpts / "dense", "--model-out", target, "--overwrite")
    assert code == EXIT_USAGE and "working directory" in message, message
    assert (out / "work" / "keep.txt").read_text() == "mine"
    assert listing(out) == ["work"] and listing(out / "work") == sorted(["keep.txt", *cwd.split("/")[1:]])


def test_the_filesystem_root_is_refused():
    with pytest.raises(OutputLocationError, match="filesystem root"):
        check_output_target(Path("/"), overwrite=True)


@pytest.mark.parametrize("input_option", ["checkpoint", "--hf-config"])
def test_a_folder_holding_an_input_is_refused_even_with_overwrite(qwen3_ckpts, qwen3_hf, tmp_path, input_option):
    inputs = tmp_path / "inputs"
    shutil.copytree(qwen3_ckpts / "dense", inputs / "ckpt")
    shutil.copy(qwen3_hf / "config.json", inputs / "config.json")
    config = ["--hf-config", inputs / "config.json"] if input_option == "--hf-config" else []
    checkpoint = inputs / "ckpt" if input_option == "checkpoint" else qwen3_ckpts / "dense"
    before = sorted(str(path.relative_to(inputs)) for path in inputs.rglob("*"))
    code, message = run(checkpoint, *config, "--model-out", inputs, "--overwrite")
    assert code == EXIT_USAGE and "would overlap the input" in message, message
    assert sorted(str(path.relative_to(inputs)) for path in inputs.rglob("*")) == before
    assert [path for path in tmp_path.iterdir() if path.name != "inputs"] == []


@pytest.mark.parametrize("model, adapter", [("m", "m/adapter"), ("a/model", "a")])
def test_nested_outputs_are_refused(qwen3_ckpts, out, model, adapter):
    top = out / Path(model).parts[0]
    top.mkdir()
    (top / "keep.txt").write_text("mine")
    code, message = run(qwen3_ckpts / "lora", "--model-out", out / model, "--adapter-out", out / adapter, "--overwrite")
    assert code == EXIT_USAGE and "is inside the output folder" in message, message
    assert listing(out) == [top.name] and listing(top) == ["keep.txt"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_an_output_that_is_a_symlink_is_refused_not_followed(qwen3_ckpts, out, tmp_path, overwrite):
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (out / "model").symlink_to(unrelated)
    code, message = run(qwen3_ckpts / "dense", "--model-out", out / "model", *overwrite)
    assert code == EXIT_USAGE and f"{out / 'model'} is a symbolic link" in message, message
    assert (out / "model").is_symlink() and listing(out) == ["model"] and listing(unrelated) == []


def test_an_output_parent_that_is_not_writable(qwen3_ckpts, out):
    locked = out / "locked"
    locked.mkdir()
    with read_only_folder(locked):
        code, message = run(qwen3_ckpts / "dense", "--model-out", locked / "model")
    assert code == EXIT_OUTPUT_IO and f"cannot create {locked / 'model'}" in message, message
    assert "Traceback" not in message and listing(locked) == []


@pytest.mark.parametrize("size", ["infB", "1e400B", "nanB", "1e100B", "0", "-1GB", "0.5B"])
def test_absurd_shard_sizes_are_usage_errors(qwen3_ckpts, out, size):
    code, message = run(qwen3_ckpts / "dense", "--model-out", out / "model", "--max-shard-size", size)
    assert code == EXIT_USAGE and "--max-shard-size" in message and "1 byte to 1 PiB" in message, message
    assert listing(out) == []


# -- replacing and installing ------------------------------------------------------------------


def test_overwrite_keeps_an_old_folder_it_cannot_remove_whole(qwen3_ckpts, out):
    old = out / "model"
    (old / "sub").mkdir(parents=True)
    old_files = ["a.safetensors", "b.safetensors", "sub/locked.bin"]
    for name in old_files:
        (old / name).write_text("old")
    make_undeletable(old / "sub" / "locked.bin")
    try:
        code, message = run(qwen3_ckpts / "dense", "--model-out", old, "--overwrite-any")
    finally:
        kept = [path for path in out.iterdir() if path.name.startswith(".model.replaced-")]
        make_deletable((kept[0] if kept else old) / "sub" / "locked.bin")
    kept_files = sorted(str(p.relative_to(kept[0])) for p in kept[0].rglob("*") if p.is_file()) if kept else []
    assert code == 0, message
    assert listing(old) == MODEL_FILES
    assert len(kept) == 1 and kept_files == old_files
    assert f"the replaced folder was kept whole at {kept[0]}" in message and "remove it yourself" in message
    shutil.rmtree(kept[0])


def test_a_failed_install_puts_the_old_folder_back(qwen3_ckpts, out, monkeypatch):
    old = out / "model"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    rename = output_folder.rename_noreplace

    def refuse_the_new_folder(source: Path, destination: Path) -> None:
        if STAGING_MARK in Path(source).name and Path(destination) == old:
            raise PermissionError(errno.EACCES, "Permission denied", str(destination))
        rename(source, destination)

    monkeypatch.setattr(output_folder, "rename_noreplace", refuse_the_new_folder)
    code, message = run(qwen3_ckpts / "dense", "--model-out", old, "--overwrite-any")
    assert code == EXIT_OUTPUT_IO and "permission denied" in message and "nothing was installed" in message, message
    assert listing(out) == ["model"] and (old / "keep.txt").read_text() == "mine" and listing(old) == ["keep.txt"]


@pytest.mark.parametrize("appearing", ["a folder with a file", "an empty folder", "a folder replacing the old one"])
def test_an_output_that_appears_meanwhile_is_never_replaced(qwen3_ckpts, out, monkeypatch, appearing):
    target = out / "model"
    overwrite = []
    if appearing == "a folder replacing the old one":
        target.mkdir()
        (target / "old.txt").write_text("old")
        overwrite = ["--overwrite-any"]
    theirs = []

    def someone_writes_the_target(bar, name: str, nbytes: int) -> None:
        if not theirs:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            if appearing != "an empty folder":
                (target / "theirs.txt").write_text("theirs")
            theirs.append(target.stat().st_ino)

    monkeypatch.setattr(cli._ProgressBar, "advance", someone_writes_the_target)
    code, message = run(qwen3_ckpts / "dense", "--model-out", target, *overwrite)
    assert code == EXIT_OUTPUT_EXISTS and "during the conversion" in message, message
    assert target.stat().st_ino == theirs[0] and listing(out) == ["model"]
    assert listing(target) == ([] if appearing == "an empty folder" else ["theirs.txt"])


def test_both_outputs_are_installed_or_neither(qwen3_ckpts, out, monkeypatch):
    (out / "model").mkdir()
    (out / "model" / "old.txt").write_text("old")

    def the_adapter_target_appears(bar, name: str, nbytes: int) -> None:
        (out / "adapter").mkdir(exist_ok=True)
        (out / "adapter" / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(cli._ProgressBar, "advance", the_adapter_target_appears)
    code, message = run(qwen3_ckpts / "lora", "--model-out", out / "model", "--adapter-out", out / "adapter",
                        "--overwrite-any")
    assert code == EXIT_OUTPUT_EXISTS and f"{out / 'adapter'} appeared during the conversion" in message, message
    assert listing(out) == ["adapter", "model"]  # the model folder installed first was taken back out
    assert listing(out / "model") == ["old.txt"] and listing(out / "adapter") == ["theirs.txt"]


@pytest.mark.parametrize("renameat2", ["renameat2", "fallback without renameat2"])
def test_the_final_rename_never_replaces_even_an_empty_folder(tmp_path, monkeypatch, renameat2):
    if renameat2 != "renameat2":
        monkeypatch.setattr(output_folder, "_RENAMEAT2", None)
    elif output_folder._RENAMEAT2 is None:
        pytest.skip("this C library has no renameat2 (not glibc >= 2.28 on Linux)")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "model.safetensors").write_text("new")
    (tmp_path / "theirs").mkdir()
    with pytest.raises(FileExistsError):
        output_folder.rename_noreplace(tmp_path / "new", tmp_path / "theirs")
    assert listing(tmp_path / "theirs") == [] and listing(tmp_path / "new") == ["model.safetensors"]
    output_folder.rename_noreplace(tmp_path / "new", tmp_path / "model")
    assert listing(tmp_path) == ["model", "theirs"]


def test_a_failure_leaves_no_folder_it_created_for_the_output(qwen3_ckpts, out, monkeypatch):
    def quota_exceeded(writer) -> list[str]:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(ShardedSafetensorsWriter, "close", quota_exceeded)
    code, message = run(qwen3_ckpts / "dense", "--model-out", out / "new" / "deeper" / "model")
    assert code == EXIT_OUTPUT_IO and "disk quota exceeded" in message, message
    assert listing(out) == []


def test_overwrite_replaces_only_what_was_there_when_the_run_started(qwen3_ckpts, out, monkeypatch):
    target = out / "model"
    check_shapes = convert_module.check_shapes

    def another_run_installs_first(*args, **kwargs):
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")
        return check_shapes(*args, **kwargs)

    monkeypatch.setattr(convert_module, "check_shapes", another_run_installs_first)
    code, message = run(qwen3_ckpts / "dense", "--model-out", target, "--overwrite")
    assert code == EXIT_OUTPUT_EXISTS and f"{target} appeared during the conversion" in message, message
    assert listing(out) == ["model"] and listing(target) == ["theirs.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_honour_the_umask(qwen3_ckpts, out, umask):
    previous = os.umask(umask)
    try:
        code, message = run(qwen3_ckpts / "lora", "--model-out", out / "model", "--adapter-out", out / "adapter")
    finally:
        os.umask(previous)
    assert code == 0, message
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in [*out.iterdir(), *out.glob("*/*")]}
    assert modes == {"model": 0o777 & ~umask, "adapter": 0o777 & ~umask,
                     **dict.fromkeys([*MODEL_FILES, "adapter_config.json", "adapter_model.safetensors"], 0o666 & ~umask)}


def test_a_failed_verification_installs_nothing(qwen3_ckpts, out, monkeypatch):
    (out / "model").mkdir()
    (out / "model" / "old.txt").write_text("old")
    monkeypatch.setattr(verify, "hf_logits", lambda model, input_ids: torch.full((1, 8, 128), float("nan")))
    code, message = run(qwen3_ckpts / "lora", "--model-out", out / "model", "--adapter-out", out / "adapter",
                        "--verify", "--overwrite-any")
    assert code == EXIT_VERIFY and "non-finite logits" in message and "nothing was installed" in message, message
    assert listing(out) == ["model"] and listing(out / "model") == ["old.txt"]


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_a_full_disk_is_a_clean_error_that_leaves_nothing(qwen3_ckpts, out, monkeypatch, failure):
    def disk_full(writer) -> list[str]:
        (writer.directory / "model.safetensors").write_bytes(b"partial")
        raise failure

    monkeypatch.setattr(ShardedSafetensorsWriter, "close", disk_full)
    code, message = run(qwen3_ckpts / "dense", "--model-out", out / "model")
    assert code == EXIT_OUTPUT_IO and f"cannot write {out / 'model'}: no space left on the device" in message, message
    assert listing(out) == []


# -- files taken from the config folder --------------------------------------------------------


def test_only_regular_files_inside_the_base_folder_are_copied(qwen3_ckpts, qwen3_hf, tmp_path, out):
    base = tmp_path / "base"
    shutil.copytree(qwen3_hf, base)
    secret = (tmp_path / "secret.txt").resolve()
    secret.write_text("token=hunter2")
    (base / "tokenizer_config.json").symlink_to(secret)
    (base / "special_tokens_map.json").symlink_to("../secret.txt")
    (base / "templates").mkdir()
    (base / "templates" / "chat.jinja").write_text("{{ messages }}")
    (base / "chat_template.jinja").symlink_to("templates/chat.jinja")  # inside the folder: copied
    os.mkfifo(base / "merges.txt")
    code, message = run(qwen3_ckpts / "dense", "--hf-base", base, "--model-out", out / "model")
    assert code == 0, message
    assert listing(out / "model") == sorted([*MODEL_FILES, "chat_template.jinja"])
    assert (out / "model" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert not (out / "model" / "chat_template.jinja").is_symlink()
    assert all("hunter2" not in path.read_bytes().decode("latin-1") for path in (out / "model").iterdir())
    outside = f"a symbolic link to {secret}, outside {base}"
    assert f"not copied from {base}: tokenizer_config.json ({outside})" in message, message
    assert f"not copied from {base}: special_tokens_map.json ({outside})" in message
    assert f"not copied from {base}: merges.txt (not a regular file)" in message


def test_a_hugging_face_cache_snapshot_keeps_its_links_into_blobs(tmp_path):
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "9f86d0").write_text('{"model_max_length": 8}')
    (snapshot / "tokenizer_config.json").symlink_to("../../blobs/9f86d0")
    (tmp_path / "elsewhere.json").write_text("{}")
    (snapshot / "vocab.json").symlink_to(tmp_path / "elsewhere.json")
    assert companion_refusal(snapshot / "tokenizer_config.json", snapshot) is None
    written = tmp_path / "written"
    written.mkdir()
    assert copy_companion_files(snapshot, written) == [
        f"not copied from {snapshot}: vocab.json (a symbolic link to {(tmp_path / 'elsewhere.json').resolve()}, "
        f"outside {snapshot})"]
    assert listing(written) == ["tokenizer_config.json"]


def test_a_table_s_companion_files_are_copied_and_an_earlier_output_holding_them_is_no_foreign_folder(tmp_path):
    """Qwen2.5-Omni's speaker dictionary (its table's companion_files) travels with the weights."""
    source, written = tmp_path / "source", tmp_path / "written"
    source.mkdir()
    written.mkdir()
    (source / "spk_dict.pt").write_bytes(b"speakers")
    (source / "notes.txt").write_text("not a companion")
    assert copy_companion_files(source, written, ("spk_dict.pt",)) == []
    assert listing(written) == ["spk_dict.pt"]
    assert output_folder.foreign_entries(written) == []
    (written / "notes.txt").write_text("left by hand")
    assert output_folder.foreign_entries(written) == ["notes.txt"]


def test_the_staging_folder_of_a_running_conversion_is_left_alone(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:  # holds the staging folder's lock, as a running conversion does
        (staging / "model.safetensors").write_bytes(b"in progress")
        notes = sweep_stale_staging(target)
        assert notes == [f"{staging} is being written by a running conversion (pid {os.getpid()}): left alone"]
        assert listing(staging) == ["model.safetensors"]
    assert listing(tmp_path) == ["model"]


# -- separate processes: signals, two runs at once, a file size limit ----------------------------


def convert_command(*args: str | Path, marker: Path | None = None, pause: float = 0.0) -> list[str]:
    """A ``bridge-ext convert`` command line; with ``marker``, paused after each tensor (convert_slowly.py)."""
    hook = [str(HERE / "convert_slowly.py"), str(marker), str(pause)] if marker is not None else \
        ["-c", "from bridge_ext.cli import main; main()"]
    return [sys.executable, *hook, "convert", *map(str, args)]


def start(command: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


STOPPING = ["SIGINT", "SIGTERM", "SIGHUP", "SIGKILL"]
# Mount a 100 kB tmpfs on $1, run the rest, then list what is left on the tmpfs (it vanishes with the namespace).
TINY_TMPFS_SCRIPT = 'dir=$1; shift; mount -t tmpfs -o size=100k tmpfs "$dir" || exit 99; "$@"; code=$?; ls -A "$dir"; exit $code'


@pytest.fixture(scope="module")
def background_runs(qwen3_ckpts, tmp_path_factory):
    """Every process these tests need, started at once (their imports overlap): name -> (process, folder).

    One paused conversion per signal (a long pause per tensor: the signal cuts it short), two
    conversions to one target, and one under a file size limit smaller than its model file.
    """
    base = tmp_path_factory.mktemp("background")
    runs = {}
    for name in [*STOPPING, "race"]:
        (base / name).mkdir()
    for name in STOPPING:
        command = convert_command(qwen3_ckpts / "dense", "--model-out", base / name / "model",
                                  marker=base / f"{name}.started", pause=60)
        runs[name] = start(command), base / name
    for name in ("race-a", "race-b"):
        command = convert_command(qwen3_ckpts / "dense", "--model-out", base / "race" / "model",
                                  marker=base / f"{name}.started", pause=0.1)
        runs[name] = start(command), base / "race"
    (base / "fsize").mkdir()
    runs["fsize"] = start(convert_command(qwen3_ckpts / "dense", "--model-out", base / "fsize" / "model"),
                          preexec_fn=limit_file_size), base / "fsize"
    (base / "tmpfs").mkdir()
    if shutil.which("unshare") is not None:  # a tmpfs too small for the model, in a mount namespace of its own
        on_tmpfs = ["unshare", "-rm", "sh", "-c", TINY_TMPFS_SCRIPT, "sh", str(base / "tmpfs"),
                    *convert_command(qwen3_ckpts / "dense", "--model-out", base / "tmpfs" / "model")]
        runs["tmpfs"] = start(on_tmpfs), base / "tmpfs"
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


def wait_until_writing(process: subprocess.Popen, marker: Path) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.05)


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_stop_signal_removes_the_staging_folder(background_runs, name, code):
    process, folder = background_runs[name]
    wait_until_writing(process, folder.parent / f"{name}.started")
    assert len(staging_folders(folder)) == 1  # stopped mid-write
    process.send_signal(getattr(signal, name))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert f"stopped by {name}" in stderr and "Traceback" not in stderr
    assert listing(folder) == []


def test_a_later_run_removes_the_staging_folder_of_a_killed_one(background_runs, qwen3_ckpts):
    process, folder = background_runs["SIGKILL"]
    wait_until_writing(process, folder.parent / "SIGKILL.started")
    process.kill()
    process.communicate(timeout=120)
    (left,) = staging_folders(folder)
    code, message = run(qwen3_ckpts / "dense", "--model-out", folder / "model")
    assert code == 0, message
    assert f"removed {left}: an unfinished staging folder of {folder / 'model'} left by a killed run " \
           f"(pid {process.pid})" in message
    assert listing(folder) == ["model"] and listing(folder / "model") == MODEL_FILES


def test_two_conversions_to_one_target_one_wins(background_runs):
    outcomes = []
    for name in ("race-a", "race-b"):
        process, folder = background_runs[name]
        outcomes.append((process.communicate(timeout=300)[1], process.returncode))
    assert sorted(code for _, code in outcomes) == [0, EXIT_OUTPUT_EXISTS], outcomes
    loser = next(stderr for stderr, code in outcomes if code == EXIT_OUTPUT_EXISTS)
    assert "during the conversion" in loser or "exists and is not empty" in loser, loser
    assert listing(folder) == ["model"] and listing(folder / "model") == MODEL_FILES
    assert len(load_file(folder / "model" / "model.safetensors")) == DENSE_TENSORS


def test_a_file_size_limit_is_a_clean_error_that_leaves_nothing(background_runs):
    process, folder = background_runs["fsize"]
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_OUTPUT_IO, stderr
    assert "file too large" in stderr and "Traceback" not in stderr
    assert listing(folder) == []


def test_a_full_disk_is_a_clean_error_that_leaves_nothing_on_it(background_runs):
    if "tmpfs" not in background_runs:
        pytest.skip("no unshare command: a tmpfs cannot be mounted without privileges")
    process, folder = background_runs["tmpfs"]
    left, stderr = process.communicate(timeout=300)
    if process.returncode == 99:
        pytest.skip(f"no user and mount namespaces here (unshare -rm), so no tmpfs can be mounted: {stderr.strip()}")
    assert process.returncode == EXIT_OUTPUT_IO, stderr
    assert f"cannot write {folder / 'model'}: no space left on the device" in stderr and "Traceback" not in stderr
    assert left == ""  # what the full filesystem held after the run
