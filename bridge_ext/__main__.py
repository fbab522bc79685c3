"""``python -m bridge_ext``: the ``bridge-ext`` command."""

from bridge_ext.cli import main

main(prog_name="bridge-ext")
