"""Saved benchmark runs as Markdown tables and PNG plots, with each framework's history per device.

    python -m bench.report RUN [RUN ...] [--plots DIR]

A RUN is a pytest-benchmark JSON file (`pytest bench --benchmark-json=FILE`) or a folder of them (the
`--benchmark-autosave` storage, results/history/<machine>/NNNN_<commit>_<date>.json), whose runs are read in the order
they ran. Entries are matched by framework name, so renamed tests and changed options still line up; runs on different
devices are never compared, and epoch times of one device are compared in units of the machine's speed (the record's
matmul yardstick), as the gate compares them. Every input is read and checked before anything is written; a bad input
is one line on stderr and exit status 2, and in a folder a file that is not a run is named on stderr and skipped.
Every plot file is tried before the first is drawn; plots are drawn again from the runs at every call and replace the
files of the same name.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bench import cli
from bench.errors import BenchError
from bench.output import temporary_twin
from bench.record import NORMALIZED_TIME_UNIT, RunFile, RunRecord, load_runs
from bench.summary import NONE, images_per_second, markdown_table, peak_memory, percent, seconds, summary_table
from bench.text import printable

Series = dict[str, list[tuple[RunFile, RunRecord]]]  # framework -> its (run, record) in run order, on one device


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def histories(runs: list[RunFile]) -> dict[str, Series]:
    """device -> framework -> [(run, record)] in run order: the series that can be compared."""
    series = {}
    for run in runs:
        for framework, record in run.by_framework().items():
            series.setdefault(run.device(record), {}).setdefault(framework, []).append((run, record))
    return series


def runs_of(frameworks: Series) -> list[RunFile]:
    runs = {id(run): run for entries in frameworks.values() for run, _ in entries}
    return list(runs.values())


# --- Tables -----------------------------------------------------------------------------------------------------------
HISTORY_COLUMNS = ("framework", "run", "date", "commit", "version", "epochs", "train images", "median epoch s",
                   "Δ time", "images/s", "test accuracy", "Δ accuracy", "peak memory", "Δ memory")
TIME_CHANGE_NOTE = ("Δ time: the median epoch time relative to the matmul rate each session measured (the machine's "
                    "speed), as the gate compares it; marked \"s\" where a run has no yardstick and seconds are compared")
# Run options that leave the work of one epoch unchanged (evaluation is not timed).
TIMING_NEUTRAL = {"seed", "min_accuracy", "epochs", "test_subset"}


def relative_change(old, new) -> str:
    return NONE if not old or new is None else f"{new / old - 1:+.0%}"


def time_change(first: RunRecord, record: RunRecord) -> str:
    """In units of the machine's speed where both runs timed the yardstick, else in seconds, marked."""
    if first.normalized_epoch_time is not None and record.normalized_epoch_time is not None:
        return relative_change(first.normalized_epoch_time, record.normalized_epoch_time)
    change = relative_change(first.median_epoch_seconds, record.median_epoch_seconds)
    return change if change == NONE else f"{change} s"


def history_table(frameworks: Series) -> str:
    """Each framework's runs, with changes relative to its first run on this device."""
    rows = []
    for framework, entries in frameworks.items():
        first = entries[0][1]
        for index, (run, record) in enumerate(entries):
            later = index > 0
            (memory, kind), (first_memory, first_kind) = record.peak_memory, first.peak_memory
            accuracy_change = later and None not in (record.test_accuracy, first.test_accuracy)
            rows.append([
                framework, run.label, run.date or NONE, run.commit, record.framework_version or "?", record.epochs,
                record.train_images or "?", seconds(record.median_epoch_seconds),
                time_change(first, record) if later else NONE,
                images_per_second(record), percent(record.test_accuracy),
                f"{(record.test_accuracy - first.test_accuracy) * 100:+.2f} pt" if accuracy_change else NONE,
                peak_memory(record), relative_change(first_memory, memory) if later and kind == first_kind else NONE,
            ])
    return markdown_table(HISTORY_COLUMNS, rows)


SCALING_COLUMNS = ("framework", "run", "replicas", "devices", "processes", "threads per replica", "images/s",
                   "per replica", "scaling efficiency")


