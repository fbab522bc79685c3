"""The ``bridge-ext`` command line."""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click


def quiet_upstream_notices() -> None:
    """Keep megatron's and transformers' notices (no TE, no Apex, slow kernels...) out of the
    command's output; errors still show."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.disable(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, help="Show megatron's own log messages and warnings.")
def main(verbose: bool) -> None:
    """Clean Hugging Face weights and PEFT adapters out of Megatron-Core models."""
    if not verbose:
        quiet_upstream_notices()


@main.command()
@click.option("--example", default=None, help="Which built-in tiny model (default: the flagship).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the tiny model and the exported folders here instead of a temporary folder.")
def demo(example: str | None, workdir: Path | None) -> None:
    """Export a tiny model from Megatron, live and from checkpoints, and verify the results.

    \b
    1. Live: build the model in Megatron with LoRA, save the Hugging Face and PEFT folders.
    2. Checkpoints: save it with megatron-core's dist_checkpointing (full and adapter-only,
       as Megatron-Bridge training writes them) and convert both without building a model.
    Each result is verified: names and shapes against the Hugging Face checkpoint key set,
    base weights bit-exact, the adapter loaded by PEFT with no missing or unexpected key, and
    the logits of transformers + PEFT equal to the Megatron model's own forward.
    """
    from bridge_ext.convert_demo import run_convert_demo
    from bridge_ext.demo import DEFAULT_EXAMPLE, EXAMPLES, run_demo
    from bridge_ext.errors import VerificationError

    example = example or DEFAULT_EXAMPLE
    if example not in EXAMPLES:
        raise click.BadParameter(f"choose one of {', '.join(EXAMPLES)}", param_hint="--example")
    try:
        click.echo("== live export (export_hf_weights / save_hf_pretrained)")
        run_demo(example, workdir / "live" if workdir else None, echo=click.echo)
        click.echo("== checkpoint conversion (bridge-ext convert)")
        run_convert_demo(workdir / "checkpoints" if workdir else None, echo=click.echo, example=example)
    except VerificationError as error:
        click.echo(f"verification FAILED: {error}", err=True)
        sys.exit(1)
    click.echo("demo passed")


@main.group()
def tables() -> None:
    """Mapping tables generated from Megatron-Bridge's bridges."""


@tables.command()
@click.argument("model_type")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here instead of model_mappings/generated/MODEL_TYPE.py.")
def generate(model_type: str, out: Path | None) -> None:
    """Write MODEL_TYPE's table, read off Megatron-Bridge's bridge for it (resolved on a tiny CPU model).

    A mapping kind the generator does not know is refused (exit 1), naming its class and parameter.
    """
    from bridge_ext.errors import BridgeExtError
    from bridge_ext.table_generate import write

    from contextlib import redirect_stdout

    try:
        with redirect_stdout(sys.stderr):  # megatron prints while building the tiny model
            target = write(model_type, out)
        click.echo(target)
    except BridgeExtError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)


@main.command()
def architectures() -> None:
    """Every architecture Megatron-Bridge or bridge_ext knows, with its status (docs/architectures.md)."""
    from bridge_ext.architectures import render

    click.echo(render(), nl=False)


# Exit codes of `bridge-ext convert` (documented in its --help and in docs/convert.md).
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_CHECKPOINT, EXIT_MISMATCH, EXIT_OUTPUT_EXISTS, EXIT_VERIFY = 0, 1, 2, 3, 4, 5, 6
EXIT_OUTPUT_IO = 7
EXIT_SIGNAL_BASE = 128  # stopped by signal n: 128 + n, as shells report it
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DTYPES = {"auto": None, "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def _engine_tp(value: str) -> int | None:
    if value.lower() == "none":
        return None
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"a positive integer or none, not {value!r}")
    return int(value)


@main.command(context_settings={"max_content_width": 100})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--model-out", type=click.Path(path_type=Path), default=None,
              help="Write the Hugging Face model folder here (safetensors shards, index, config.json, "
                   "tokenizer files of --hf-base).")
@click.option("--adapter-out", type=click.Path(path_type=Path), default=None,
              help="Write the PEFT adapter folder here (adapter_config.json, adapter_model.safetensors).")
@click.option("--hf-base", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Hugging Face folder of the base model: config.json and tokenizer files are taken from it, "
                   "and for an adapter-only checkpoint its weights are the base.")
@click.option("--hf-config", type=click.Path(exists=True, path_type=Path), default=None,
              help="config.json (or its folder) when there is no --hf-base. Default: the hf_model_id "
                   "recorded in run_config.yaml (a local folder, or a Hub id in the local cache).")
