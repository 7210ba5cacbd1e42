"""One look for every progress bar: transient, on stderr, shown only on a terminal.

Logs and CI output stay clean; an interactive user sees what is going on.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn

stderr_console = Console(stderr=True)


def progress_bar(*columns: ProgressColumn) -> Progress:
    """A bar with a description, then `columns` (default: done/total and time left)."""
    shown = columns or (MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *shown,
        console=stderr_console,
        transient=True,
        disable=not sys.stderr.isatty(),
    )
