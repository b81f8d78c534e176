"""The progress display every long-running command shows on stderr."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

# Off a terminal (a log file, CI, nohup), seconds between two plain progress lines.
PLAIN_EVERY = 30.0


@dataclass
class _Tally:
    """A notice counted while a progress display runs, said once with its count when it ends."""

    say: Callable[[int], str]
    n: int = 0


# The notices counted, one dict per progress display in use (innermost last).
_TALLIES: list[dict[str, _Tally]] = []


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 story`, `2 stories`."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def tally(key: str, n: int, say: Callable[[int], str]) -> None:
    """A notice that would otherwise repeat (once per batch, once per prompt): counted, and said once
    with its count (`say(total)`) when the progress display in use ends; at once when none is."""
    if not n:
        return
    if not _TALLIES:
        Console(stderr=True).print(say(n))
        return
    _TALLIES[-1].setdefault(key, _Tally(say)).n += n


class _Info(ProgressColumn):
    """A task's `info` field (losses, accuracies), when it has one."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("info", "")))


class _Progress(Progress):
    """A rich progress display that, off a terminal (where a live display is one stale snapshot), says
    instead every `every` seconds one plain line about its first unfinished task: `stories 40/200 (1.3/s)`, the
    rate counted from the task's start, then its `info`. A task's `unit` field names what it counts."""

    def __init__(self, *columns, every: float | None, **kwargs):
        super().__init__(*columns, **kwargs)
        self.every = every
        self._starts: dict[TaskID, tuple[float, float]] = {}  # time and count at each task's start
        self._said = self.get_time()

    def __enter__(self):
        _TALLIES.append({})
        return super().__enter__()

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        super().__exit__(exc_type, exc_val, exc_tb)
        notices = _TALLIES.pop()
        # A run that fails ends with its one error line; an interrupted one still says what it saw.
        if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
            for notice in notices.values():
                self.console.print(notice.say(notice.n))

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields) -> TaskID:
        task = super().add_task(description, start, total, completed, visible, **fields)
        self._starts[task] = (self.get_time(), completed)
        return task

    def reset(self, task_id: TaskID, *, completed: int = 0, **kwargs) -> None:
        super().reset(task_id, completed=completed, **kwargs)
        self._starts[task_id] = (self.get_time(), completed)

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._tick()

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._tick()

    def _tick(self) -> None:
        now = self.get_time()
        if self.every is None or now - self._said < self.every or not self.tasks:
            return
        self._said = now
        # The first task still running (a stage's second phase once its first is done), else the first.
        task = next((t for t in self.tasks if t.visible and not t.finished), self.tasks[0])
        since, before = self._starts.get(task.id, (now, task.completed))
        rate = (task.completed - before) / (now - since) if now > since else 0.0
        count = _number(task.completed) + ("" if task.total is None else f"/{_number(task.total)}")
        unit = task.fields.get("unit")
        info = str(task.fields.get("info", "")).strip()
        line = f"{task.description} {count} ({_rate(rate)}{' ' + unit if unit else ''}/s)"
        self.console.print(f"{line} {info}" if info else line, markup=False, highlight=False, soft_wrap=True)


def _number(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:.1f}"


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def progress(console: Console, disable: bool = False) -> Progress:
    """Description, bar, count, elapsed and remaining time, and the task's `info`, live on a terminal.
    Elsewhere one plain line every PLAIN_EVERY seconds, so that a log shows the run is alive."""
    live = console.is_terminal and not disable
    return _Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                     TimeRemainingColumn(), _Info(), console=console, disable=not live,
                     every=None if live or disable else PLAIN_EVERY)
