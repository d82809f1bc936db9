"""Progress bars for the long steps (rich), and the console for tables, on standard error."""

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Piped or logged, rich would wrap at 80 columns and cut table headers; a log can be wide.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar for ``total`` units of work; yields ``advance(n=1)``.

    Work beyond ``total`` (a noisy profile's extra rounds) moves the bar's end out with it, rather than counting
    past it.
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        done = 0

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            bar.update(task, completed=done, total=max(total, done))

        yield advance
