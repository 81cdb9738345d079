"""The regression gate: a new run against a baseline, or against a history of runs, framework by framework.

    python -m bench.gate --baseline BASELINE.json NEW.json [--max-accuracy-drop 0.01] [--max-time-increase 0.35]
                         [--max-memory-increase 0.25] [--absolute-time] [--allow-device-change]
    python -m bench.gate --history FOLDER [--baseline BASELINE.json] NEW.json [--window 20] [--alpha 0.01]
                         [--min-time-change 0.1] [--min-memory-change 0.1] [--min-accuracy-change 0.5]

A framework of the baseline fails the gate when its test accuracy dropped by more than `accuracy_drop` (absolute),
its epoch time grew by more than `time_increase` or its peak memory by more than `memory_increase` (relative), or
when it is missing from a new run that selected it (a crash, a failure in its timed epochs, not installed); one left
out by `--frameworks` is only noted, as is a framework new in the run. Entries are matched by framework name.

Epoch time is compared in units of the machine's speed: each run times a dense matrix multiply in the same session
(the record's `matmul`), and the gate compares median epoch time × matmul rate, so that a uniformly slower machine
of the same description passes and one framework that alone became slower fails. `--absolute-time` compares seconds
instead, for a dedicated machine that asks for it. Times and memory are compared on the same device only: another
device is a BenchError unless `allow_device_change`, which checks accuracy alone.

With `--history`, a framework whose history holds at least MIN_HISTORY_RUNS runs of the same machine, device and run
configuration is compared with the most recent `--window` of them instead, with bench.history's statistics: epoch time
in the same units, accuracy and every kind of peak memory the run measured, each tested against the spread of those
runs (a prediction interval, Bonferroni-corrected over the comparisons) and held to bench.history's minimum effects.
The other frameworks are compared with the baseline as above. A baseline must hold this project's records; a new run
must have selected a framework; a gate that compared nothing is bad input, never a pass. Exit 0: within tolerances;
1: a regression (one REGRESSION line each); 2: bad input.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from bench import cli
from bench.errors import BenchError
from bench.changes import (METRICS, Comparison, Thresholds, add_threshold_options, commits_of, compare_with_history,
                           configuration, series_of, shown_effect, shown_value, thresholds_of)
from bench.record import RunFile, RunRecord, load_run_file, load_runs
from bench.summary import mebibytes, percent
from bench.text import printable

OK, REGRESSION, NOTE = "ok", "REGRESSION", "note:"
ROUNDING = 1e-9  # a value exactly at the tolerance passes, whatever the float rounding


@dataclass(frozen=True)
class Tolerances:
    # Seeds move the smoke run's accuracy by a few tenths of a point; a broken recipe costs several points.
    accuracy_drop: float = 0.01
    # Relative to the machine's matmul speed, an epoch moved by up to ~15% between runs on busy 2-core machines; a
    # real slowdown (a lost thread pool, a retrace per step, a disabled compiler) is a factor: 1.5x must fail.
    time_increase: float = 0.35
    # Peak memory is steady across runs; a quarter more is a leak, a kept batch or a copied dataset.
    memory_increase: float = 0.25


@dataclass(frozen=True)
class Line:
    status: str  # OK, REGRESSION or NOTE
    text: str

    def __str__(self) -> str:
        return f"{self.status} {self.text}"


MIN_HISTORY_RUNS = 3  # fewer leave the spread of the history unknown: such a framework is compared with the baseline


@dataclass
class History:
    """A history's runs by series (device and machine, framework, configuration), oldest first."""

    records: dict[tuple[str, str, str], list[RunRecord]]
    window: int  # how many of the most recent runs a new run is compared with

    @classmethod
    def of(cls, runs: list[RunFile], window: int) -> History:
        return cls({(series.machine, series.framework, series.configuration): [record for _, _, record in series.points]
                    for series in series_of(commits_of(runs))}, window)

    def recent(self, new: RunFile, record: RunRecord) -> list[RunRecord]:
        return self.records.get((new.device(record), record.framework, configuration(record)), [])[-self.window:]

    def frameworks_on(self, machine: str) -> list[str]:
        return [framework for (device, framework, _) in self.records if device.endswith(f" · {machine}")]


