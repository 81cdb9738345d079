"""The run options, declared once for both `pytest bench` (conftest.py) and `python -m bench run` (argparse)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from bench.errors import BenchError
from bench.worker import DEFAULT_CALL_TIMEOUT_S
from implementations import contract


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"positive, finite seconds, got {text!r}")
    return value


# (flag, add_argument keywords); None defaults mean "the preset's value".
RUN_OPTIONS = [
    ("--preset", dict(default="full", choices=sorted(contract.PRESETS),
                      help="starting configuration: full (5 epochs, all images) or smoke (a short CPU run); "
                           "the options below override it")),
    ("--epochs", dict(type=int, default=None, help="training epochs (full: 5)")),
    ("--batch-size", dict(type=int, default=None,
                          help="training batch size (full: 128); the peak learning rate scales with it, 0.1 per 256")),
    ("--train-subset", dict(type=int, default=None, help="train on the first N images only (full: all 60,000)")),
    ("--test-subset", dict(type=int, default=None,
                           help="evaluate on the first N test images only, a multiple of 1000 (default: all 10,000)")),
    ("--replicas", dict(type=int, default=None,
                        help="data-parallel replicas on the framework's own engine (default 1): each batch is split "
                             "over them; frameworks without an engine are skipped")),
    ("--device", dict(default=None, choices=contract.DEVICES, help="auto: CUDA when present, else CPU")),
    ("--seed", dict(type=int, default=None, help="seed of the initial weights and the data order (default 0)")),
    ("--precision", dict(default=None, choices=contract.PRECISIONS, help="fp32, or bf16 mixed precision")),
    ("--no-tf32", dict(action="store_true", default=False, help="CUDA: strict fp32, no TF32 tensor cores")),
    ("--compile", dict(action="store_true", default=False,
                       help="use the framework's optional compiler (torch.compile, TensorFlow XLA)")),
    ("--min-accuracy", dict(type=float, default=None, help="required test accuracy, a fraction (full: 0.993)")),
    ("--mnist-dir", dict(default=None, help="folder with the four MNIST IDX files (.gz or not); default: $MNIST_DIR, "
                                            "then the user cache, else a verified download")),
    ("--no-verify-digests", dict(action="store_true", default=False,
                                 help="skip the SHA-256 check of the MNIST files (custom data in MNIST format)")),
    ("--worker-timeout", dict(type=positive_seconds, default=DEFAULT_CALL_TIMEOUT_S,
                              help="seconds one worker call (an epoch, say) may take before the worker is stopped")),
]


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def run_config(values: dict) -> contract.RunConfig:
    """The RunConfig named by parsed option values ({dest: value}); a ConfigError names a bad option."""
    return contract.preset(values["preset"]).with_options(
        epochs=values["epochs"], batch_size=values["batch_size"], train_subset=values["train_subset"],
        test_subset=values["test_subset"], replicas=values["replicas"],
        device=values["device"], seed=values["seed"], precision=values["precision"], min_accuracy=values["min_accuracy"],
        allow_tf32=False if values["no_tf32"] else None, compile=True if values["compile"] else None)


def mnist_dir(values: dict) -> str | None:
    folder = values["mnist_dir"] or os.environ.get("MNIST_DIR") or None
    if folder is not None and not os.path.isdir(folder):
        source = "--mnist-dir" if values["mnist_dir"] else "MNIST_DIR"
        raise BenchError(f"{source} {folder!r} is not a folder; point it at the folder that holds the MNIST IDX files")
    return folder


def check_output_path(path: Path, option: str) -> None:
    """Refuse, before any training, an output file that exists or could not be created: the run's record must land."""
    if os.path.lexists(path):
        what = "is a dangling symbolic link" if path.is_symlink() and not path.exists() else "exists"
        raise BenchError(f"{option} {path} {what}: results are never overwritten; choose a new file name")
    folder = path.parent
    while not folder.exists():  # the folders that would be created, up to the first that exists
        if os.path.lexists(folder):
            raise BenchError(f"{option} {path}: {folder} is a dangling symbolic link; choose another place")
        folder = folder.parent
    if not folder.is_dir():
        raise BenchError(f"{option} {path}: {folder} is a file, not a folder; choose another place")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BenchError(f"{option} {path}: the folder {folder} is not writable; choose another place")
