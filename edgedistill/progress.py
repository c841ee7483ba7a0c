"""What a run shows while it works: one line per stage, one rich progress display for the
stage's long loops (training steps, evaluation batches, benchmark rounds), and the libraries'
own logs and warnings written to ``<run>/logs/<stage>.log`` instead of the terminal.

Three modes, set once by the CLI (:func:`configure`): ``normal`` (stage lines, bars, our own
warnings), ``quiet`` (nothing but errors; the CLI prints the summary itself) and ``debug``
(library logs on the terminal as well). SDK users who never call :func:`configure` get the same
lines and bars and Python's default logging.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)  # stdout stays free for `edgedistill run --json`
_mode = "normal"
_display: Progress | None = None  # the running stage's progress display, if any


def configure(mode: str = "normal") -> None:
    """Route logs for the CLI: ``normal``, ``quiet`` or ``debug`` (see the module docstring)."""
    global _mode
    import datasets
    import optimum.utils.logging as optimum_logging
    import transformers

    _mode = mode
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # these libraries print through their own stderr handlers; send their records up to the
    # root logger instead, where a stage's log file (and, with --debug, the terminal) gets them
    for library in (transformers.utils.logging, optimum_logging):
        library.disable_default_handler()
        library.enable_propagation()
        library.set_verbosity_warning()
    for handler in list(logging.getLogger("datasets").handlers):
        logging.getLogger("datasets").removeHandler(handler)
    datasets.disable_progress_bars()  # tokenizing a few hundred rows needs no bar
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(old)  # configured again (main() called twice in one process)
    root.addHandler(_ConsoleHandler())
    root.setLevel(logging.INFO)  # for the stages' log files; the console handler filters
    console.quiet = mode == "quiet"


def mute() -> None:
    """Errors only on this process's terminal (its logs still go to its files): another
    process of a launched run speaks for the run. --debug keeps everything."""
    global _mode
    if _mode != "debug":
        _mode = "quiet"
        console.quiet = True


@contextlib.contextmanager
def silenced(logger: str, fragment: str) -> Iterator[None]:
    """Drop the records of ``logger`` (not its children) whose message contains ``fragment``:
    for a known-harmless library message; say at the call why it is harmless."""
    target = logging.getLogger(logger)
    keep = lambda record: fragment not in record.getMessage()  # noqa: E731
    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def note(message: str) -> None:
    """A line for the reader of the run (hidden by --quiet)."""
    console.print(message, soft_wrap=True, highlight=False)


class _ConsoleHandler(logging.Handler):
    """A log record as one line on the run's console, above any bar: 'warning  <message>'.
    (rich's RichHandler would cut a long message into a column at the console's width, and
    a log file reader greps for the whole line.)"""

    COLOURS = {"WARNING": "yellow", "ERROR": "red", "CRITICAL": "red"}

    def filter(self, record) -> bool:
        """Everything with --debug; else our own warnings and everyone's errors (--quiet:
        errors only). The rest goes to the stage's log file."""
        if _mode == "debug" or record.levelno >= logging.ERROR:
            return True
        return (_mode == "normal" and record.levelno >= logging.WARNING
                and record.name.startswith("edgedistill"))

    def emit(self, record):
        level = record.levelname.lower()
        colour = self.COLOURS.get(record.levelname, "dim")
        where = f"{record.name}: " if _mode == "debug" else ""
        # --quiet silences the run's console, not its errors
        out = Console(stderr=True) if console.quiet else console
        out.print(f"  [{colour}]{level}[/{colour}]  {escape(where + record.getMessage())}",
                  soft_wrap=True, highlight=False)


class _Counter(logging.Handler):
    """Counts the warnings a stage's libraries logged, for the one line that points to them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += not record.name.startswith("edgedistill")


class _LogWriter(io.TextIOBase):
    """A text stream whose lines become log records: libraries that ``print`` their progress
    (onnxruntime's calibrator does) write to the stage log, not over the display or stdout."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.pending = logger, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line.rstrip())
        return len(text)


@contextlib.contextmanager
def library_logs(log_file: Path) -> Iterator[_Counter]:
    """Send what libraries log, warn or print while the block runs to ``log_file`` (written
    anew); yields the counter of their warnings."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    writer = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    writer.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    counter, root = _Counter(), logging.getLogger()
    previous_level = root.level
    root.setLevel(min(root.level, logging.INFO))  # INFO reaches the file, not the terminal
    root.addHandler(writer)
    root.addHandler(counter)
    try:
        # Python's own filters stay: what they hide by default (ResourceWarning, a library's
        # DeprecationWarning) is not the user's to act on
        with contextlib.redirect_stdout(_LogWriter(logging.getLogger("stdout"))), \
                warnings.catch_warnings():
            logging.captureWarnings(True)  # as log records, so the log file gets them
            try:
                yield counter
            finally:
                logging.captureWarnings(False)
    finally:
        root.removeHandler(writer)
        root.removeHandler(counter)
        root.setLevel(previous_level)
        writer.close()


def warnings_line(counter: _Counter, log_file: Path) -> str:
    n = counter.count
    return f"{n} library warning{'s' * (n > 1)} in {log_file}" if n else ""


@contextlib.contextmanager
def stage(title: str, log_file: Path) -> Iterator[None]:
    """Show ``title``, run the stage's work with its progress bars and its libraries' logs in
    ``log_file``, then say how long it took and whether the log holds warnings."""
    global _display
    note(f"[bold]{title}[/bold]")
    start = time.perf_counter()
    _display = _new_display()
    try:
        with library_logs(log_file) as counter, _display:
            yield
    finally:
        _display = None
    warned = warnings_line(counter, log_file)
    note(f"[dim]  done in {_duration(time.perf_counter() - start)}"
         f"{'; ' + warned if warned else ''}[/dim]")


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{seconds:.1f} s"


def _new_display() -> Progress:
    # transient: a finished bar leaves no trace; the lines printed above it stay. A log file
    # or a pipe gets no bars at all (they cannot redraw there).
    return Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    TextColumn("{task.fields[status]}"), console=console, transient=True,
                    redirect_stdout=False, disable=not console.is_terminal or console.quiet)


class Bar:
    """One task on the stage's display (or on a display of its own outside a stage)."""

    def __init__(self, description: str, total: float | None, show: bool = True):
        self._own = _display is None
        self.display = _new_display() if self._own else _display
        if self._own:  # a hidden bar on the stage's display leaves the other bars alone
            self.display.disable |= not show
            self.display.start()
        self.task: TaskID = self.display.add_task(description, total=total, status="",
                                                  visible=show)

    def advance(self, steps: float = 1) -> None:
        self.display.advance(self.task, steps)

    def update(self, completed: float | None = None, status: str | None = None,
               description: str | None = None) -> None:
        fields = {"status": status} if status is not None else {}
        self.display.update(self.task, completed=completed, description=description, **fields)

    def close(self) -> None:
        self.display.remove_task(self.task)
        if self._own:
            self.display.stop()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable, description: str, total: int | None = None) -> Iterator:
    """Iterate over ``items`` with a bar on the stage's display."""
    total = total if total is not None else len(items) if hasattr(items, "__len__") else None
    with Bar(description, total) as bar:
        for item in items:
            yield item
            bar.advance()