def check(baseline: RunFile | None, new: RunFile, tolerances: Tolerances, absolute_time: bool = False,
          allow_device_change: bool = False, history: History | None = None,
          thresholds: Thresholds = Thresholds()) -> list[Line]:
    """One line per check and per remark, in the baseline's framework order, then the history's, then the frameworks
    new in the run."""
    before_records = baseline.by_framework() if baseline else {}
    after_records = new.by_framework()
    expected = list(before_records)
    expected += [framework for framework in (history.frameworks_on(new.machine) if history else [])
                 if framework not in expected]
    against_history = {framework: history.recent(new, after_records[framework]) for framework in expected
                       if history and framework in after_records
                       and len(history.recent(new, after_records[framework])) >= MIN_HISTORY_RUNS}
    comparisons = sum(len(comparable_metrics(recent, after_records[framework]))
                      for framework, recent in against_history.items())
    lines = []
    for framework in expected:
        after = after_records.get(framework)
        if after is None and new.selected is not None and framework not in new.selected:
            lines.append(Line(NOTE, f"{framework}: in the baseline, not selected in the new run (--frameworks), "
                                    "not checked"))
        elif after is None:
            lines.append(Line(REGRESSION, f"{framework}: in the baseline, missing from the new run (it crashed, "
                                          "failed in its timed epochs, or was skipped as not installed)"))
        elif framework in against_history:
            lines += history_checks(framework, against_history[framework], after, comparisons, thresholds)
        elif framework in before_records:
            lines += baseline_checks(framework, baseline, before_records[framework], new, after, tolerances,
                                     absolute_time, allow_device_change)
        else:
            lines.append(Line(NOTE, f"{framework}: fewer than {MIN_HISTORY_RUNS} runs of this machine, device and "
                                    "configuration in the history, and not in the baseline: not checked"))
    for framework in after_records:
        if framework not in expected:
            lines.append(Line(NOTE, f"{framework}: new, not in the baseline (record a new baseline to gate it)"))
    return [Line(line.status, printable(line.text)) for line in lines]


def baseline_checks(framework: str, baseline: RunFile, before: RunRecord, new: RunFile, after: RunRecord,
                    tolerances: Tolerances, absolute_time: bool, allow_device_change: bool) -> list[Line]:
    same_device = same_machine_and_device(baseline, before, new, after)
    if not same_device and not allow_device_change:
        raise BenchError(f"{printable(framework)} ran on {new.device(after)}, its baseline on "
                         f"{baseline.device(before)}: times and memory are not comparable; record a baseline on this "
                         "machine, or pass --allow-device-change to check accuracy only")
    lines = config_notes(framework, before, after) + model_notes(framework, before, after)
    lines.append(accuracy_check(framework, before, after, tolerances.accuracy_drop))
    if same_device:
        lines.append(time_check(framework, before, after, tolerances.time_increase, absolute_time))
        lines.append(memory_check(framework, before, after, tolerances.memory_increase))
    else:
        lines.append(Line(NOTE, f"{framework}: epoch time and memory not compared: the baseline ran on "
                                f"{baseline.device(before)}, the new run on {new.device(after)}"))
    return lines


def comparable_metrics(recent: list[RunRecord], after: RunRecord) -> list:
    """The metrics the new run measured and at least MIN_HISTORY_RUNS of the history's runs did."""
    return [metric for metric in METRICS if metric.value(after) is not None
            and sum(metric.value(record) is not None for record in recent) >= MIN_HISTORY_RUNS]


def history_checks(framework: str, recent: list[RunRecord], after: RunRecord, comparisons: int,
                   thresholds: Thresholds) -> list[Line]:
    lines = model_notes(framework, recent[-1], after)
    for metric in comparable_metrics(recent, after):
        values = [metric.value(record) for record in recent if metric.value(record) is not None]
        comparison = compare_with_history(metric, values, metric.value(after), comparisons, thresholds)
        lines.append(history_line(framework, comparison, thresholds))
    return lines


def history_line(framework: str, comparison: Comparison, thresholds: Thresholds) -> Line:
    metric = comparison.metric
    minimum = thresholds.minimum(metric)
    worse = "higher" if metric.higher_is_worse else "lower"
    needed = f"{minimum:.0%} {worse}" if metric.relative else f"{minimum:.2f} points {worse}"
    return Line(REGRESSION if comparison.regression(thresholds) else OK,
                f"{framework} {metric.short} against the history: new {shown_value(metric, comparison.new)}, median "
                f"{shown_value(metric, statistics.median(comparison.history))} of the last {len(comparison.history)} "
                f"runs of this machine ({shown_effect(metric, comparison.effect)}, p = {comparison.p_value:.1e}; a "
                f"regression is at least {needed} with p < {comparison.p_threshold:.1e})")


