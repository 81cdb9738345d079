"""Run files derived from the real session's JSON: what other runs, machines and harness versions would have written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

FRAMEWORK = "mine"  # the real session's framework: the PyTorch page run as an outside implementation


def entry(data: dict) -> dict:
    (only,) = data["benchmarks"]
    return only


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def variant(data: dict, **extra_info) -> dict:
    changed = copy.deepcopy(data)
    entry(changed)["extra_info"].update(extra_info)
    return changed


def renamed(data: dict) -> dict:
    """The same framework under another test name and options, as after a refactoring of the suite."""
    changed = variant(data, test_accuracy=entry(data)["extra_info"]["test_accuracy"] - 0.02)
    entry(changed).update(name="test_mnist[torch-eager]", fullname="bench/test_mnist.py::test_mnist[torch-eager]",
                          param="torch-eager", group="renamed group")
    return changed


def on_other_machine(data: dict) -> dict:
    changed = copy.deepcopy(data)
    changed["machine_info"]["cpu"]["brand_raw"] = "Intel Xeon Platinum 8480"
    return changed
