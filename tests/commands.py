"""The commands a user runs, run by the tests as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# Options of a run that exercises the harness, not learning: two steps of 128 images, one evaluation batch.
QUICK = ("--preset", "smoke", "--epochs", "1", "--train-subset", "256", "--test-subset", "1000", "--min-accuracy", "0")
REAL_SESSION_IMAGES = 512  # the training images of the real `pytest bench` session (tests/conftest.py): 4 batches


def run_python(*args, timeout=600, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository, with tests/ on the path (faulty_trainers)."""
    environment = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=environment)


def run_python_side_by_side(*commands: tuple[str, ...], **kwargs) -> list[subprocess.CompletedProcess]:
    """Each command (a tuple of `python` arguments) as run_python runs it, all at once: commands that end in a usage
    error spend most of their time starting an interpreter, one core each."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: run_python(*args, **kwargs), commands))