def scaling_table(frameworks: Series) -> str | None:
    """Each data-parallel run beside the same framework's latest one-replica run on this device (None: no such run)."""
    rows = []
    for framework, entries in frameworks.items():
        singles = [record for _, record in entries if record.replicas == 1]
        for run, record in entries:
            if record.replicas > 1:
                per_replica = record.images_per_second_per_replica
                rows.append([framework, run.label, record.replicas, ", ".join(record.devices) or NONE,
                             record.processes, record.threads_per_replica or NONE, images_per_second(record),
                             NONE if per_replica is None else f"{per_replica:,.0f}",
                             percent(record.scaling_efficiency(singles[-1]), 0) if singles else NONE])
    return markdown_table(SCALING_COLUMNS, rows) if rows else None


def config_changes(frameworks: Series) -> list[str]:
    """The run options that vary within each framework's series: what makes an epoch time differ besides the code."""
    notes = []
    for framework, entries in frameworks.items():
        configs = [record.options for _, record in entries]
        varying = [f"{key} {'/'.join(str(config.get(key)) for config in configs)}"
                   for key in sorted(set().union(*configs) - TIMING_NEUTRAL)
                   if len({repr(config.get(key)) for config in configs}) > 1]
        if varying:
            notes.append(f"{printable(framework)}: the runs differ in {', '.join(varying)}; epoch times of different settings "
                         "are not comparable (images/s is a fairer guide)")
    return notes


def report_text(runs: list[RunFile]) -> str:
    parts = []
    for run in runs:
        parts.append(f"## {run.label}: {run.date or 'undated'}, commit {run.commit}, {run.machine}\n\n"
                     f"`{run.shown_path}`")
        if run.records:
            parts.append(summary_table(run.records))
        rates = {record.matmul.description: record.matmul.flops_per_second for record in run.records if record.matmul}
        parts += [f"matmul yardstick: {rate / 1e9:,.0f} GFLOP/s ({what})" for what, rate in rates.items()]
        parts += [f"note: {note}" for note in run.notes]
        by_note = {}  # one line per note, naming the frameworks it concerns
        for record in run.records:
            for note in record.notes:
                by_note.setdefault(note, []).append(printable(record.framework))
        parts += [f"note ({', '.join(frameworks)}): {note}" for note, frameworks in by_note.items()]
    series = histories(runs)
    if len(runs) > 1 and len(series) > 1:
        parts.append(f"warning: these runs come from {len(series)} different devices ({'; '.join(series)}): each "
                     "device has its own history; figures are never compared across devices")
    for device, frameworks in series.items():
        if len(runs_of(frameworks)) > 1:
            parts.append(f"## History on {device}\n\n{history_table(frameworks)}\n\n{TIME_CHANGE_NOTE}")
            parts += [f"note: {note}" for note in config_changes(frameworks)]
        scaling = scaling_table(frameworks)
        if scaling:
            parts.append(f"## Data parallel on {device}: throughput against one replica\n\n{scaling}")
    return "\n\n".join(parts)


# --- Plots ------------------------------------------------------------------------------------------------------------
def framework_styles(names: list[str]) -> dict[str, dict]:
    """One colour and marker per framework, the same in every plot: matplotlib's ten default hues, then their light
    twins with another marker, so that 17 rows stay apart."""
    palette = matplotlib.colormaps["tab20"].colors
    colors = palette[0::2] + palette[1::2]
    return {name: dict(color=colors[index % len(colors)], marker="o" if index % len(colors) < 10 else "s")
            for index, name in enumerate(names)}


def legend(where, axes_list, columns: int, **placement) -> None:
    """One legend for the lines of all `axes_list`, placed where it covers no data (below the panels, or in a panel
    of its own); labels passed explicitly, so that a name starting with "_" is shown, not taken for "hide me"."""
    handles = {}
    for axes in axes_list:
        for line in axes.lines:
            handles.setdefault(line.get_gid(), line)
    if handles:
        where.legend(handles.values(), handles.keys(), ncols=min(columns, len(handles)), fontsize="small", **placement)


