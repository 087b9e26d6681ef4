"""Progress reporting: rich bars on a terminal, plain timestamped lines in a log, no library loading bars in either.

Probes and contexts report through the `Progress` protocol (a task per step, advanced as work ends); the runner, the
trainer and the CLI choose how it is shown: `interactive()` says whether bars can be drawn, `PlainProgress` stands in
for them in a log, and `quiet_library_bars` keeps transformers' "Loading weights" bars out of both.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol


class Task(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def describe(self, text: str) -> None: ...


class Progress(Protocol):
    """Where long work reports progress; the CLI shows rich bars, the library default shows nothing."""

    def task(self, description: str, total: int) -> Task: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


class NullProgress:
    def task(self, description: str, total: int) -> Task:
        return _NullTask()


class RichProgress:
    """Progress bars on the terminal (rich), one per task."""

    def __init__(self, console=None):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as _Progress

        self._bars = _Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=console, transient=False)

    def __enter__(self) -> RichProgress:
        self._bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bars.__exit__(*exc)

    def task(self, description: str, total: int) -> Task:
        bars = self._bars
        tid = bars.add_task(description, total=total)

        class _Task:
            def advance(self, n: int = 1) -> None:
                bars.advance(tid, n)

            def describe(self, text: str) -> None:
                bars.update(tid, description=text)

        return _Task()


def is_terminal(stream: IO | None = None) -> bool:
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def interactive() -> bool:
    """Whether to draw bars: only when stdout and stderr are both terminals. Bars draw on one stream and results print
    on the other; with either one sent to a file (`dpolab run > run.log`), a bar would leave nothing there until the
    end (rich prints a non-terminal bar once, when it stops), so plain lines are printed on stdout instead."""
    return is_terminal(sys.stdout) and is_terminal(sys.stderr)


def duration(seconds: float) -> str:
    """42 s, 4m12s, 1h03m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class PlainLines:
    """One plain line per finished phase, for logs: no bars, no colour codes, no carriage returns.

    `[12:03:04] cell 2/6 resist-only__dpo__s0: train done in 110 s; elapsed 4m12s; about 15m00s left`
    """

    def __init__(self, stream: IO | None = None, *, start: float | None = None):
        self.stream = sys.stdout if stream is None else stream
        self.start = time.perf_counter() if start is None else start

    def line(self, text: str, *, left: float | None = None) -> None:
        now = time.strftime("%H:%M:%S")
        elapsed = duration(time.perf_counter() - self.start)
        rest = "" if left is None else f"; about {duration(left)} left"
        print(f"[{now}] {text}; elapsed {elapsed}{rest}", file=self.stream, flush=True)


def _count(x: float) -> str:
    """12 for 12.0 (rich counts in floats), and a fraction as it is."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass
class _PlainTask:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    start: float  # when the task was added
    first: float  # completed when added (a resumed training starts part-way)
    last_line: float  # when the task last printed
    ended: bool = False

    def says(self, what: str) -> str:
        """`training 2/8 done in 3 s (loss 0.6931 margin +0.002)`: the trainer's `info` field, if any, last."""
        info = self.fields.get("info")
        return f"{self.description} {what}" + (f" ({info})" if info else "")

    def left(self, now: float) -> float | None:
        """The rest of this task at the pace of its steps so far; none before its first step."""
        done = self.completed - self.first
        if self.total is None or done <= 0:
            return None
        return (now - self.start) / done * max(0.0, self.total - self.completed)


class PlainProgress:
    """Plain lines in place of bars, for logs: one when a task ends and, while a long one runs, at most one every
    `every` seconds with its count and time left (a line per step would bury a long run's log).

    It offers both the `Progress` protocol (`task`) and the part of rich's Progress that the trainer uses
    (`add_task`, `advance`, `update`, a context manager), so it stands in for either kind of bar.
    """

    def __init__(self, lines: PlainLines | None = None, *, every: float = 30.0):
        self.lines = lines if lines is not None else PlainLines()
        self.every = every
        self._tasks: list[_PlainTask] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        now = time.perf_counter()
        self._tasks.append(_PlainTask(description, total, completed, dict(fields), start=now, first=completed,
                                      last_line=now))
        return len(self._tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               description: str | None = None, **fields: Any) -> None:
        t = self._tasks[task_id]
        if description is not None:
            t.description = description
        t.fields.update(fields)
        before = t.completed
        if completed is not None:
            t.completed = completed
        if advance:
            t.completed += advance
        if t.completed == before or t.ended:
            return  # only work done prints
        now = time.perf_counter()
        count = _count(t.completed) + (f"/{_count(t.total)}" if t.total is not None else "")
        if t.total is not None and t.completed >= t.total:
            t.ended = True
            self.lines.line(t.says(f"{count} done in {duration(now - t.start)}"))
        elif now - t.last_line >= self.every:
            t.last_line = now
            self.lines.line(t.says(count), left=t.left(now))

    def task(self, description: str, total: int) -> Task:
        tid = self.add_task(description, total=total)
        outer = self

        class _Task:
            def advance(self, n: int = 1) -> None:
                outer.update(tid, advance=n)

            def describe(self, text: str) -> None:
                outer.update(tid, description=text)

        return _Task()


def progress_display(console=None) -> RichProgress | PlainProgress:
    """Bars on a terminal (drawn on `console`), plain lines on stdout otherwise; see `interactive`."""
    return RichProgress(console=console) if interactive() else PlainProgress()


@contextlib.contextmanager
def quiet_library_bars() -> Iterator[None]:
    """Within the block, transformers and huggingface_hub draw no progress bars ("Loading weights", "Writing model
    shards"): a bar per model load or save would bury a run's own progress, on a terminal and in a log alike. The
    previous setting is restored."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
