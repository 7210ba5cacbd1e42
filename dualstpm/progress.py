"""Progress of long steps, the one mechanism of every command: on stderr, never stdout.

- On a terminal (stderr a TTY, in the main thread): a transient rich bar per stage.
- Elsewhere (a pipe, CI logs, a Prefect task's thread): a line per stage when it starts,
  naming it and its count (``decoding test images: 93 images``), a line every
  :data:`LOG_EVERY_S` seconds while it runs (``... 40/93 images, 30 s``), and one when it
  ends, with its time (``decoding test images: done, 93/93 images in 1.2 s``).

Messages for the user (:func:`say`) and the stage lines share one path: inside
:func:`labelled` (a Prefect task of one category, several running side by side) every line
starts with the label (``synth_texture: epoch 1 ...``), and goes to the label's sink (the
task's run logger, so it shows in Prefect) instead of stderr. Machine-readable stdout
(``dualstpm params``, tables piped elsewhere) never carries progress.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn,
                           TimeRemainingColumn)
from rich.text import Text

stderr_console = Console(stderr=True)

#: seconds between two lines of a long stage in logs (a terminal shows the bar instead)
LOG_EVERY_S = 30.0

Sink = Callable[[str], None]
_label: ContextVar[str | None] = ContextVar("dualstpm_progress_label", default=None)
_sink: ContextVar[Sink | None] = ContextVar("dualstpm_progress_sink", default=None)
_live: list[Progress] = []  # the bar shown now (rich shows one live display at a time), main thread only


class StatusColumn(ProgressColumn):
    """A task's `status` field (e.g. fit's batch losses), empty for tasks without one."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("status", "")))


def bars_shown() -> bool:
    """Whether progress is drawn as bars: stderr is a terminal and this is the main thread
    (stages running side by side in a thread pool, e.g. Prefect's task runner, log lines)."""
    return sys.stderr.isatty() and threading.current_thread() is threading.main_thread()


class _Bar(Progress):
    """A Progress that, while shown (not disabled: main thread, terminal), is the one later
    stages add their bars to."""

    def __enter__(self) -> _Bar:
        super().__enter__()
        if not self.disable:
            _live.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        if self in _live:
            _live.remove(self)
        super().__exit__(*exc_info)


def progress_bar(*columns: ProgressColumn) -> Progress:
    """A bar with a description, then `columns` (default: done/total and time left);
    transient, on stderr, drawn only where :func:`bars_shown` (else disabled: nothing drawn).
    Stages opened while it is shown (:func:`stage`) add their bars to it."""
    shown = columns or (MofNCompleteColumn(), TimeRemainingColumn())
    return _Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *shown,
        console=stderr_console,
        transient=True,
        disable=not bars_shown(),
    )


def _prefixed(message: str) -> str:
    label = _label.get()
    return message if label is None else f"{Text(label).markup}: {message}"


def say(message: str) -> None:
    """One line for the user (rich markup allowed), prefixed with the current label: to
    the label's sink as plain text, else to stderr unwrapped (a log line stays one line)."""
    line, sink = _prefixed(message), _sink.get()
    if sink is not None:
        sink(Text.from_markup(line).plain)
    else:
        stderr_console.print(line, soft_wrap=True)


@contextlib.contextmanager
def labelled(label: str, sink: Sink | None = None) -> Iterator[None]:
    """Every line said in this context (this thread or task) starts with `label`, and goes to
    `sink` (e.g. a Prefect run logger's `info`) when given, else to stderr."""
    label_token, sink_token = _label.set(label), _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(sink_token)
        _label.reset(label_token)


class Stage:
    """A running stage: call :meth:`advance` as items are done (`done` counts them)."""

    def __init__(self, description: str, total: int | None, unit: str) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.done = 0
        self.started = self._last_line = time.monotonic()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def _count(self) -> str:
        return "" if self.total is None else f"{self.done}/{self.total} {self.unit}, "

    def advance(self, count: int = 1) -> None:
        """`count` more items done: the bar moves, or a line is logged once LOG_EVERY_S has passed."""
        self.done += count
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, count)
        elif time.monotonic() - self._last_line >= LOG_EVERY_S:
            self._last_line = time.monotonic()
            say(f"{self.description}: {self._count()}{time.monotonic() - self.started:.0f} s")

    def _show_bar(self) -> Progress | None:
        """Add this stage's bar to the bar shown now; returns the bar it opened (None when
        one was shown already: the stage's bar joins it, as rich shows one at a time)."""
        opened = None
        if not _live:
            opened = progress_bar()
            opened.__enter__()
        self._bar = _live[-1]
        self._task = self._bar.add_task(_prefixed(self.description), total=self.total)
        return opened

    def _hide_bar(self, opened: Progress | None) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.remove_task(self._task)
        if opened is not None:
            opened.__exit__(None, None, None)


@contextlib.contextmanager
def stage(description: str, total: int | None = None, unit: str = "images") -> Iterator[Stage]:
    """A long step of any command: a bar on a terminal, lines in logs (see the module docstring).

    description: what is done, e.g. ``scoring test images`` (the count is added, not part
    of it); total: how many `unit` there are, or None for a step without a count (a bar
    without an end; in logs a start and an end line). Yields the :class:`Stage`. A stage
    that raises logs no end line.
    """
    progress = Stage(description, total, unit)
    if bars_shown():
        opened = progress._show_bar()
        try:
            yield progress
        finally:
            progress._hide_bar(opened)
        return
    say(description if total is None else f"{description}: {total} {unit}")
    yield progress
    counted = "" if total is None else f", {progress.done}/{total} {unit}"
    say(f"{description}: done{counted} in {time.monotonic() - progress.started:.1f} s")
