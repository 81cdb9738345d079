"""The files a run writes: checked before any training, written atomically, never over an existing file, and kept
elsewhere when they cannot be written at the end, with a message that says where.

Before anything trains, `check_new_files` creates and removes a file of every exact name that the run will write (the
target, its partial twin, the temporary file beside it): a folder that cannot be written, a name the file system
refuses (too long), a read-only mount show then, not after an hour of training. At the end, `write_new_file` writes a
temporary file beside the target and links it into place, which fails if the target appeared meanwhile (a rename would
replace it). If that fails, `keep_elsewhere` puts the text into the system's temporary folder, or on standard output.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from bench.errors import BenchError


def temporary_twin(path: Path) -> Path:
    """Where `path` is written before it is linked into place: short, so that any name that fits has a twin that fits."""
    return path.with_name(f".mnist-bench-{os.getpid()}.tmp")


def check_new_files(option: str, path: Path, *twins: Path) -> None:
    """Refuse, before any training, an output file that exists or could not be written: the run's records must land.
    `twins` are other names the run may write beside it (an interrupted run's partial file), probed where absent.
    Creates the missing folders (every option is valid by now); a BenchError names `option`, the file and why."""
    if os.path.lexists(path):
        what = "is a dangling symbolic link" if path.is_symlink() and not path.exists() else "exists"
        raise BenchError(f"{option} {path} {what}: results are never overwritten; choose a new file name")
    folder = path.parent
    created = []  # the folders this check makes, outermost first: removed again if the check fails
    while not folder.exists():
        if os.path.lexists(folder):
            raise BenchError(f"{option} {path}: {folder} is a dangling symbolic link; choose another place")
        created.insert(0, folder)
        folder = folder.parent
    if not folder.is_dir():
        raise BenchError(f"{option} {path}: {folder} is a file, not a folder; choose another place")
    try:
        for missing in created:
            missing.mkdir()
        for probe in (path, temporary_twin(path), *(twin for twin in twins if not os.path.lexists(twin))):
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            os.unlink(probe)
    except OSError as error:
        for made in reversed(created):
            with contextlib.suppress(OSError):  # not made, or not empty
                made.rmdir()
        raise BenchError(f"{option} {path}: {error.filename or path} cannot be written ({error.strerror}); choose "
                         "another place or a shorter name") from None


def write_new_file(path: Path, text: str) -> None:
    """`text` into a new file at `path`, whole or not at all: FileExistsError if `path` appeared meanwhile, another
    OSError if it cannot be written (no temporary file is left behind)."""
    temporary = temporary_twin(path)
    try:
        with open(temporary, "x") as file:
            file.write(text)
        os.link(temporary, path)  # fails if `path` exists, unlike a rename
    finally:
        temporary.unlink(missing_ok=True)


def keep_elsewhere(text: str, what: str) -> str:
    """`text` kept in a new file of the system's temporary folder, else printed; the sentence that says where."""
    kept = None
    try:
        descriptor, kept = tempfile.mkstemp(prefix="mnist-bench-", suffix=".json")
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        return f"the {what} kept in {kept}"
    except OSError:
        if kept is not None:
            os.unlink(kept)
        print(text, file=sys.stderr)
        return f"the {what} printed above"
