"""Saved benchmark runs as Markdown tables and PNG plots, their history per device, and the CI regression gate.

    python -m bench.report RUN [RUN ...] [--plots DIR] [--force]
    python -m bench.report gate --baseline BASELINE.json NEW.json [--max-accuracy-drop 0.01]
                                [--max-time-increase 0.5] [--max-memory-increase 0.25] [--allow-device-change]

A RUN is a pytest-benchmark JSON file (`pytest bench --benchmark-json=FILE`) or a folder of them (the
`--benchmark-autosave` storage, results/history/<machine>/NNNN_<commit>_<date>.json), whose runs are read in the order
they ran. Entries are matched by extra_info["framework"], so renamed tests and changed options still line up; runs on
different devices are never compared. Every input is read and checked before anything is written; a bad input is one
line on stderr and exit status 2. The gate exits 1 on a regression (bench/gate.py).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from bench import gate
from bench.errors import BenchError
from bench.summary import (NONE, SELECTED_FRAMEWORKS, images_per_second, markdown_table, median_epoch_seconds,
                           peak_memory, peak_memory_bytes, percent, seconds, summary_table)

NUMBER_FIELDS = ("epochs", "batch_size", "train_images", "images_per_second", "test_accuracy", "test_loss",
                 "target_accuracy", "time_to_target_s", "warmup_s", "gpu_memory_peak_bytes", "allocator_peak_bytes",
                 "peak_rss_bytes")
NUMBER_LIST_FIELDS = ("epoch_seconds", "epoch_test_accuracy", "epoch_train_loss")
AUTOSAVED = re.compile(r"^(\d{4})_")  # pytest-benchmark's autosave names: NNNN_<commit>_<date>[_uncommitted-changes]
PLOT_SOURCE_KEY = "bench.report sources"  # PNG text chunk: which runs a plot was drawn from


@dataclass
class Run:
    """One pytest-benchmark JSON file: its records (extra_info, completed from the entry where fields are missing)."""

    path: Path
    label: str  # short and unique within a report: "0003_f50e434" for an autosaved run, else the file's stem
    date: str
    commit: str
    machine: str
    digest: str  # of the file's bytes: identifies the run in the plots drawn from it
    records: list[dict] = field(default_factory=list)
    selected: list[str] | None = None  # the frameworks the session set out to run; None: unknown (every one)
    notes: list[str] = field(default_factory=list)

    def device(self, record: dict) -> str:
        """Where a record ran: its device on this machine; figures are only ever compared between equal devices."""
        return f"{record.get('device') or 'unknown device'} · {self.machine}"

    def by_framework(self) -> dict[str, dict]:
        found = {}
        for record in self.records:
            if record["framework"] in found:
                raise BenchError(f"{self.path}: two entries for {record['framework']}; compare runs with one entry "
                                 "per framework")
            found[record["framework"]] = record
        return found


# --- Reading runs -----------------------------------------------------------------------------------------------------
def load_runs(inputs: list[str]) -> list[Run]:
    """The runs of files and folders, in the order given; a folder's runs in the order they ran."""
    runs = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            files = sorted(path.rglob("*.json"))
            if not files:
                raise BenchError(f"{path}: no .json files in this folder")
            runs += sorted((load_run(file) for file in files), key=lambda run: (run.date, run.path.name))
        else:
            runs.append(load_run(path))
    unique_labels(runs)
    return runs


def unique_labels(runs: list[Run]) -> None:
    seen = {}  # by slug: labels name the plot files
    for run in runs:
        key = slug(run.label)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            run.label = f"{run.label}-{seen[key]}"


