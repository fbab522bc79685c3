"""The ``bridge-ext`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Clean Hugging Face weights and PEFT adapters out of Megatron-Core models."""


@main.command()
@click.option("--example", default=None, help="Which built-in tiny model (default: the flagship).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the tiny model and the exported folders here instead of a temporary folder.")
def demo(example: str | None, workdir: Path | None) -> None:
    """Build a tiny model in Megatron with LoRA, export it, and verify the result.

    Verifies: names and shapes against the Hugging Face checkpoint key set, base weights
    bit-exact, the adapter loaded by PEFT with no missing or unexpected key, and the logits of
    transformers + PEFT equal to the Megatron model's own forward.
    """
    from bridge_ext.demo import DEFAULT_EXAMPLE, EXAMPLES, run_demo
    from bridge_ext.verify import VerificationError

    example = example or DEFAULT_EXAMPLE
    if example not in EXAMPLES:
        raise click.BadParameter(f"choose one of {', '.join(EXAMPLES)}", param_hint="--example")
    try:
        run_demo(example, workdir, echo=click.echo)
    except VerificationError as error:
        click.echo(f"verification FAILED: {error}", err=True)
        sys.exit(1)
    click.echo("demo passed")
