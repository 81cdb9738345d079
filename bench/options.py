"""The run options, declared once for both `pytest bench` (conftest.py) and `python -m bench run` (argparse), with the
checks that need nothing but the options: each refused in one line that names the option and its valid values."""

from __future__ import annotations

import argparse
import math
import re

from bench.errors import BenchError
from bench.worker import DEFAULT_CALL_TIMEOUT_S
from implementations import FRAMEWORKS, contract

# --worker-timeout: one call (an epoch, say) takes at least a second, and a week bounds any call: the operating system's
# waits refuse timeouts much longer than that.
TIMEOUT_RANGE_S = (1.0, 7 * 24 * 3600.0)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a framework's name: a pytest id, a file name, a table cell


def seconds(text: str) -> float:
    """A number of seconds as typed; NaN for text that is none, which every range refuses."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def worker_timeout(text: str) -> float:
    value = seconds(text)
    low, high = TIMEOUT_RANGE_S
    if not low <= value <= high:  # NaN fails too
        raise argparse.ArgumentTypeError(f"seconds from {low:.0f} to {high:.0f} (a week), got {text!r}")
    return value


def integer(text: str) -> int | str:
    """An integer as typed; other text is passed on for RunConfig to refuse, with the option's range in the message."""
    return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else text


def fraction(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text  # RunConfig refuses it, saying what a valid value is


PROGRESS_RANGE_S = (0.1, 3600.0)


def progress_interval(text: str) -> float:
    value = seconds(text)
    low, high = PROGRESS_RANGE_S
    if not (value == 0 or low <= value <= high):
        raise argparse.ArgumentTypeError(f"0 (no progress within an epoch) or seconds from {low} to {high:.0f}, "
                                         f"got {text!r}")
    return value


# (flag, add_argument keywords); None defaults mean "the preset's value". Integer ranges are RunConfig's.
RUN_OPTIONS = [
    ("--preset", dict(default="full", choices=sorted(contract.PRESETS),
                      help="starting configuration: full (5 epochs, all images) or smoke (a short CPU run); "
                           "the options below override it")),
    ("--epochs", dict(type=integer, default=None, help=f"training epochs, 1 to {contract.MAX_EPOCHS:,} (full: 5)")),
    ("--batch-size", dict(type=integer, default=None,
                          help="training batch size, 2 to the training images (full: 128); the peak learning rate "
                               "scales with it, 0.1 per 256")),
    ("--train-subset", dict(type=integer, default=None,
                            help="train on the first N images only, from the batch size to 60,000 (full: all)")),
    ("--test-subset", dict(type=integer, default=None,
                           help="evaluate on the first N test images only, a multiple of 1000 (default: all 10,000)")),
    ("--replicas", dict(type=integer, default=None,
                        help=f"data-parallel replicas on the framework's own engine, 1 to {contract.MAX_REPLICAS}, "
                             "dividing the batch size (default 1); frameworks without an engine are skipped")),
    ("--device", dict(default=None, choices=contract.DEVICES, help="auto: CUDA when present, else CPU")),
    ("--seed", dict(type=integer, default=None,
                    help=f"seed of the initial weights and the data order, 0 to {contract.MAX_SEED:,} (default 0)")),
    ("--precision", dict(default=None, choices=contract.PRECISIONS, help="fp32, or bf16 mixed precision")),
    ("--no-tf32", dict(action="store_true", default=False, help="CUDA: strict fp32, no TF32 tensor cores")),
    ("--compile", dict(action="store_true", default=False,
                       help="use the framework's optional compiler (torch.compile, TensorFlow XLA)")),
    ("--min-accuracy", dict(type=fraction, default=None,
                            help="required test accuracy, a fraction from 0 to 1 (full: 0.993)")),
    ("--mnist-dir", dict(default=None, help="folder with the four MNIST IDX files (.gz or not); default: $MNIST_DIR, "
                                            "then the user cache, else a verified download")),
    ("--no-verify-digests", dict(action="store_true", default=False,
                                 help="skip the SHA-256 check of the MNIST files (custom data in MNIST format)")),
    ("--worker-timeout", dict(type=worker_timeout, default=DEFAULT_CALL_TIMEOUT_S,
                              help="seconds one worker call (an epoch, say) may take before the worker is stopped, "
                                   f"{TIMEOUT_RANGE_S[0]:.0f} to {TIMEOUT_RANGE_S[1]:.0f}")),
    ("--progress-interval", dict(type=progress_interval, default=contract.PROGRESS_INTERVAL_S,
                                 help="seconds between progress lines within an epoch, 0.1 to 3600, or 0 for none "
                                      f"(default {contract.PROGRESS_INTERVAL_S:.0f}); a line costs one device "
                                      "synchronization")),
    ("--framework-module", dict(action="append", default=[], metavar="NAME=MODULE:CLASS",
                                help="also run an implementation from outside this repository, under a name of its "
                                     "own (repeatable)")),
]
REPEATABLE = {"--framework-module"}


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def run_config(values: dict) -> contract.RunConfig:
    """The RunConfig named by parsed option values ({dest: value}); a ConfigError names a bad option."""
    return contract.preset(values["preset"]).with_options(
        epochs=values["epochs"], batch_size=values["batch_size"], train_subset=values["train_subset"],
        test_subset=values["test_subset"], replicas=values["replicas"],
        device=values["device"], seed=values["seed"], precision=values["precision"], min_accuracy=values["min_accuracy"],
        allow_tf32=False if values["no_tf32"] else None, compile=True if values["compile"] else None)


def check_given_once(args: list[str], flags: list[str]) -> None:
    """A BenchError naming an option of `flags` given more than once in `args`: the last would silently win."""
    for flag in flags:
        given = [arg for arg in args if arg == flag or arg.startswith(f"{flag}=")]
        if len(given) > 1 and flag not in REPEATABLE:
            raise BenchError(f"{flag} is given {len(given)} times ({', '.join(given)}); give it once")


def framework_modules(texts: list[str]) -> dict[str, str]:
    """--framework-module NAME=package.module:Class values as {name: module}; a BenchError names a bad one."""
    modules = {}
    for text in texts:
        name, _, module = text.partition("=")
        if not name or ":" not in module:
            raise BenchError(f"--framework-module {text!r}: expected NAME=package.module:TrainerClass")
        if not NAME.match(name):
            raise BenchError(f"--framework-module {text!r}: a name is letters, digits and _ . + - (it names the "
                             "record, the test and the plots)")
        if name in FRAMEWORKS:
            raise BenchError(f"--framework-module {text!r}: {name} is a registered framework; give your "
                             "implementation a name of its own")
        if name in modules:
            raise BenchError(f"--framework-module names {name} twice; give each implementation a name of its own")
        modules[name] = module
    return modules