def load_run(path: Path) -> Run:
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise BenchError(f"{path}: no such file (pytest-benchmark writes no JSON when no benchmark finished its timed "
                         "epochs)") from None
    except OSError as error:
        raise BenchError(f"{path}: cannot be read ({error.strerror})") from None
    if not content.strip():
        raise BenchError(f"{path}: the file is empty (an interrupted run?); rerun the benchmark")
    try:
        data = json.loads(content.decode("utf-8"))
    except UnicodeDecodeError:
        raise BenchError(f"{path}: not a text file, so not pytest-benchmark JSON") from None
    except json.JSONDecodeError as error:
        raise BenchError(f"{path}: invalid JSON ({error.msg} at line {error.lineno} column {error.colno}): truncated "
                         "by an interrupted run, or not pytest-benchmark output") from None
    if isinstance(data, dict) and "framework" in data and "benchmarks" not in data:
        raise BenchError(f"{path}: a `python -m bench run --output` record, not pytest-benchmark JSON; the report "
                         "reads `pytest bench --benchmark-json=FILE` output and results/history")
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise BenchError(f"{path}: not pytest-benchmark JSON (no 'benchmarks' list); the report reads "
                         "`pytest bench --benchmark-json=FILE` output and results/history")
    commit = data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {}
    short_commit = str(commit.get("id") or "?")[:7]
    number = AUTOSAVED.match(path.name)
    run = Run(path=path, label=f"{number.group(1)}_{short_commit}" if number else path.stem,
              date=str(data.get("datetime") or "")[:16].replace("T", " "),
              commit=short_commit + (" (dirty)" if commit.get("dirty") else ""),
              machine=machine_name(data.get("machine_info")), digest=hashlib.sha256(content).hexdigest(),
              selected=selected_frameworks(data.get(SELECTED_FRAMEWORKS)))
    for index, entry in enumerate(data["benchmarks"], start=1):
        run.records.append(entry_record(entry, f"{path}: benchmark {index}", run.notes))
    if not run.records:
        run.notes.append("no benchmark entries: every framework failed before or during its timed epochs")
    return run


def selected_frameworks(value) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return value
    return None


def machine_name(machine_info) -> str:
    cpu = machine_info.get("cpu") if isinstance(machine_info, dict) else None
    if not isinstance(cpu, dict) or not cpu.get("brand_raw"):
        return "unknown machine"
    return f"{cpu['brand_raw']}, {cpu.get('count', '?')} cores"


def entry_record(entry, where: str, notes: list[str]) -> dict:
    """The entry's extra_info; a failed record() or an older harness leaves fields out, the timing fills in."""
    if not isinstance(entry, dict) or not isinstance(entry.get("stats"), dict):
        raise BenchError(f"{where} has no 'stats' object: not pytest-benchmark JSON")
    info = entry.get("extra_info", {})
    if not isinstance(info, dict):
        raise BenchError(f"{where}: 'extra_info' is {type(info).__name__}, not an object")
    record = dict(info)
    if not isinstance(record.get("framework"), str):
        record["framework"] = str(entry.get("param") or entry.get("name") or where)
        notes.append(f"{record['framework']}: no framework in its extra_info (an older harness, or a failure after the "
                     "timed epochs): named after its test, only its timing is known")
    for name in NUMBER_FIELDS:
        if record.get(name) is not None and not is_number(record[name]):
            raise BenchError(f"{where} ({record['framework']}): extra_info {name!r} is {record[name]!r}, not a number")
    for name in NUMBER_LIST_FIELDS:
        values = record.get(name)
        if values is not None and not (isinstance(values, list) and all(map(is_number, values))):
            raise BenchError(f"{where} ({record['framework']}): extra_info {name!r} is not a list of numbers")
    stats = entry["stats"]
    if not record.get("epoch_seconds") and isinstance(stats.get("data"), list) and all(map(is_number, stats["data"])):
        record["epoch_seconds"] = stats["data"]  # one pedantic round per epoch
    if is_number(stats.get("median")):
        record["benchmark_median_s"] = stats["median"]
    return record


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- Tables -----------------------------------------------------------------------------------------------------------
HISTORY_COLUMNS = ("framework", "run", "date", "commit", "version", "epochs", "train images", "median epoch s",
                   "Δ time", "images/s", "test accuracy", "Δ accuracy", "peak memory", "Δ memory")


def histories(runs: list[Run]) -> dict[str, dict[str, list[tuple[Run, dict]]]]:
    """device -> framework -> [(run, record)] in run order: the series that can be compared."""
    series = {}
    for run in runs:
        for framework, record in run.by_framework().items():
            series.setdefault(run.device(record), {}).setdefault(framework, []).append((run, record))
    return series


