"""Saved benchmark runs as Markdown tables and PNG plots, with each framework's history per device.

    python -m bench.report RUN [RUN ...] [--plots DIR]

A RUN is a pytest-benchmark JSON file (`pytest bench --benchmark-json=FILE`) or a folder of them (the
`--benchmark-autosave` storage, results/history/<machine>/NNNN_<commit>_<date>.json), whose runs are read in the order
they ran. Entries are matched by framework name, so renamed tests and changed options still line up; runs on different
devices are never compared. Every input is read and checked before anything is written; a bad input is one line on
stderr and exit status 2. Plots are drawn again from the runs at every call: they replace the files of the same name.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bench import cli
from bench.errors import BenchError
from bench.record import RunFile, RunRecord, load_run_file
from bench.summary import NONE, images_per_second, markdown_table, peak_memory, percent, seconds, summary_table

Series = dict[str, list[tuple[RunFile, RunRecord]]]  # framework -> its (run, record) in run order, on one device


def load_runs(inputs: list[str]) -> list[RunFile]:
    """The runs of files and folders, in the order given; a folder's runs in the order they ran."""
    runs = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            files = sorted(path.rglob("*.json"))
            if not files:
                raise BenchError(f"{path}: no .json files in this folder")
            runs += sorted(map(load_run_file, files), key=lambda run: (run.date, run.path.name))
        else:
            runs.append(load_run_file(path))
    seen = {}
    for run in runs:  # labels name the plot files: unique within a report
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label}-{seen[run.label]}"
    return runs


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
# Run options that leave the work of one epoch unchanged (evaluation is not timed).
TIMING_NEUTRAL = {"seed", "min_accuracy", "epochs", "test_subset"}


def relative_change(old, new) -> str:
    return NONE if not old or new is None else f"{new / old - 1:+.0%}"


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
                relative_change(first.median_epoch_seconds, record.median_epoch_seconds) if later else NONE,
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
            notes.append(f"{framework}: the runs differ in {', '.join(varying)}; epoch times of different settings "
                         "are not comparable (images/s is a fairer guide)")
    return notes


def report_text(runs: list[RunFile]) -> str:
    parts = []
    for run in runs:
        parts.append(f"## {run.label}: {run.date or 'undated'}, commit {run.commit}, {run.machine}\n\n`{run.path}`")
        if run.records:
            parts.append(summary_table(run.records))
        rates = {record.matmul.description: record.matmul.flops_per_second for record in run.records if record.matmul}
        parts += [f"matmul yardstick: {rate / 1e9:,.0f} GFLOP/s ({what})" for what, rate in rates.items()]
        parts += [f"note: {note}" for note in run.notes]
    series = histories(runs)
    if len(runs) > 1 and len(series) > 1:
        parts.append(f"warning: these runs come from {len(series)} different devices ({'; '.join(series)}): each "
                     "device has its own history; figures are never compared across devices")
    for device, frameworks in series.items():
        if len(runs_of(frameworks)) > 1:
            parts.append(f"## History on {device}\n\n{history_table(frameworks)}")
            parts += [f"note: {note}" for note in config_changes(frameworks)]
        scaling = scaling_table(frameworks)
        if scaling:
            parts.append(f"## Data parallel on {device}: throughput against one replica\n\n{scaling}")
    return "\n\n".join(parts)