def draw_run(figure: Figure, run: RunFile, styles: dict[str, dict]) -> None:
    """Time per epoch, test accuracy after each epoch, and, where the run measured it, model FLOP/s as a share of the
    measured matmul rate."""
    measured = [record for record in run.records if record.matmul_utilization is not None]
    panels = figure.subplots(1, 3 if measured else 2, width_ratios=(2, 2, 1.3) if measured else (1, 1))
    time_axes, accuracy_axes = panels[:2]
    several_devices = len({record.device for record in run.records}) > 1
    for record in run.records:
        label = printable(record.framework + (f" ({record.device})" if several_devices else ""))
        time_axes.plot(range(1, record.epochs + 1), record.epoch_seconds, gid=label, **styles[record.framework])
        accuracy_axes.plot(range(1, len(record.epoch_test_accuracy) + 1),
                           [100 * a for a in record.epoch_test_accuracy], gid=label, **styles[record.framework])
    for target in sorted({record.target_accuracy for record in run.records} - {None}):
        accuracy_axes.axhline(100 * target, color="grey", linestyle="--", linewidth=1, gid=f"target {target:.1%}")
    time_axes.set(title="Time per epoch", xlabel="epoch", ylabel="seconds")
    time_axes.set_ylim(bottom=0)
    accuracy_axes.set(title="Test accuracy after each epoch", xlabel="epoch", ylabel="%")
    for axes in (time_axes, accuracy_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if measured:
        utilization_axes = panels[2]
        utilization_axes.barh([printable(record.framework) for record in measured],
                              [100 * record.matmul_utilization for record in measured],
                              color=[styles[record.framework]["color"] for record in measured])
        utilization_axes.invert_yaxis()
        utilization_axes.set(title="Model FLOP/s, % of matmul rate", xlabel="%")
    for axes in panels:
        axes.grid(alpha=0.3)
    legend(figure, (time_axes, accuracy_axes), columns=6, loc="outside lower center")
    figure.suptitle(f"MNIST ResNet18, run {run.label} ({run.date}) on {run.machine}")


@dataclass(frozen=True)
class HistoryPanel:
    title: str
    unit: str
    value: Callable[[RunRecord], float | None]
    from_zero: bool = True  # False: a percentage near 100 that must not look flat


HISTORY_PANELS = (
    HistoryPanel("Median epoch time, in units of the machine's speed", NORMALIZED_TIME_UNIT,
                 lambda record: record.normalized_epoch_time),
    HistoryPanel("Model FLOP/s, % of the matmul rate", "%",
                 lambda record: None if record.matmul_utilization is None else 100 * record.matmul_utilization),
    HistoryPanel("Test accuracy", "%",
                 lambda record: None if record.test_accuracy is None else 100 * record.test_accuracy, from_zero=False),
    HistoryPanel("Time to target, in units of the machine's speed", NORMALIZED_TIME_UNIT,
                 lambda record: record.normalized(record.time_to_target_s)),
    HistoryPanel("Peak memory (GPU, or resident on CPU)", "MiB",
                 lambda record: None if record.peak_memory[0] is None else record.peak_memory[0] / 2**20),
)


def draw_history(figure: Figure, device: str, frameworks: Series, styles: dict[str, dict]) -> None:
    runs = runs_of(frameworks)
    position = {id(run): index for index, run in enumerate(runs)}
    grid = figure.subplots(2, 3)
    for axes, panel in zip(grid.flat, HISTORY_PANELS):
        for framework, entries in frameworks.items():
            points = [(position[id(run)], panel.value(record)) for run, record in entries
                      if panel.value(record) is not None]
            if points:
                axes.plot(*zip(*points), gid=printable(framework), **styles[framework])
        axes.set(title=panel.title, ylabel=panel.unit)
        if panel.from_zero:
            axes.set_ylim(bottom=0)
        elif axes.lines:
            low, high = axes.get_ylim()  # at least one point tall: seed noise of a tenth must not look like a cliff
            middle = (low + high) / 2
            axes.set_ylim(min(low, middle - 0.5), max(high, middle + 0.5))
        axes.set_xticks(range(len(runs)), [run.label for run in runs], rotation=30, ha="right", fontsize=8)
        axes.grid(alpha=0.3)
    grid.flat[-1].axis("off")
    legend(grid.flat[-1], grid.flat, columns=1 + (len(frameworks) > 10), loc="center", title="framework")
    figure.suptitle(f"MNIST ResNet18 history on {device}")


# --- Plot files: named apart, tried before the first is drawn -----------------------------------------------------------
MAX_NAME = 100  # characters of a plot name taken from a label: far inside every file system's 255 bytes


def slug(text: str) -> str:
    """A file name part in ASCII letters, digits, dots and dashes; a long one cut, with a digest of the whole."""
    name = re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-.").lower() or "run"
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 9]}-{hashlib.sha256(text.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    return name


@dataclass(frozen=True)
class Plot:
    path: Path
    draw: Callable[[Figure], None]
    size: tuple[float, float]  # inches


def planned_plots(runs: list[RunFile], folder: Path) -> list[Plot]:
    """A plot per run with records and per device with two runs or more, each in a file of its own: names that slug
    alike ("run_1", "run-1", "Run 1") get a number."""
    names = sorted({record.framework for run in runs for record in run.records})
    styles = framework_styles(names)
    wanted = [(f"{slug(run.label)}-epochs", lambda figure, run=run: draw_run(figure, run, styles),
               (15, 4.5 + 0.2 * math.ceil(len(run.records) / 6)))  # the legend's rows below the panels
              for run in runs if run.records]
    wanted += [(f"history-{slug(device)}", lambda figure, d=device, f=frameworks: draw_history(figure, d, f, styles),
                (15, 7.5)) for device, frameworks in histories(runs).items() if len(runs_of(frameworks)) > 1]
    plots, taken = [], set()
    for stem, draw, size in wanted:
        name, number = f"{stem}.png", 1
        while name.casefold() in taken:  # case-insensitive file systems (macOS, Windows) included
            number += 1
            name = f"{stem}-{number}.png"
        taken.add(name.casefold())
        plots.append(Plot(folder / name, draw, size))
    return plots


def try_plot_files(folder: Path, plots: list[Plot]) -> None:
    """Make the folder, then create and remove a file of every exact name that drawing will write (each plot where it
    is new, and its temporary twin): a folder that cannot be written, a file system that refuses a name, a folder
    standing where a plot goes, all show as an OSError before anything is drawn."""
    folder.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        if plot.path.is_dir():
            raise IsADirectoryError(21, "a folder stands where the plot goes", str(plot.path))
        for probe in (temporary_twin(plot.path), *(() if plot.path.exists() else (plot.path,))):
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            os.unlink(probe)


def drawn(plot: Plot) -> Figure:
    figure = Figure(figsize=plot.size, layout="constrained")
    FigureCanvasAgg(figure)
    with matplotlib.rc_context({"text.parse_math": False}):  # every label is plain text: a "$" is a dollar, not TeX
        plot.draw(figure)
    return figure


def write_plot(plot: Plot) -> None:
    temporary = temporary_twin(plot.path)  # drawn there, then renamed over the plot: a reader never sees half a PNG
    try:
        drawn(plot).savefig(temporary, format="png", dpi=110)
        os.replace(temporary, plot.path)
    finally:
        temporary.unlink(missing_ok=True)


def default_plot_folder(first: Path) -> Path:
    """`<first RUN>-plots` beside the first input; for `.` or `..`, beside the folder they stand for."""
    first = first.resolve() if first.name in ("", ".", "..") else first
    return first.parent / f"{first.stem if first.is_file() else first.name}-plots"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="pytest-benchmark JSON files (--benchmark-json), or folders of them (results/history)")
    parser.add_argument("--plots", metavar="DIR", help="folder for the PNG plots (default: <first RUN>-plots beside it)")
    args = parser.parse_args(argv)
    folder = Path(args.plots) if args.plots else default_plot_folder(Path(args.runs[0]))
    unwritable = None
    try:
        runs = load_runs(args.runs, warn)
        if args.plots and folder.exists() and not folder.is_dir():
            raise BenchError(f"--plots {printable(folder)}: exists and is not a folder")
        text = report_text(runs)
        plots = planned_plots(runs, folder)
        try:
            try_plot_files(folder, plots)
        except OSError as error:
            where = printable(error.filename or folder)
            if args.plots:
                raise BenchError(f"--plots {printable(folder)}: {where} cannot be written ({error.strerror}); choose "
                                 "another folder") from None
            unwritable, plots = f"{where} cannot be written ({error.strerror})", []
        for plot in plots:
            write_plot(plot)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    if plots:
        print("\nplots:\n" + "\n".join(f"- {printable(plot.path)}" for plot in plots))
    if unwritable:
        print(f"\nno plots: {unwritable}; pass --plots DIR to draw them in another folder")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