@click.option("--model-type", default=None,
              help="Without --hf-base / --hf-config: build config.json from run_config.yaml for this Hugging "
                   "Face model type (a config.json `model_type`), through Megatron-Bridge's config mapping.")
@click.option("--iteration", type=int, default=None,
              help="Iteration to convert when CHECKPOINT is a root folder (default: the latest).")
@click.option("--merge", is_flag=True,
              help="Merge the LoRA adapters into the base weights (W + alpha/r * B A, in fp32) instead of "
                   "writing an adapter folder.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="auto", show_default=True,
              help="dtype of every written tensor; auto keeps the checkpoint's.")
@click.option("--expert-layout", type=click.Choice(["auto", "fused", "per_expert", "fused_transposed"]), default="auto",
              show_default=True,
              help="MoE expert weights fused (experts.gate_up_proj [E, 2I, H]) or per expert "
                   "(experts.<e>.gate_proj); auto follows --hf-base, else fused.")
@click.option("--expert-adapter-layout", type=click.Choice(["auto", "fused", "per_expert"]), default="auto",
              show_default=True,
              help="Expert adapters in PEFT's target_parameters layout (fused: what PEFT loads onto "
                   "transformers v5 models) or per expert; auto: what --adapter-for loads.")
@click.option("--adapter-for", type=click.Choice(["peft", "vllm"]), default="peft", show_default=True,
              help="The consumer of the adapter folder: PEFT (fused expert adapters) or vLLM (the expert "
                   "layout vLLM loads for the model's architecture class; docs/consumers.md).")
@click.option("--max-shard-size", default="5GB", show_default=True, callback=lambda ctx, param, value: _size(value),
              help="Largest safetensors shard (e.g. 500MB, 2GiB). Memory use does not grow with it: each "
                   "tensor is written into its shard as it is converted.")
@click.option("--allow-overflow", is_flag=True,
              help="With --dtype float16: write values beyond float16's range as infinities instead of refusing.")
@click.option("--overwrite", is_flag=True,
              help="Replace output folders that hold an earlier output: only the files of a Hugging Face model "
                   "or PEFT adapter folder (only once the new ones are complete; the old one is moved aside, "
                   "then removed). Anything else is refused, listing what the folder holds.")
@click.option("--overwrite-any", is_flag=True,
              help="Replace output folders whatever they hold (everything in them is deleted).")
@click.option("--verify", is_flag=True,
              help="Before installing the folders, load them with transformers (and PEFT), run a short forward "
                   "pass and report key counts; a failure installs nothing.")
@click.option("--quantize", type=click.Choice(["fp8"]), default=None,
              help="Write the model folder's weights block-FP8 (e4m3 + float32 weight_scale_inv per 128x128 "
                   "block, config.json's quantization_config), as vLLM loads them (docs/fp8.md).")
