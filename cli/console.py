"""Where the CLI prints: results to stdout, progress and errors to stderr, every text printed literally.

Paths and data may hold square brackets ("out[/x]"), which rich would read as markup and then print
wrongly or fail on, so markup is off. A message may still open with one styled label, written as
"[bold red]gate failed:[/] the rest"; the rest is literal.
"""

from __future__ import annotations

import re

from rich.console import Console
from rich.text import Text

_LABEL = re.compile(r"\[(?P<style>[a-z ]+)\](?P<label>[^\[\]]+)\[/\](?P<rest>.*)", re.S)


class LiteralConsole(Console):
    def print(self, *objects, **kwargs) -> None:
        if objects and isinstance(objects[0], str) and (m := _LABEL.fullmatch(objects[0])):
            objects = (Text.assemble((m["label"], m["style"]), m["rest"]), *objects[1:])
        super().print(*objects, **kwargs)


out = LiteralConsole(markup=False)
err = LiteralConsole(stderr=True, markup=False)


def print_error(message: str, label: str = "error:") -> None:
    """One line on stderr, never wrapped: `label message`, the message as given with its line breaks joined."""
    one_line = re.sub(r"\s*\n\s*", " ", message.strip())  # only line breaks go: a path's own spaces stay
    err.print(Text.assemble((label, "bold red"), " ", one_line), soft_wrap=True, highlight=False)
