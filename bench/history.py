"""Benchmark histories compared: each framework's changes found, tested and named by the commit that made them.

    python -m bench.history RUN_OR_FOLDER... [--json FILE] [--html FILE] [--alpha 0.01] [--min-time-change 0.1]
                            [--min-memory-change 0.1] [--min-accuracy-change 0.5]
    python -m bench.history --calibrate FOLDER

Reads pytest-benchmark files (`make bench`'s autosave folder, `--benchmark-json` files, older record schemas) as the
report does (bench/record.py). Runs are grouped into series, one per machine and device, framework and run
configuration, and ordered by the time of their commit (`commit_info.time`); the runs of one commit are pooled, those
of a dirty tree apart from the clean ones and marked. Epoch times are in units of the machine's speed (the record's
matmul yardstick, as the gate compares them), so that a uniformly slower machine is not a change.

Each series of each metric (epoch time, test accuracy, peak GPU, allocator and resident memory) is segmented by
ruptures' PELT on the commits' medians, with a penalty matched to the series' own noise; each change point is then
confirmed between the runs of its two segments by a Mann-Whitney U test, Bonferroni-corrected for the number of
series tested, and must move the median by at least a minimum effect. Exit status: 1 when a regression is found, 0
when none, 2 on bad input (a file given by name that is not a run; in a folder such a file is named and skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bench import cli
from bench.errors import BenchError
from bench.output import check_new_files, write_new_file
from bench.changes import (METRICS, Change, Commit, Metric, Series, Thresholds, add_threshold_options, before_and_after,
                           commits_of, compare_with_history, find_changes, scale, series_of, shown_effect,
                           thresholds_of)
from bench.record import NORMALIZED_TIME_UNIT, load_runs
from bench.text import printable


# --- Calibration on repeated runs of one commit -------------------------------------------------------------------------
def calibration(series_list: list[Series], thresholds: Thresholds) -> tuple[list[Table], list[str]]:
    """The noise of repeated runs of one commit, per series and metric: the spread, the largest distance of a run
    from its commit's median, and how many runs the gate would fail if each were gated against the others. Then, per
    kind of metric, whether the thresholds hold on that noise: no gate alarm, and no change found among the runs when
    each is taken as a commit of its own (what a history of one run per commit would be)."""
    tables: dict[str, Table] = {}
    largest: dict[str, float] = {}
    metric_of: dict[str, Metric] = {}  # kind -> one of its metrics: the thresholds' minimum is per kind
    alarms: dict[str, list[int]] = {}  # kind -> [runs the gate fails, runs gated]
    for series in series_list:
        for metric in METRICS:
            for commit, values in series.samples(metric):
                if len(values) < 3:
                    continue
                scaled = scale(metric, values)
                excursion = float(np.max(np.abs(scaled - np.median(scaled))))
                kind = kind_of(metric)
                metric_of[kind] = metric
                largest[kind] = max(largest.get(kind, 0.0), excursion)
                failed = sum(compare_with_history(metric, values[:index] + values[index + 1:], values[index], 1,
                                                  thresholds).regression(thresholds) for index in range(len(values)))
                counts = alarms.setdefault(kind, [0, 0])
                counts[0], counts[1] = counts[0] + failed, counts[1] + len(values)
                size = (lambda spread: f"{math.expm1(spread):.1%}") if metric.relative else (lambda spread: f"{spread:.2f} pt")
                if series.machine not in tables:
                    tables[series.machine] = narrow_table(f"Repeated runs on {series.machine}", (
                        "framework", "metric", "commit", "runs", "sd", "largest off", "gate alarms"),
                        caption="sd: the spread of the runs; largest off: the largest distance of one run from their "
                                "median; gate alarms: the runs bench.gate --history fails when gated against the others")
                tables[series.machine].add_row(*map(Text, (
                    printable(series.framework), metric.short, commit.label, str(len(values)),
                    size(float(np.std(scaled, ddof=1))), size(excursion), f"{failed} of {len(values)}")))
    changes, _ = find_changes(runs_as_commits(series_list), thresholds)
    advice = []
    for kind, excursion in sorted(largest.items()):
        current = thresholds.minimum(metric_of[kind])
        needed = math.expm1(excursion) if kind != "accuracy" else excursion
        shown = (lambda value: f"{value:.1%}") if kind != "accuracy" else (lambda value: f"{value:.2f} points")
        found = [change for change in changes if kind_of(change.metric) == kind]
        failed, gated = alarms[kind]
        larger = f"needs a larger minimum change, towards the largest excursion of one run, {shown(needed)}"
        found_in = ", ".join(printable(change.series.framework) for change in found)
        advice.append(
            f"{kind}: at a minimum change of {shown(current)}, bench.gate --history fails {failed} of {gated} "
            f"runs gated against the others ({larger if failed else 'it holds'}); bench.history finds {len(found)} "
            f"change(s) among the runs taken as commits of their own ("
            f"{found_in + ': ' + larger if found else 'it holds'})")
    return list(tables.values()), advice


def kind_of(metric: Metric) -> str:
    return "time" if metric.name == "epoch_time" else "memory" if metric.relative else "accuracy"


def runs_as_commits(series_list: list[Series]) -> list[Series]:
    """Each commit's repeated runs (3 or more) as a series of their own, each run a commit of its own in the order the
    runs started: a change found there is a false alarm."""
    split = []
    for series in series_list:
        for commit in {id(commit): commit for commit, _, _ in series.points}.values():
            points = [(Commit(None, False, run.started, [run]), run, record)
                      for pooled, run, record in series.points if pooled is commit]
            if len(points) >= 3:
                split.append(Series(series.machine, series.framework, f"{series.configuration}, {commit.label}",
                                    sorted(points, key=lambda point: point[0].order)))
    return split


# --- Output -----------------------------------------------------------------------------------------------------------
def narrow_table(title: str, headers: tuple[str, ...], **options) -> Table:
    """A table whose cells are never wrapped and whose frame takes no columns of its own: rows stay rows in 80."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                  title_justify="left", caption_justify="left", **options)
    for header in headers:
        table.add_column(header, no_wrap=True)
    return table


