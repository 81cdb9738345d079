"""The comparison table of framework runs (records as in extra_info), in Markdown: readable in a terminal and a README.

`pytest bench` and `python -m bench run` print it after a run; `python -m bench.report` prints it for saved runs and
builds its history tables from the same cell formats.
"""

from __future__ import annotations

import statistics

COLUMNS = ("framework", "version", "device", "epochs", "median epoch s", "images/s", "test accuracy",
           "time to target s", "peak memory", "vs fastest")
NONE = "–"
# A top-level key of `pytest bench`'s JSON: the frameworks the session set out to run (`--frameworks`, else every one).
SELECTED_FRAMEWORKS = "mnist_bench_selected_frameworks"


def median_epoch_seconds(record: dict) -> float | None:
    """The median epoch time; a record read back without per-epoch times carries pytest-benchmark's median instead."""
    if record.get("epoch_seconds"):
        return statistics.median(record["epoch_seconds"])
    return record.get("benchmark_median_s")


def peak_memory_bytes(record: dict) -> tuple[int | None, str]:
    """GPU memory from NVML where there is a GPU, else the worker's peak resident memory; and which: "GPU" or "RSS"."""
    if record.get("gpu_memory_peak_bytes") is not None:
        return record["gpu_memory_peak_bytes"], "GPU"
    return record.get("peak_rss_bytes"), "RSS"


def mebibytes(value) -> str:
    return NONE if value is None else f"{value / 2**20:,.0f} MiB"


def peak_memory(record: dict) -> str:
    value, kind = peak_memory_bytes(record)
    return NONE if value is None else f"{mebibytes(value)} {kind}"


def seconds(value, digits: int = 2) -> str:
    return NONE if value is None else f"{value:.{digits}f}"


def percent(fraction) -> str:
    return NONE if fraction is None else f"{fraction:.2%}"


def images_per_second(record: dict) -> str:
    value = record.get("images_per_second")
    return NONE if value is None else f"{value:,.0f}"


def time_to_target(record: dict) -> str:
    if record.get("test_accuracy") is None:
        return NONE
    return "not reached" if record.get("time_to_target_s") is None else seconds(record["time_to_target_s"], 1)


def markdown_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(records: list[dict]) -> str:
    medians = [median_epoch_seconds(r) for r in records]
    fastest = {}  # per device: a CPU run is not "slower" than a GPU run, it runs elsewhere
    for record, median in zip(records, medians):
        if median:
            device = record.get("device")
            fastest[device] = min(fastest.get(device, median), median)
    rows = []
    for record, median in zip(records, medians):
        best = fastest.get(record.get("device"))
        relative = NONE if not median or best is None else f"{best / median:.2f}×"
        rows.append([
            record.get("framework", "?"), record.get("framework_version", "?"), record.get("device", "?"),
            record.get("epochs", "?"), seconds(median), images_per_second(record), percent(record.get("test_accuracy")),
            time_to_target(record), peak_memory(record), relative,
        ])
    return markdown_table(COLUMNS, rows)