@click.option("--engine-tp-size", default="1", show_default=True, callback=lambda ctx, param, value: _engine_tp(value),
              help="With --quantize: the inference engine's tensor-parallel size, at which every FP8 weight must "
                   "pass vLLM's block check; none skips the check.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Convert and write the model folder's shards in this many processes at once (default: the "
                   "cores available, fewer when memory or a small output says so). The files are the same "
                   "whatever the number.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
def convert(checkpoint: Path, model_out: Path | None, adapter_out: Path | None, hf_base: Path | None,
            hf_config: Path | None, model_type: str | None, iteration: int | None, merge: bool, dtype: str,
            expert_layout: str, expert_adapter_layout: str, adapter_for: str, max_shard_size: str,
            allow_overflow: bool, overwrite: bool, overwrite_any: bool, verify: bool, quantize: str | None,
            engine_tp_size: int | None, workers: int | None, progress: bool | None) -> None:
    """Convert a Megatron checkpoint on disk to a Hugging Face folder and/or a PEFT adapter folder.

    CHECKPOINT is a Megatron-Core / Megatron-Bridge torch_dist checkpoint: a root folder with
    latest_checkpointed_iteration.txt and iter_XXXXXXX/ folders, or one iteration folder. Full
    checkpoints and LoRA adapter-only checkpoints (their base comes from --hf-base) are read
    tensor by tensor through the checkpoint's metadata, at whatever TP/PP/EP they were saved;
    no model is built, no GPU or Transformer Engine is needed, and no pickle is loaded except
    through an allowlist or with weights_only. Outputs are built in a temporary folder beside
    the target and renamed into place only when complete.

    \b
    Examples:
      # full LoRA checkpoint -> base model folder + PEFT adapter folder, then check both
      bridge-ext convert ckpts/run1 --hf-base Qwen3-0.6B \\
          --model-out out/model --adapter-out out/adapter --verify
      # adapter-only checkpoint (Megatron-Bridge PEFT run) -> PEFT adapter folder
      bridge-ext convert ckpts/lora_run --hf-base Qwen3-0.6B --adapter-out out/adapter
      # the same, merged into the base, in bfloat16, 2 GB shards
      bridge-ext convert ckpts/lora_run --hf-base Qwen3-0.6B --model-out out/merged \\
          --merge --dtype bfloat16 --max-shard-size 2GB
      # one iteration of a root, per-expert MoE layout, replacing an earlier result
      bridge-ext convert ckpts/moe_run --iteration 2000 --model-out out/moe \\
          --expert-layout per_expert --overwrite
      # no Hugging Face folder at hand: config.json built from run_config.yaml
      bridge-ext convert ckpts/run1 --model-type qwen3 --model-out out/merged --merge

    \b
    Exit codes:
      0  converted (and verified, with --verify)
      1  internal error (a bug: please report the traceback)
      2  usage error (bad or conflicting options), or an output refused wherever it is: the
         filesystem root, the working directory or a parent of it, a symbolic link, an input
         or a folder holding one, one output inside the other
      3  the checkpoint cannot be read: missing, not torch_dist, unsafe pickle, truncated or
         corrupted file, missing run_config.yaml for an adapter-only checkpoint
      4  the checkpoint, config.json and mapping tables disagree: unknown architecture,
         unmapped or missing tensors, shape mismatch (named with both shapes)
      5  an output folder exists and is not empty (use --overwrite), or, with --overwrite, holds
         what is no earlier output (use --overwrite-any), or something appeared at
         the output (or replaced the folder there) while it was written, e.g. another run
      6  --verify failed (checked before installing: nothing was installed)
      7  an I/O or permission error: an output cannot be written (parent not writable, no
         space left, file size limit, read-only file system), or the system failed a read;
         or out of memory (an allocation failed, or the system killed a conversion worker)
    128+n  stopped by signal n (SIGINT 130, SIGHUP 129, SIGTERM 143): nothing installed, the
         staging folders removed (or, arriving during the final renames, all outputs installed)
    """
    if model_out is None and adapter_out is None:
        raise click.UsageError("give --model-out, --adapter-out or both")
    if merge and adapter_out is not None:
        raise click.UsageError("--merge writes the adapters into --model-out; drop --adapter-out")
    if merge and model_out is None:
        raise click.UsageError("--merge needs --model-out")
    if quantize is not None and (model_out is None or verify):
        raise click.UsageError("--quantize needs --model-out and no --verify (which checks bf16 folders)")
    bar = _ProgressBar(enabled=sys.stderr.isatty() if progress is None else progress)
    notes: list[str] = []
    try:
        with _stop_signals_raise():
            from bridge_ext.convert import convert_checkpoint
            from bridge_ext.output_folder import OVERWRITE_ANY

            with bar:
                result = convert_checkpoint(
                    checkpoint, model_dir=model_out, adapter_dir=adapter_out, hf_base=hf_base, hf_config=hf_config,
                    model_type=model_type, iteration=iteration, merge=merge, dtype=_torch_dtype(DTYPES[dtype]),
                    expert_layout=None if expert_layout == "auto" else expert_layout,
                    expert_adapter_layout=None if expert_adapter_layout == "auto" else expert_adapter_layout,
                    adapter_for=adapter_for, max_shard_size=max_shard_size,
                    overwrite=OVERWRITE_ANY if overwrite_any else overwrite, verify=verify, allow_overflow=allow_overflow, on_start=bar.start, on_tensor=bar.advance, notes=notes,
                    quantize=quantize, engine_tp_size=engine_tp_size, workers=workers,
                )
    except KeyboardInterrupt as interrupt:
        number = getattr(interrupt, "signal_number", signal.SIGINT)
        what = "the outputs were installed, complete (see the notes)" if getattr(interrupt, "installed", None) \
            else "nothing partial was installed and the staging folders were removed"
        _fail(f"stopped by {signal.Signals(number).name}: {what}", EXIT_SIGNAL_BASE + number, notes)
    except Exception as error:
        code = _exit_code(error)
        if code is None:
            raise
        prefix = "verification failed (nothing was installed; the outputs are as before the run): " \
            if code == EXIT_VERIFY else ""
        _fail(f"{prefix}{_out_of_memory_message(error) or error}", code, notes)
    try:
        _print_summary(result, notes)
    except BrokenPipeError:  # `convert ... | head`: the outputs are installed; the reader left early
        _silence_stdout()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # no real file descriptor behind stdout (tests): nothing will be flushed to a pipe


def _print_summary(result, notes: list[str]) -> None:
    mib = result.bytes / 2**20
    click.echo(f"converted {result.checkpoint}{' (LoRA adapter-only)' if result.adapter_only else ''}")
    for label, folder in (("model", result.model_dir), ("adapter", result.adapter_dir)):
        if folder is not None:
            click.echo(f"  {label:<8}{folder}")
    click.echo(f"  {result.tensors} tensors, {mib:.1f} MiB in {result.seconds:.1f} s "
               f"({result.throughput / 2**20:.1f} MiB/s)")
    if result.non_finite:
        from bridge_ext.value_check import non_finite_summary

        click.echo(f"  warning: {non_finite_summary(result.non_finite)}")
    for note in notes:
        click.echo(f"  note  {note}")
    for line in result.report.lines if result.report is not None else ():
        click.echo(f"  ok  {line}")


def _exit_code(error: Exception) -> int | None:
    """The documented exit code of an error (docs/convert.md); None for a bug."""
    from bridge_ext.errors import (
        CheckpointError,
        ConvertError,
        ExportError,
        OutputExistsError,
        OutputLocationError,
        OutputWriteError,
        VerificationError,
        is_out_of_memory,
    )

    if is_out_of_memory(error):
        return EXIT_OUTPUT_IO

    for family, code in ((CheckpointError, EXIT_CHECKPOINT), (OutputExistsError, EXIT_OUTPUT_EXISTS),
                         (OutputLocationError, EXIT_USAGE), (OutputWriteError, EXIT_OUTPUT_IO),
                         (VerificationError, EXIT_VERIFY), ((ConvertError, ExportError), EXIT_MISMATCH),
                         (OSError, EXIT_OUTPUT_IO)):
        if isinstance(error, family):
            return code
    return None


class _Stopped(KeyboardInterrupt):
    """A stop signal, raised in the main thread so that every staging folder is removed on the way out."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


@contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGINT / SIGTERM / SIGHUP raise :class:`_Stopped` (the first one only: a second signal does not
    cut the clean-up short). SIGXFSZ is ignored: a file size limit (``ulimit -f``) then fails the
    write with EFBIG, a clean error, instead of killing the process with a staging folder left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def stop(signal_number: int, _frame) -> None:
        if not received:
            received.append(signal_number)
            raise _Stopped(signal_number)

    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _size(value: str) -> str:
    from bridge_ext.hf_folder import parse_size

    try:
        parse_size(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size from 1 byte to 1 PiB, such as 500MB or 2GiB (a number, "
                                 "optionally with B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB or PiB)") from None
    return value


def _torch_dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def _out_of_memory_message(error: BaseException) -> str | None:
    """One line for a failed allocation (None for any other error)."""
    import re

    from bridge_ext.errors import is_out_of_memory

    if not is_out_of_memory(error):
        return None
    asked = re.search(r"you tried to allocate (\d+) bytes", str(error))
    what = f"allocating {int(asked.group(1))} bytes failed" if asked else "an allocation failed"
    return (f"out of memory: {what}; the conversion needs about one shard plus the largest tensor "
            "(lower --max-shard-size, or raise the memory limit: ulimit -v, the job's allocation)")


def _fail(error: object, code: int, notes: list[str] = ()) -> None:
    import re

    for note in notes:
        click.echo(f"note: {note}", err=True)
    # One line whatever the error's own text holds (a third-party message quoted with its line breaks).
    click.echo("error: " + re.sub(r"\s*\n\s*", " ", str(error).strip()), err=True)
    sys.exit(code)


class _ProgressBar:
    """A rich progress bar over the tensors written, with bytes and throughput, on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = self._task = None
        self._bytes = 0

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
                TextColumn("{task.fields[mib]:.0f} MiB, {task.fields[rate]:.0f} MiB/s"), TimeElapsedColumn(),
                console=Console(stderr=True), transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc_info)

    def start(self, total: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task("convert", total=total, mib=0.0, rate=0.0)

    def advance(self, name: str, nbytes: int) -> None:
        if self._task is None:
            return
        self._bytes += nbytes
        elapsed = self._progress.tasks[0].elapsed or 0.0
        mib = self._bytes / 2**20
        self._progress.update(self._task, advance=1, mib=mib, rate=mib / elapsed if elapsed else 0.0)
