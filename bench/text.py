"""Names shown to people, made safe: file names and the names inside records reach terminals, Markdown tables,
matplotlib labels and HTML pages, and none of those may read them as anything but plain text."""

from __future__ import annotations

import os
import re

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text) -> str:
    """One line that any terminal shows as it is: bytes of a file name that are not UTF-8 as `\\xff`, a lone surrogate
    from JSON as `\\udcff`, control characters (a newline, a terminal's escape) as their backslash escapes."""
    text = str(text)
    try:
        text = os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file system byte stands for: it came from JSON
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return CONTROL.sub(lambda control: control.group().encode("unicode_escape").decode("ascii"), text)


def markdown_cell(text) -> str:
    """A table cell that stays one cell: printable, with `|` escaped."""
    return printable(text).replace("|", "\\|")
