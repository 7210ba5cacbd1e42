"""One look for every progress bar: transient, on stderr, shown only on a terminal.

Logs and CI output stay clean; an interactive user sees what is going on.
"""

from __future__ import annotations

import sys
import threading

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
        # Rich shows one live display at a time: bars only from the main thread, so stages
        # running side by side in a thread pool (Prefect's task runner) never collide.
        disable=not sys.stderr.isatty() or threading.current_thread() is not threading.main_thread(),
    )