def same_machine_and_device(baseline: RunFile, before: RunRecord, new: RunFile, after: RunRecord) -> bool:
    """A record without a device (its run failed before recording one) ran on its run's machine: compare machines."""
    if before.device and after.device:
        return baseline.device(before) == new.device(after)
    return baseline.machine == new.machine


def config_notes(framework: str, before: RunRecord, after: RunRecord) -> list[Line]:
    old, new = before.options, after.options
    changes = [f"{key} {old.get(key)} → {new.get(key)}" for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key)]
    if changes:
        return [Line(NOTE, f"{framework}: run configuration differs from the baseline ({', '.join(changes)})")]
    if before.epoch_label_digests and after.epoch_label_digests[:1] != before.epoch_label_digests[:1]:
        # The same options, other batches: the contract's data order (or the data) changed between the two runs.
        return [Line(NOTE, f"{framework}: the first epoch trained on other batches than in the reference (label "
                           f"digest {after.epoch_label_digests[:1]} against {before.epoch_label_digests[:1]})")]
    return []


def model_notes(framework: str, before: RunRecord, after: RunRecord) -> list[Line]:
    """Another count of trainable parameters is another model: its times and memory say nothing about this one's."""
    old, new = before.trainable_parameters, after.trainable_parameters
    if old is None or new is None or old == new:
        return []
    return [Line(NOTE, f"{framework}: {new:,} trainable parameters, {old:,} in the reference: another model; record a "
                       "new baseline once it is the intended one")]


def accuracy_check(framework: str, before: RunRecord, after: RunRecord, allowed_drop: float) -> Line:
    metric = f"{framework} test accuracy"
    old, new = before.test_accuracy, after.test_accuracy
    if old is None:
        return Line(NOTE, f"{metric}: none in the baseline, not checked")
    if new is None:
        return Line(REGRESSION, f"{metric}: baseline {percent(old)}, new none (the run failed before evaluating)")
    change = new - old
    status = REGRESSION if -change > allowed_drop + ROUNDING else OK
    return Line(status, f"{metric}: baseline {percent(old)}, new {percent(new)} "
                        f"({change * 100:+.2f} points; allowed -{allowed_drop * 100:.2f})")


def relative_check(metric: str, old, new, allowed_increase: float, shown: str) -> Line:
    if not old or new is None:
        return Line(NOTE, f"{metric}: {shown}, not compared")
    change = new / old - 1
    status = REGRESSION if change > allowed_increase + ROUNDING else OK
    return Line(status, f"{metric}: {shown} ({change:+.0%}; allowed +{allowed_increase:.0%})")


def time_check(framework: str, before: RunRecord, after: RunRecord, allowed_increase: float, absolute: bool) -> Line:
    old, new = before.median_epoch_seconds, after.median_epoch_seconds
    seconds = lambda s: "none" if s is None else f"{s:.2f} s"
    if absolute:
        return relative_check(f"{framework} median epoch time", old, new, allowed_increase,
                              f"baseline {seconds(old)}, new {seconds(new)}")
    if before.matmul is None or after.matmul is None:
        which = "the baseline" if before.matmul is None else "the new run"
        return Line(NOTE, f"{framework} median epoch time: {which} has no matmul yardstick (recorded before it "
                          "existed), not compared; re-record the baseline, or pass --absolute-time")
    rate = lambda record: f"{record.matmul.flops_per_second / 1e9:,.0f} GFLOP/s"
    return relative_check(
        f"{framework} median epoch time relative to the machine's matmul speed", before.normalized_epoch_time,
        after.normalized_epoch_time, allowed_increase,
        f"baseline {seconds(old)} at {rate(before)}, new {seconds(new)} at {rate(after)}")


def memory_check(framework: str, before: RunRecord, after: RunRecord, allowed_increase: float) -> Line:
    (old, old_kind), (new, new_kind) = before.peak_memory, after.peak_memory
    if old_kind != new_kind:
        return Line(NOTE, f"{framework} peak memory: baseline {old_kind}, new {new_kind}, not compared")
    shown = lambda b: "none" if b is None else mebibytes(b)
    return relative_check(f"{framework} peak {old_kind} memory", old, new, allowed_increase,
                          f"baseline {shown(old)}, new {shown(new)}")


def tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"a finite fraction of at least 0, got {text!r}")
    return value


def reference_baseline(path: Path) -> RunFile:
    """The baseline, which must hold this project's records: another project's pytest-benchmark file, an empty one or
    entries without a record leave nothing to compare with."""
    baseline = load_run_file(path)
    if not baseline.records:
        raise BenchError(f"{baseline.shown_path}: no benchmark entries, so nothing to compare with; a baseline is the "
                         "--benchmark-json of a `pytest bench` run in which at least one framework finished")
    if baseline.timing_only:
        raise BenchError(f"{baseline.shown_path}: no run record in the extra_info of "
                         f"{', '.join(map(printable, baseline.timing_only))} (another project's pytest-benchmark file, "
                         "or a run whose record failed); a baseline needs every framework's record from `pytest bench`")
    return baseline


def checked_new_run(path: Path) -> RunFile:
    new = load_run_file(path)
    if new.selected == []:
        raise BenchError(f"{new.shown_path}: the session selected no framework, so there is nothing to gate; run "
                         "`pytest bench` with at least one framework")
    return new


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    defaults = Tolerances()
    parser = argparse.ArgumentParser(prog="python -m bench.gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="BASELINE.json", help="e.g. results/baseline-smoke-cpu-epyc.json")
    parser.add_argument("--history", metavar="FOLDER",
                        help="compare each framework with the recent runs of the same machine, device and "
                             "configuration in this folder of runs (e.g. results/history-smoke-cpu), where it has "
                             f"{MIN_HISTORY_RUNS} or more; the others with --baseline")
    parser.add_argument("--window", type=int, default=20, metavar="RUNS",
                        help="how many of the history's most recent runs a framework is compared with (default 20)")
    parser.add_argument("new", metavar="NEW.json", help="the run to check (pytest bench --benchmark-json=NEW.json)")
    for name, help_text in (("accuracy_drop", "allowed drop of test accuracy, absolute (0.01: one point)"),
                            ("time_increase", "allowed growth of the epoch time, relative"),
                            ("memory_increase", "allowed growth of peak memory, relative")):
        parser.add_argument(f"--max-{name.replace('_', '-')}", dest=name, type=tolerance, metavar="FRACTION",
                            default=getattr(defaults, name),
                            help=f"{help_text}; finite, at least 0 (default {getattr(defaults, name)})")
    parser.add_argument("--absolute-time", action="store_true",
                        help="compare epoch seconds, not epoch time relative to the matmul yardstick (a dedicated "
                             "machine whose speed does not vary)")
    parser.add_argument("--allow-device-change", action="store_true",
                        help="a baseline from another device: check accuracy only, instead of refusing")
    add_threshold_options(parser)
    args = parser.parse_args(argv)
    if not args.baseline and not args.history:
        parser.error("give --baseline BASELINE.json, --history FOLDER, or both")
    if args.window < MIN_HISTORY_RUNS:
        parser.error(f"argument --window: at least {MIN_HISTORY_RUNS} runs, got {args.window}")
    tolerances = Tolerances(**{spec.name: getattr(args, spec.name) for spec in fields(Tolerances)})
    try:
        baseline = reference_baseline(Path(args.baseline)) if args.baseline else None
        if args.history and not Path(args.history).is_dir():
            raise BenchError(f"--history {printable(args.history)}: not a folder of runs")
        history = History.of(load_runs([args.history], warn), args.window) if args.history else None
        new = checked_new_run(Path(args.new))
        lines = check(baseline, new, tolerances, args.absolute_time, args.allow_device_change, history,
                      thresholds_of(args))
        if not any(line.status in (OK, REGRESSION) for line in lines):
            raise BenchError(f"{new.shown_path}: nothing was compared (none of its frameworks is in "
                             f"{' or '.join(filter(None, (args.baseline, args.history)))} for this machine, and none "
                             "of those was selected): not a pass; gate a run of the frameworks the reference holds")
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    references = " and ".join(filter(None, (baseline and baseline.shown_path,
                                            args.history and f"the history {printable(args.history)}")))
    regressions = sum(line.status == REGRESSION for line in lines)
    if regressions:
        print(f"gate: FAILED, {regressions} regression(s) in {new.shown_path} against {references}")
        return 1
    print(f"gate: passed, {new.shown_path} is within tolerance of {references}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
