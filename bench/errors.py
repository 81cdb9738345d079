"""Errors the harness reports to the user as one line, without a traceback."""


class BenchError(Exception):
    """An error whose message is meant for the user: it names the input and how to fix it."""
