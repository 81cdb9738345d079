"""The regression gate of `python -m bench.report gate`: a new run against a baseline, framework by framework.

A framework of the baseline fails the gate when its test accuracy dropped by more than `accuracy_drop` (absolute),
its median epoch time grew by more than `time_increase` or its peak memory by more than `memory_increase` (relative),
or when it is missing from a new run that selected it (a crash, a failure in its timed epochs, not installed); one
left out by `--frameworks` is only noted, as is a framework new in the run. Entries are matched by framework name, not
by test name. Times and memory are compared on the same device only: another device is a BenchError unless
`allow_device_change`, which checks accuracy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.errors import BenchError
from bench.summary import mebibytes, median_epoch_seconds, peak_memory_bytes, percent

if TYPE_CHECKING:
    from bench.report import Run

OK, REGRESSION, NOTE = "ok", "REGRESSION", "note:"
ROUNDING = 1e-9  # a value exactly at the tolerance passes, whatever the float rounding


@dataclass(frozen=True)
class Tolerances:
    # Seeds move the smoke run's accuracy by a few tenths of a point; a broken recipe costs several points.
    accuracy_drop: float = 0.01
    # Epoch times on a shared 2-core CI machine vary by tens of percent from run to run; a real slowdown (a lost
    # thread pool, a retrace per step, a disabled compiler) is a factor, not a fraction.
    time_increase: float = 0.5
    # Peak memory is steady across runs; a quarter more is a leak, a kept batch or a copied dataset.
    memory_increase: float = 0.25


@dataclass(frozen=True)
class Line:
    status: str  # OK, REGRESSION or NOTE
    text: str

    def __str__(self) -> str:
        return f"{self.status} {self.text}"


def check(baseline: Run, new: Run, tolerances: Tolerances, allow_device_change: bool = False) -> list[Line]:
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
        before_device, after_device = baseline.device(before), new.device(after)
        same_device = same_machine_and_device(baseline, before, new, after)
        if not same_device and not allow_device_change:
            raise BenchError(f"{framework} ran on {after_device}, its baseline on {before_device}: times and memory "
                             "are not comparable; record a baseline on this machine, or pass --allow-device-change "
                             "to check accuracy only")
        lines += config_notes(framework, before, after)
        lines.append(accuracy_check(framework, before, after, tolerances.accuracy_drop))
        if same_device:
            lines.append(time_check(framework, before, after, tolerances.time_increase))
            lines.append(memory_check(framework, before, after, tolerances.memory_increase))
        else:
            lines.append(Line(NOTE, f"{framework}: epoch time and memory not compared: the baseline ran on "
                                    f"{before_device}, the new run on {after_device}"))
    for framework in after_records:
        if framework not in before_records:
            lines.append(Line(NOTE, f"{framework}: new, not in the baseline (record a new baseline to gate it)"))
    return lines


def same_machine_and_device(baseline: Run, before: dict, new: Run, after: dict) -> bool:
    """A record without a device (its run failed before recording one) ran on its run's machine: compare machines."""
    if before.get("device") and after.get("device"):
        return baseline.device(before) == new.device(after)
    return baseline.machine == new.machine


def config_notes(framework: str, before: dict, after: dict) -> list[Line]:
    old, new = before.get("config") or {}, after.get("config") or {}
    changes = [f"{key} {old.get(key)} → {new.get(key)}" for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key)]
    if not changes:
        return []
    return [Line(NOTE, f"{framework}: run configuration differs from the baseline ({', '.join(changes)})")]


def accuracy_check(framework: str, before: dict, after: dict, allowed_drop: float) -> Line:
    metric = f"{framework} test accuracy"
    old, new = before.get("test_accuracy"), after.get("test_accuracy")
    if old is None:
        return Line(NOTE, f"{metric}: none in the baseline, not checked")
    if new is None:
        return Line(REGRESSION, f"{metric}: baseline {percent(old)}, new none (the run failed before evaluating)")
    change = new - old
    status = REGRESSION if -change > allowed_drop + ROUNDING else OK
    return Line(status, f"{metric}: baseline {percent(old)}, new {percent(new)} "
                        f"({change * 100:+.2f} points; allowed -{allowed_drop * 100:.2f})")


def relative_check(metric: str, old, new, allowed_increase: float, show) -> Line:
    if not old or new is None:
        return Line(NOTE, f"{metric}: baseline {show(old)}, new {show(new)}, not compared")
    change = new / old - 1
    status = REGRESSION if change > allowed_increase + ROUNDING else OK
    return Line(status, f"{metric}: baseline {show(old)}, new {show(new)} "
                        f"({change:+.0%}; allowed +{allowed_increase:.0%})")


def time_check(framework: str, before: dict, after: dict, allowed_increase: float) -> Line:
    return relative_check(f"{framework} median epoch time", median_epoch_seconds(before), median_epoch_seconds(after),
                          allowed_increase, lambda s: "none" if s is None else f"{s:.2f} s")


def memory_check(framework: str, before: dict, after: dict, allowed_increase: float) -> Line:
    (old, old_kind), (new, new_kind) = peak_memory_bytes(before), peak_memory_bytes(after)
    if old_kind != new_kind:
        return Line(NOTE, f"{framework} peak memory: baseline {old_kind}, new {new_kind}, not compared")
    return relative_check(f"{framework} peak {old_kind} memory", old, new, allowed_increase,
                          lambda b: "none" if b is None else mebibytes(b))