def runs_of(frameworks: dict[str, list[tuple[Run, dict]]], runs: list[Run]) -> list[Run]:
    present = {id(run) for entries in frameworks.values() for run, _ in entries}
    return [run for run in runs if id(run) in present]


def relative_change(old, new) -> str:
    return NONE if not old or new is None else f"{new / old - 1:+.0%}"


def history_table(frameworks: dict[str, list[tuple[Run, dict]]]) -> str:
    """Each framework's runs, with changes relative to its first run on this device."""
    rows = []
    for framework, entries in frameworks.items():
        first = entries[0][1]
        for index, (run, record) in enumerate(entries):
            accuracy, first_accuracy = record.get("test_accuracy"), first.get("test_accuracy")
            (memory, kind), (first_memory, first_kind) = peak_memory_bytes(record), peak_memory_bytes(first)
            later = index > 0
            accuracy_change = later and None not in (accuracy, first_accuracy)
            rows.append([
                framework, run.label, run.date or NONE, run.commit, record.get("framework_version", "?"),
                record.get("epochs", "?"), record.get("train_images", "?"), seconds(median_epoch_seconds(record)),
                relative_change(median_epoch_seconds(first), median_epoch_seconds(record)) if later else NONE,
                images_per_second(record), percent(accuracy),
                f"{(accuracy - first_accuracy) * 100:+.2f} pt" if accuracy_change else NONE,
                peak_memory(record),
                relative_change(first_memory, memory) if later and kind == first_kind else NONE,
            ])
    return markdown_table(HISTORY_COLUMNS, rows)


TIMING_NEUTRAL = {"seed", "min_accuracy", "epochs"}  # run options that leave the work of one epoch unchanged


def config_changes(frameworks: dict[str, list[tuple[Run, dict]]]) -> list[str]:
    """The run options that vary within each framework's series: what makes an epoch time differ besides the code."""
    notes = []
    for framework, entries in frameworks.items():
        configs = [record.get("config") or {} for _, record in entries]
        varying = [f"{key} {'/'.join(str(config.get(key)) for config in configs)}"
                   for key in sorted(set().union(*configs) - TIMING_NEUTRAL)
                   if len({repr(config.get(key)) for config in configs}) > 1]
        if varying:
            notes.append(f"{framework}: the runs differ in {', '.join(varying)}; epoch times of different settings "
                         "are not comparable (images/s is a fairer guide)")
    return notes


def report_text(runs: list[Run]) -> str:
    parts = []
    for run in runs:
        parts.append(f"## {run.label}: {run.date or 'undated'}, commit {run.commit}, {run.machine}\n\n`{run.path}`")
        if run.records:
            parts.append(summary_table(run.records))
        parts += [f"note: {note}" for note in run.notes]
    if len(runs) > 1:
        series = histories(runs)
        if len(series) > 1:
            parts.append(f"warning: these runs come from {len(series)} different devices ({'; '.join(series)}): each "
                         "device has its own history; figures are never compared across devices")
        for device, frameworks in series.items():
            if len(runs_of(frameworks, runs)) > 1:
                parts.append(f"## History on {device}\n\n{history_table(frameworks)}")
                parts += [f"note: {note}" for note in config_changes(frameworks)]
    return "\n\n".join(parts)


# --- Plots ------------------------------------------------------------------------------------------------------------
@dataclass
class Plot:
    path: Path
    sources: str  # the digests of the runs it shows, space-separated
    draw: Callable[[Figure], None]
    size: tuple[float, float]  # inches


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def framework_colors(runs: list[Run]) -> dict[str, str]:
    """One colour per framework in every plot of a report."""
    names = sorted({record["framework"] for run in runs for record in run.records})
    return {name: f"C{index % 10}" for index, name in enumerate(names)}