# --- Plots ------------------------------------------------------------------------------------------------------------
def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def draw_run(figure: Figure, run: RunFile, colors: dict[str, str]) -> None:
    """Time per epoch, test accuracy after each epoch, and model FLOP/s as a share of the measured matmul rate."""
    time_axes, accuracy_axes, utilization_axes = figure.subplots(1, 3, width_ratios=(2, 2, 1.3))
    several_devices = len({record.device for record in run.records}) > 1
    for record in run.records:
        style = dict(marker="o", color=colors[record.framework],
                     label=record.framework + (f" ({record.device})" if several_devices else ""))
        time_axes.plot(range(1, record.epochs + 1), record.epoch_seconds, **style)
        accuracy_axes.plot(range(1, len(record.epoch_test_accuracy) + 1),
                           [100 * a for a in record.epoch_test_accuracy], **style)
    for target in sorted({record.target_accuracy for record in run.records} - {None}):
        accuracy_axes.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.1%}")
    measured = [record for record in run.records if record.matmul_utilization is not None]
    utilization_axes.barh([record.framework for record in measured],
                          [100 * record.matmul_utilization for record in measured],
                          color=[colors[record.framework] for record in measured])
    utilization_axes.invert_yaxis()
    time_axes.set(title="Time per epoch", xlabel="epoch", ylabel="seconds")
    time_axes.set_ylim(bottom=0)
    accuracy_axes.set(title="Test accuracy after each epoch", xlabel="epoch", ylabel="%")
    utilization_axes.set(title="Model FLOP/s, % of matmul rate", xlabel="%")
    for axes in (time_axes, accuracy_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axes.lines:
            axes.legend()
    for axes in (time_axes, accuracy_axes, utilization_axes):
        axes.grid(alpha=0.3)
    figure.suptitle(f"MNIST ResNet18, run {run.label} ({run.date}) on {run.machine}")


HISTORY_METRICS = (  # (title, unit, value of a record)
    ("Median epoch time", "seconds", lambda record: record.median_epoch_seconds),
    ("Throughput", "images/s", lambda record: record.images_per_second),
    ("Test accuracy", "%", lambda record: None if record.test_accuracy is None else 100 * record.test_accuracy),
    ("Time to target accuracy", "seconds", lambda record: record.time_to_target_s),
    ("Peak memory (GPU, or resident on CPU)", "MiB",
     lambda record: None if record.peak_memory[0] is None else record.peak_memory[0] / 2**20),
)


def draw_history(figure: Figure, device: str, frameworks: Series, colors: dict[str, str]) -> None:
    runs = runs_of(frameworks)
    position = {id(run): index for index, run in enumerate(runs)}
    grid = figure.subplots(2, 3)
    for axes, (title, unit, value) in zip(grid.flat, HISTORY_METRICS):
        for framework, entries in frameworks.items():
            points = [(position[id(run)], value(record)) for run, record in entries if value(record) is not None]
            if points:
                axes.plot(*zip(*points), marker="o", label=framework, color=colors[framework])
        axes.set(title=title, ylabel=unit)
        if unit != "%":
            axes.set_ylim(bottom=0)
        elif axes.lines:
            low, high = axes.get_ylim()  # at least one point tall: seed noise of a tenth must not look like a cliff
            middle = (low + high) / 2
            axes.set_ylim(min(low, middle - 0.5), max(high, middle + 0.5))
        axes.set_xticks(range(len(runs)), [run.label for run in runs], rotation=30, ha="right", fontsize=8)
        axes.grid(alpha=0.3)
    legend_axes = grid.flat[-1]
    legend_axes.axis("off")
    handles = {line.get_label(): line for axes in grid.flat for line in axes.lines}  # a framework may lack a metric
    legend_axes.legend(handles.values(), handles.keys(), loc="center", title="framework")
    figure.suptitle(f"MNIST ResNet18 history on {device}")


def write_plot(path: Path, draw, size: tuple[float, float]) -> None:
    """Drawn into a temporary file beside the target, then renamed over it: a reader never sees half a PNG."""
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(temporary, format="png", dpi=110)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_plots(runs: list[RunFile], folder: Path) -> list[Path]:
    names = sorted({record.framework for run in runs for record in run.records})
    colors = {name: f"C{index % 10}" for index, name in enumerate(names)}  # one colour per framework in every plot
    written = []
    for run in runs:
        if run.records:
            written.append(folder / f"{slug(run.label)}-epochs.png")
            write_plot(written[-1], lambda figure, run=run: draw_run(figure, run, colors), (15, 4.5))
    for device, frameworks in histories(runs).items():
        if len(runs_of(frameworks)) > 1:
            written.append(folder / f"history-{slug(device)}.png")
            write_plot(written[-1], lambda figure, d=device, f=frameworks: draw_history(figure, d, f, colors),
                       (13, 7.5))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="pytest-benchmark JSON files (--benchmark-json), or folders of them (results/history)")
    parser.add_argument("--plots", metavar="DIR", help="folder for the PNG plots (default: <first RUN>-plots beside it)")
    args = parser.parse_args(argv)
    first = Path(args.runs[0])
    folder = Path(args.plots) if args.plots else first.parent / f"{first.stem if first.is_file() else first.name}-plots"
    try:
        runs = load_runs(args.runs)
        if folder.exists() and not folder.is_dir():
            raise BenchError(f"--plots {folder}: exists and is not a folder")
        text = report_text(runs)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            plots = write_plots(runs, folder)
        except OSError as error:
            raise BenchError(f"{error.filename or folder}: the plots cannot be written there ({error.strerror})") from None
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    if plots:
        print("\nplots:\n" + "\n".join(f"- {plot}" for plot in plots))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
