"""Where the CLI prints: results to stdout, progress and errors to stderr, every text printed literally.

Paths and data may hold square brackets ("out[/x]"), which rich would read as markup and then print
wrongly or fail on, so markup is off. A message may still open with one styled label, written as
"[bold red]gate failed:[/] the rest"; the rest is literal.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from rich.console import Console
from rich.text import Text

_LABEL = re.compile(r"\[(?P<style>[a-z ]+)\](?P<label>[^\[\]]+)\[/\](?P<rest>.*)", re.S)


class LiteralConsole(Console):
    def print(self, *objects, **kwargs) -> None:
        if objects and isinstance(objects[0], str) and (m := _LABEL.fullmatch(objects[0])):
            objects = (Text.assemble((m["label"], m["style"]), m["rest"]), *objects[1:])
        if plain():
            objects, kwargs = _plain_print(self, objects, kwargs)
        super().print(*objects, **kwargs)


out = LiteralConsole(markup=False)
err = LiteralConsole(stderr=True, markup=False)


def print_error(message: str, label: str = "error:") -> None:
    """One line on stderr, never wrapped: `label message`, the message as given with its line breaks joined."""
    one_line = re.sub(r"\s*\n\s*", " ", message.strip())  # only line breaks go: a path's own spaces stay
    err.print(Text.assemble((label, "bold red"), " ", one_line), soft_wrap=True, highlight=False)


# --- Output a CI log can read --------------------------------------------------------------------------------------
# Without a terminal (stdout or stderr redirected, or a CI variable set) there are no spinners or live displays:
# progress is one plain line per stage, tables are Markdown (no cell cut to fit 80 columns), lines are never wrapped.

_COUNT = re.compile(r"\b(?P<i>\d+)\s*(?:/|of)\s*(?P<n>\d+)\b")


def plain() -> bool:
    """True when the output goes to a log, not a person's terminal."""
    import os

    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return True
    return not (out.is_terminal and err.is_terminal)


def markdown_table(table) -> str:
    """A rich Table as a Markdown table (its title a line above it), every cell whole and every row on one line."""

    def cell(value) -> str:
        text = value.plain if isinstance(value, Text) else str(value)
        return re.sub(r"\s*\n\s*", " ", text).replace("|", "\\|")

    columns = table.columns
    rows = [[cell(c.header) for c in columns]]
    rows.append(["---"] * len(columns))
    for i in range(table.row_count):
        rows.append([cell(c._cells[i]) if i < len(c._cells) else "" for c in columns])
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    title = table.title.plain if isinstance(table.title, Text) else table.title
    return "\n".join(([f"{title}:"] if title else []) + lines)


def _plain_print(console: Console, objects, kwargs) -> tuple:
    from rich.table import Table

    if objects and isinstance(objects[0], Table):
        return (markdown_table(objects[0]), *objects[1:]), {**kwargs, "soft_wrap": True, "highlight": False}
    return objects, {**kwargs, "soft_wrap": True}


class _Count(NamedTuple):
    """What `Progress.estimate` remembers of the count in progress."""

    key: str  # the message with its number taken out: which count this is
    first: int  # the first item seen
    began: float  # when it began
    item: int  # the item running now
    item_began: float  # when it began


class Progress:
    """What a long command is doing: a spinner on a terminal; in a log, one line per stage with the seconds since the
    start and, when the message counts (`3/8`, `3 of 8`), an estimate of the time the count has left (`estimate`)."""

    def __init__(self, title: str):
        import time

        self.title, self._clock = title, time.perf_counter
        self.start = self._clock()
        self._status = None
        self._untitled = False
        self._counted: _Count | None = None

    def __enter__(self) -> "Progress":
        if plain():
            self._untitled = True  # the title is printed with the first update: a bad input stays one error line
        else:
            self._status = err.status(self.title)
            self._status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)

    def line(self, message: str) -> None:
        err.print(f"[{self.elapsed():7.1f}s] {message}", highlight=False, soft_wrap=True)

    def elapsed(self) -> float:
        return self._clock() - self.start

    def estimate(self, message: str) -> str:
        """' (about N s left for items i-n)' when the message says item i of n and earlier items of the same count were
        timed to their end: the average of the finished items, times the items from i on, less the time item i has
        already run. Once item i has run longer than the average, what it has left is not known: the estimate says so
        and gives the later items' share. It covers the count only: what a command does after its last item (writing,
        checking) is not in it."""
        m = _COUNT.search(message)
        if m is None:
            return ""
        i, n = int(m["i"]), int(m["n"])
        key = f"{message[: m.start()]}#/{n}"
        now = self._clock()
        c = self._counted
        if c is None or c.key != key or i < c.item:
            c = _Count(key, i, now, i, now)
        elif i > c.item:
            c = c._replace(item=i, item_began=now)
        self._counted = c
        if i == c.first:
            return ""
        average = (c.item_began - c.began) / (i - c.first)
        running = now - c.item_began
        if running < average:
            return f" (about {average * (n - i + 1) - running:.0f}s left for {_items(i, n)})"
        later = f"; about {average * (n - i):.0f}s for {_items(i + 1, n)}" if i < n else ""
        return f" (item {i} is past the {average:.0f}s average{later})"

    def update(self, message: str) -> None:
        if self._status is not None:
            self._status.update(message)
            return
        if self._untitled:
            self._untitled = False
            self.line(self.title)
        self.line(message + self.estimate(message))


def _items(i: int, n: int) -> str:
    return f"item {n}" if i == n else f"items {i}-{n}"


def progress(title: str) -> Progress:
    """`with progress("prune: preparing") as p: work(progress=p.update)`."""
    return Progress(title)


def summary(text: str) -> None:
    """The last line of a command: `summary: ...`, on stdout, one line."""
    out.print(f"summary: {text}", highlight=False, soft_wrap=True)
