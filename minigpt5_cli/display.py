"""The progress display every long-running command shows on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text


class _Info(ProgressColumn):
    """A task's `info` field (losses, accuracies), when it has one."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("info", "")))


def progress(console: Console, disable: bool = False) -> Progress:
    """Description, bar, count, elapsed and remaining time, and the task's `info`. Shown on a terminal
    only: in a log file a live display is one stale snapshot, and stderr keeps only warnings and
    errors."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), _Info(), console=console, disable=disable or not console.is_terminal)