def plan_plots(runs: list[Run], folder: Path) -> list[Plot]:
    colors = framework_colors(runs)
    plots = [Plot(folder / f"{slug(run.label)}-epochs.png", run.digest,
                  functools.partial(draw_run, run=run, colors=colors), size=(12, 4.5))
             for run in runs if run.records]
    if len(runs) > 1:
        for device, frameworks in histories(runs).items():
            device_runs = runs_of(frameworks, runs)
            if len(device_runs) > 1:
                plots.append(Plot(folder / f"history-{slug(device)}.png", " ".join(run.digest for run in device_runs),
                                  functools.partial(draw_history, device=device, runs=device_runs,
                                                    frameworks=frameworks, colors=colors), size=(13, 7.5)))
    return plots


def draw_run(figure: Figure, run: Run, colors: dict[str, str]) -> None:
    time_axes, accuracy_axes = figure.subplots(1, 2)
    several_devices = len({record.get("device") for record in run.records}) > 1
    for record in run.records:
        name = record["framework"] + (f" ({record.get('device')})" if several_devices else "")
        style = dict(marker="o", label=name, color=colors[record["framework"]])
        if record.get("epoch_seconds"):
            time_axes.plot(range(1, len(record["epoch_seconds"]) + 1), record["epoch_seconds"], **style)
        if record.get("epoch_test_accuracy"):
            accuracies = [100 * a for a in record["epoch_test_accuracy"]]
            accuracy_axes.plot(range(1, len(accuracies) + 1), accuracies, **style)
    for target in sorted({record.get("target_accuracy") for record in run.records} - {None}):
        accuracy_axes.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.1%}")
    time_axes.set(title="Time per epoch", xlabel="epoch", ylabel="seconds")
    time_axes.set_ylim(bottom=0)
    accuracy_axes.set(title="Test accuracy after each epoch", xlabel="epoch", ylabel="%")
    for axes in (time_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axes.lines:
            axes.legend()
    figure.suptitle(f"MNIST ResNet18, run {run.label} ({run.date}) on {run.machine}")


def accuracy_percent(record: dict) -> float | None:
    return None if record.get("test_accuracy") is None else 100 * record["test_accuracy"]


def peak_mebibytes(record: dict) -> float | None:
    value, _ = peak_memory_bytes(record)
    return None if value is None else value / 2**20


HISTORY_METRICS = (  # (title, unit, value of a record)
    ("Median epoch time", "seconds", median_epoch_seconds),
    ("Throughput", "images/s", lambda record: record.get("images_per_second")),
    ("Test accuracy", "%", accuracy_percent),
    ("Time to target accuracy", "seconds", lambda record: record.get("time_to_target_s")),
    ("Peak memory (GPU, or resident on CPU)", "MiB", peak_mebibytes),
)


def draw_history(figure: Figure, device: str, runs: list[Run], frameworks: dict[str, list[tuple[Run, dict]]],
                 colors: dict[str, str]) -> None:
    grid = figure.subplots(2, 3)
    position = {id(run): index for index, run in enumerate(runs)}
    for axes, (title, unit, value) in zip(grid.flat, HISTORY_METRICS):
        for framework, entries in frameworks.items():
            points = [(position[id(run)], value(record)) for run, record in entries if value(record) is not None]
            if points:
                axes.plot(*zip(*points), marker="o", label=framework, color=colors[framework])
        if not axes.lines:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="grey")
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
    handles = {}  # a framework may lack a metric: collect its line from any panel
    for axes in grid.flat:
        handles.update((line.get_label(), line) for line in axes.lines)
    legend_axes.legend(handles.values(), handles.keys(), loc="center", title="framework")
    figure.suptitle(f"MNIST ResNet18 history on {device}")


def drawn_from(path: Path) -> str | None:
    """The sources recorded in an existing plot; None for any other file."""
    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get(PLOT_SOURCE_KEY)
    except OSError:
        return None


def may_replace(plot: Plot) -> bool:
    """A plot file may be redrawn from the runs it shows, and a history's from those runs and newer ones."""
    existing = drawn_from(plot.path)
    return existing is not None and set(existing.split()) <= set(plot.sources.split())


def check_plot_targets(plots: list[Plot], force: bool) -> None:
    for plot in plots:
        if plot.path.exists() and not force and not may_replace(plot):
            raise BenchError(f"{plot.path} exists and shows other runs: pass --force to replace it, or --plots DIR "
                             "to write elsewhere")


