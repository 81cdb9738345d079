"""The comparison table of framework runs (records as in extra_info), in Markdown: readable in a terminal and a README."""

from __future__ import annotations

import statistics

COLUMNS = ("framework", "version", "device", "epochs", "median epoch s", "images/s", "test accuracy",
           "time to target s", "peak memory", "vs fastest")


def mebibytes(value) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f} MiB"


def peak_memory(record: dict) -> str:
    """GPU memory from NVML where there is a GPU, else the worker's peak resident memory."""
    if record.get("gpu_memory_peak_bytes") is not None:
        return f"{mebibytes(record['gpu_memory_peak_bytes'])} GPU"
    return f"{mebibytes(record.get('peak_rss_bytes'))} RSS"


def summary_table(records: list[dict]) -> str:
    medians = [statistics.median(r["epoch_seconds"]) if r.get("epoch_seconds") else None for r in records]
    fastest = min((m for m in medians if m), default=None)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for record, median in zip(records, medians):
        accuracy, to_target = record.get("test_accuracy"), record.get("time_to_target_s")
        speed = record.get("images_per_second")
        cells = [
            record.get("framework", "?"), record.get("framework_version", "?"), record.get("device", "?"),
            str(record.get("epochs", "?")),
            "–" if median is None else f"{median:.2f}",
            "–" if speed is None else f"{speed:,.0f}",
            "–" if accuracy is None else f"{accuracy:.2%}",
            "not reached" if to_target is None else f"{to_target:.1f}",
            peak_memory(record),
            "–" if median is None or fastest is None else f"{fastest / median:.2f}×",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
