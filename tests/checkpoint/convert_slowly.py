"""Test hook: run ``bridge-ext convert`` pausing after every tensor written to the staging folder.

    python convert_slowly.py MARKER SECONDS convert ARGS...

Creates the file MARKER once the first tensor was handed to the writer (the staging folder
exists by then), then sleeps SECONDS after each tensor, so that a test can signal the process,
or run a second conversion, while the output is being written. The pause is injected by
replacing the command's progress callback in this process only; nothing in bridge_ext reads it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bridge_ext import cli

marker, pause = Path(sys.argv[1]), float(sys.argv[2])
advance = cli._ProgressBar.advance


def advance_slowly(self, name: str, nbytes: int) -> None:
    advance(self, name, nbytes)
    marker.touch()
    time.sleep(pause)


cli._ProgressBar.advance = advance_slowly
cli.main(sys.argv[3:], prog_name="bridge-ext")
