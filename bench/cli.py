"""How every command of the harness ends when its standard output cannot be written.

A reader that went away (`python -m bench.report runs/ | head`) ends the command quietly, as Unix tools end: no
message, exit status 141 (128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe). Output that
cannot be written for another reason (a full disk, `> /dev/full`) is one line on stderr and exit status 2, the
harness's status for bad input or output, never a traceback and never the gate's 1 ("regression").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

CLOSED_PIPE_STATUS = 128 + 13  # SIGPIPE
OUTPUT_ERROR_STATUS = 2


class OutputError(Exception):
    """Writing standard output failed: the OSError is its cause."""


class GuardedStdout:
    """sys.stdout, whose write and flush failures are OutputErrors: told apart from the files a command reads."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as error:
            raise OutputError(error) from error

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as error:
            raise OutputError(error) from error

    def __getattr__(self, name):
        return getattr(self.stream, name)


def run(main: Callable[[], int]) -> int:
    """main()'s exit status, or the status for output that could not be written (see the module's docstring)."""
    stdout = sys.stdout = GuardedStdout(sys.stdout)
    try:
        status = main()
        stdout.flush()
        return status
    except OutputError as failure:
        error = failure.__cause__
        # Nothing more may reach the closed or full stream, not even the interpreter's own flush at exit.
        sys.stdout = stdout.stream
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        if isinstance(error, BrokenPipeError):
            return CLOSED_PIPE_STATUS
        print(f"error: standard output could not be written ({error.strerror or error})", file=sys.stderr)
        return OUTPUT_ERROR_STATUS