def write_plot(plot: Plot) -> None:
    """Drawn into a temporary file beside the target, then renamed over it: a reader never sees half a PNG."""
    figure = Figure(figsize=plot.size, layout="constrained")
    FigureCanvasAgg(figure)
    plot.draw(figure)
    temporary = plot.path.with_name(f".{plot.path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "xb") as file:  # not tempfile's: its files are private (0600), plots are for sharing
            figure.savefig(file, format="png", dpi=110, metadata={PLOT_SOURCE_KEY: plot.sources})
        os.replace(temporary, plot.path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def default_plot_folder(first_input: Path) -> Path:
    name = first_input.stem if first_input.is_file() else first_input.resolve().name
    return first_input.parent / f"{name}-plots"


# --- Commands ---------------------------------------------------------------------------------------------------------
def report_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=(
        "Markdown tables and PNG plots of saved benchmark runs; with several runs, each framework's history per "
        "device. The regression gate for CI: python -m bench.report gate --help."))
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="pytest-benchmark JSON files (--benchmark-json), or folders of them (results/history)")
    parser.add_argument("--plots", metavar="DIR",
                        help="folder for the PNG plots (default: <first RUN>-plots beside it)")
    parser.add_argument("--force", action="store_true", help="replace plot files that show other runs")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    folder = Path(args.plots) if args.plots else default_plot_folder(Path(args.runs[0]))
    if folder.exists() and not folder.is_dir():
        raise BenchError(f"--plots {folder}: exists and is not a folder")
    plots = plan_plots(runs, folder)
    check_plot_targets(plots, args.force)
    text = report_text(runs)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for plot in plots:
            write_plot(plot)
    except OSError as error:
        raise BenchError(f"{error.filename or folder}: the plots cannot be written there ({error.strerror})") from None
    print(text)
    if plots:
        print("\nplots:\n" + "\n".join(f"- {plot.path}" for plot in plots))
    return 0


def gate_command(argv: list[str]) -> int:
    defaults = gate.Tolerances()
    parser = argparse.ArgumentParser(prog="python -m bench.report gate", description=(
        "Check a new run against a baseline, framework by framework. Exit 0: within tolerances; 1: a regression "
        "(one REGRESSION line each, naming the framework, the metric, the baseline and the new value); 2: bad input."))
    parser.add_argument("--baseline", required=True, metavar="BASELINE.json",
                        help="e.g. results/baseline-smoke-cpu.json")
    parser.add_argument("new", metavar="NEW.json", help="the run to check (pytest bench --benchmark-json=NEW.json)")
    parser.add_argument("--max-accuracy-drop", type=float, default=defaults.accuracy_drop, metavar="FRACTION",
                        help=f"allowed drop of test accuracy, absolute (default {defaults.accuracy_drop}: 1 point)")
    parser.add_argument("--max-time-increase", type=float, default=defaults.time_increase, metavar="FRACTION",
                        help=f"allowed growth of the median epoch time, relative (default {defaults.time_increase})")
    parser.add_argument("--max-memory-increase", type=float, default=defaults.memory_increase, metavar="FRACTION",
                        help=f"allowed growth of peak memory, relative (default {defaults.memory_increase})")
    parser.add_argument("--allow-device-change", action="store_true",
                        help="a baseline from another device: check accuracy only, instead of refusing")
    args = parser.parse_args(argv)
    tolerances = gate.Tolerances(args.max_accuracy_drop, args.max_time_increase, args.max_memory_increase)
    if min(vars(tolerances).values()) < 0:
        raise BenchError("tolerances are fractions of at least 0 (--max-accuracy-drop 0.01 allows one point)")
    baseline, new = load_run(Path(args.baseline)), load_run(Path(args.new))
    lines = gate.check(baseline, new, tolerances, args.allow_device_change)
    for line in lines:
        print(line)
    regressions = sum(line.status == gate.REGRESSION for line in lines)
    if regressions:
        print(f"gate: FAILED, {regressions} regression(s) in {new.path} against {baseline.path}")
        return 1
    print(f"gate: passed, {new.path} is within tolerance of {baseline.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return gate_command(argv[1:]) if argv[:1] == ["gate"] else report_command(argv)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