def changes_tables(changes: list[Change]) -> list[Table]:
    """One table per machine, narrow enough for an 80-column terminal: each change's first commit, its effect and
    the medians before and after; the last good commit and the run counts are in --json and --html."""
    tables = {}
    for change in changes:
        machine = change.series.machine
        if machine not in tables:
            tables[machine] = narrow_table(f"Changes on {machine}",
                                           ("framework", "metric", "change", "commit", "before → after", "p"),
                                           caption=f"epoch time: {NORMALIZED_TIME_UNIT}")
        tables[machine].add_row(*map(Text, (
            printable(change.series.framework), change.metric.short,
            f"{shown_effect(change.metric, change.effect)} {'worse' if change.direction == 'regression' else 'better'}",
            change.first.label,
            before_and_after(change), f"{change.p_value:.0e}")))
    return list(tables.values())


def write_output(option: str, path: Path, text: str) -> None:
    """A new file, whole or not at all (bench/output.py); derived from the runs, so not kept elsewhere if it fails."""
    try:
        write_new_file(path, text)
    except FileExistsError:
        raise BenchError(f"{option} {printable(path)} appeared meanwhile and is left as it was; run again with another "
                         "name") from None
    except OSError as error:
        raise BenchError(f"{option} {printable(path)} could not be written ({error.strerror})") from None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_FOLDER",
                        help="pytest-benchmark JSON files, or folders of them (results/history)")
    parser.add_argument("--json", metavar="FILE", help="write the changes as JSON to this new file")
    parser.add_argument("--html", metavar="FILE", help="write a self-contained HTML report to this new file")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure the noise of repeated runs of one commit and the minimum changes it calls for")
    add_threshold_options(parser)
    args = parser.parse_args(argv)
    thresholds = thresholds_of(args)
    console = Console(highlight=False)
    try:
        for option in ("json", "html"):
            if getattr(args, option):
                check_new_files(f"--{option}", Path(getattr(args, option)))
        runs = load_runs(args.runs, warn)
        commits = commits_of(runs)
        series_list = series_of(commits)
        if args.calibrate:
            tables, advice = calibration(series_list, thresholds)
            for table in tables:
                console.print(table)
            print("\n".join(advice) if advice else "no commit with 3 runs or more: nothing to calibrate on")
            return 0
        changes, tests = find_changes(series_list, thresholds)
        if args.json:
            write_output("--json", Path(args.json), json.dumps({
                "changes": [change.to_json() for change in changes], "series_tested": tests, "runs": len(runs),
                "commits": len(commits), "thresholds": asdict(thresholds)}, indent=2))
        if args.html:
            from bench.history_html import page  # plotly is imported only when a page is asked for
            write_output("--html", Path(args.html), page(series_list, changes, thresholds))
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(runs)} runs of {len(commits)} commits, {len(series_list)} series ({tests} with two commits or more "
          "to compare)")
    for table in changes_tables(changes):
        console.print(table)
    regressions = sum(change.direction == "regression" for change in changes)
    print(f"{regressions} regression(s), {len(changes) - regressions} improvement(s)" if changes else "no changes found")
    return 1 if any(change.direction == "regression" for change in changes) else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
