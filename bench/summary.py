"""The comparison table of framework runs, in Markdown: readable in a terminal and a README.

`pytest bench` and `python -m bench run` print it after a run; `python -m bench.report` prints it for saved runs and
builds its history tables from the same cell formats.
"""

from __future__ import annotations

from bench.record import RunRecord
from bench.text import markdown_cell

COLUMNS = ("framework", "version", "device", "replicas", "epochs", "median epoch s", "images/s", "test accuracy",
           "time to target s", "peak memory", "model TFLOP/s", "of matmul", "harness overhead", "vs fastest")
NONE = "–"


def mebibytes(value) -> str:
    return NONE if value is None else f"{value / 2**20:,.0f} MiB"


def peak_memory(record: RunRecord) -> str:
    value, kind = record.peak_memory
    return NONE if value is None else f"{mebibytes(value)} {kind}"


def seconds(value, digits: int = 2) -> str:
    return NONE if value is None else f"{value:.{digits}f}"


def percent(fraction, digits: int = 2) -> str:
    return NONE if fraction is None else f"{fraction:.{digits}%}"


def images_per_second(record: RunRecord) -> str:
    return NONE if record.images_per_second is None else f"{record.images_per_second:,.0f}"


def time_to_target(record: RunRecord) -> str:
    if record.test_accuracy is None:
        return NONE
    return "not reached" if record.time_to_target_s is None else seconds(record.time_to_target_s, 1)


def teraflops(value) -> str:
    return NONE if value is None else f"{value / 1e12:.3f}"


def markdown_table(columns, rows) -> str:
    """Every cell one cell on one line: a name holding "|", a newline or a terminal's escape is shown escaped."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(records: list[RunRecord]) -> str:
    fastest = {}  # per device: a CPU run is not "slower" than a GPU run, it runs elsewhere
    for record in records:
        if record.median_epoch_seconds:
            fastest[record.device] = min(fastest.get(record.device, record.median_epoch_seconds),
                                         record.median_epoch_seconds)
    rows = []
    for record in records:
        best, median = fastest.get(record.device), record.median_epoch_seconds
        rows.append([
            record.framework, record.framework_version or "?", record.device or "?", record.replicas, record.epochs,
            seconds(median), images_per_second(record), percent(record.test_accuracy), time_to_target(record), peak_memory(record),
            teraflops(record.achieved_flops_per_second), percent(record.matmul_utilization, 0),
            percent(record.harness_overhead, 1), NONE if not median or best is None else f"{best / median:.2f}×",
        ])
    return markdown_table(COLUMNS, rows)
