"""The regression gate: a new run against a baseline, framework by framework.

    python -m bench.gate --baseline BASELINE.json NEW.json [--max-accuracy-drop 0.01] [--max-time-increase 0.35]
                         [--max-memory-increase 0.25] [--absolute-time] [--allow-device-change]

A framework of the baseline fails the gate when its test accuracy dropped by more than `accuracy_drop` (absolute),
its epoch time grew by more than `time_increase` or its peak memory by more than `memory_increase` (relative), or
when it is missing from a new run that selected it (a crash, a failure in its timed epochs, not installed); one left
out by `--frameworks` is only noted, as is a framework new in the run. Entries are matched by framework name.

Epoch time is compared in units of the machine's speed: each run times a dense matrix multiply in the same session
(the record's `matmul`), and the gate compares median epoch time × matmul rate, so that a uniformly slower machine
of the same description passes and one framework that alone became slower fails. `--absolute-time` compares seconds
instead, for a dedicated machine that asks for it. Times and memory are compared on the same device only: another
device is a BenchError unless `allow_device_change`, which checks accuracy alone. Exit 0: within tolerances;
1: a regression (one REGRESSION line each); 2: bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from bench import cli
from bench.errors import BenchError
from bench.record import RunFile, RunRecord, load_run_file
from bench.summary import mebibytes, percent

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


def check(baseline: RunFile, new: RunFile, tolerances: Tolerances, absolute_time: bool = False,
          allow_device_change: bool = False) -> list[Line]:
    """One line per check and per remark, in the baseline's framework order, then the frameworks new in the run."""
    before_records, after_records = baseline.by_framework(), new.by_framework()
    lines = []
    for framework, before in before_records.items():
        after = after_records.get(framework)
        if after is None and new.selected is not None and framework not in new.selected:
            lines.append(Line(NOTE, f"{framework}: in the baseline, not selected in the new run (--frameworks), "
                                    "not checked"))
            continue
        if after is None:
            lines.append(Line(REGRESSION, f"{framework}: in the baseline, missing from the new run (it crashed, "
                                          "failed in its timed epochs, or was skipped as not installed)"))
            continue
        same_device = same_machine_and_device(baseline, before, new, after)
        if not same_device and not allow_device_change:
            raise BenchError(f"{framework} ran on {new.device(after)}, its baseline on {baseline.device(before)}: "
                             "times and memory are not comparable; record a baseline on this machine, or pass "
                             "--allow-device-change to check accuracy only")
        lines += config_notes(framework, before, after)
        lines.append(accuracy_check(framework, before, after, tolerances.accuracy_drop))
        if same_device:
            lines.append(time_check(framework, before, after, tolerances.time_increase, absolute_time))
            lines.append(memory_check(framework, before, after, tolerances.memory_increase))
        else:
            lines.append(Line(NOTE, f"{framework}: epoch time and memory not compared: the baseline ran on "
                                    f"{baseline.device(before)}, the new run on {new.device(after)}"))
    for framework in after_records:
        if framework not in before_records:
            lines.append(Line(NOTE, f"{framework}: new, not in the baseline (record a new baseline to gate it)"))
    return lines


def same_machine_and_device(baseline: RunFile, before: RunRecord, new: RunFile, after: RunRecord) -> bool:
    """A record without a device (its run failed before recording one) ran on its run's machine: compare machines."""
    if before.device and after.device:
        return baseline.device(before) == new.device(after)
    return baseline.machine == new.machine


def config_notes(framework: str, before: RunRecord, after: RunRecord) -> list[Line]:
    old, new = before.options, after.options
    changes = [f"{key} {old.get(key)} → {new.get(key)}" for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key)]
    if not changes:
        return []
    return [Line(NOTE, f"{framework}: run configuration differs from the baseline ({', '.join(changes)})")]


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
        f"{framework} median epoch time relative to the machine's matmul speed",
        None if old is None else old * before.matmul.flops_per_second,
        None if new is None else new * after.matmul.flops_per_second, allowed_increase,
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


def main(argv: list[str] | None = None) -> int:
    defaults = Tolerances()
    parser = argparse.ArgumentParser(prog="python -m bench.gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, metavar="BASELINE.json",
                        help="e.g. results/baseline-smoke-cpu.json")
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
    args = parser.parse_args(argv)
    tolerances = Tolerances(**{spec.name: getattr(args, spec.name) for spec in fields(Tolerances)})
    try:
        baseline, new = load_run_file(Path(args.baseline)), load_run_file(Path(args.new))
        lines = check(baseline, new, tolerances, args.absolute_time, args.allow_device_change)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    regressions = sum(line.status == REGRESSION for line in lines)
    if regressions:
        print(f"gate: FAILED, {regressions} regression(s) in {new.path} against {baseline.path}")
        return 1
    print(f"gate: passed, {new.path} is within tolerance of {baseline.path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
