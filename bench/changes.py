"""Changes in benchmark histories, found and tested: the analysis of `python -m bench.history` and `bench.gate --history`.

Runs become series, one per machine and device, framework and run configuration, in the order of their commits; epoch
times are in units of the machine's speed (the record's matmul yardstick). Each series of each metric is segmented by
ruptures' PELT on the commits' medians, with a penalty matched to the series' own noise; each change point is then
confirmed between the runs of its two segments by a Mann-Whitney U test, Bonferroni-corrected for the number of series
tested, and must move the median by at least a minimum effect. One new run is compared with a series by a prediction
interval of the same level.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone

import numpy as np
import ruptures
from scipy import stats

from bench.record import NORMALIZED_TIME_UNIT, RunFile, RunRecord, default_options


# --- What is compared ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    name: str  # as --json names it
    short: str  # in tables and gate lines
    unit: str
    value: Callable[[RunRecord], float | None]
    relative: bool  # True: a change is a ratio (time, memory); False: a difference in points (accuracy)
    higher_is_worse: bool


def in_mebibytes(count: int | None) -> float | None:
    return None if count is None else count / 2**20


METRICS = (
    Metric("epoch_time", "epoch time", NORMALIZED_TIME_UNIT, lambda record: record.normalized_epoch_time,
           relative=True, higher_is_worse=True),
    Metric("test_accuracy", "accuracy", "%",
           lambda record: None if record.test_accuracy is None else 100 * record.test_accuracy,
           relative=False, higher_is_worse=False),
    Metric("peak_memory_gpu", "GPU memory", "MiB", lambda record: in_mebibytes(record.gpu_memory_peak_bytes),
           relative=True, higher_is_worse=True),
    Metric("peak_memory_allocator", "allocator memory", "MiB", lambda record: in_mebibytes(record.allocator_peak_bytes),
           relative=True, higher_is_worse=True),
    Metric("peak_memory_resident", "resident memory", "MiB", lambda record: in_mebibytes(record.peak_rss_bytes),
           relative=True, higher_is_worse=True),
)


@dataclass(frozen=True)
class Thresholds:
    """When a difference is a change. `--calibrate` over repeated runs of one commit (results/history-smoke-cpu) says
    whether a machine's run-to-run noise stays inside the minimum changes (results/README.md)."""

    alpha: float = 0.01  # the chance of one false change in the whole comparison, split over the series tested
    # A change must also move the median by at least this much: a change that small matters little, and one run in a
    # series of repeated runs may stray that far (the largest excursion `--calibrate` reports must stay below it).
    min_time_change: float = 0.10
    min_memory_change: float = 0.10
    min_accuracy_change: float = 0.5  # points: seeds and thread order move the smoke run's accuracy by tenths

    def minimum(self, metric: Metric) -> float:
        if metric.name == "epoch_time":
            return self.min_time_change
        return self.min_memory_change if metric.relative else self.min_accuracy_change


def add_threshold_options(parser: argparse.ArgumentParser) -> None:
    """The thresholds as options, shared by bench.history and bench.gate --history."""
    defaults = Thresholds()
    helps = {"alpha": "family-wise significance level, Bonferroni-split over the series tested",
             "min_time_change": "smallest change of the epoch time (relative) that counts",
             "min_memory_change": "smallest change of peak memory (relative) that counts",
             "min_accuracy_change": "smallest change of test accuracy (points) that counts"}
    for spec in fields(Thresholds):
        parser.add_argument(f"--{spec.name.replace('_', '-')}", dest=spec.name, metavar="NUMBER",
                            type=probability if spec.name == "alpha" else non_negative,
                            default=getattr(defaults, spec.name),
                            help=f"{helps[spec.name]} (default {getattr(defaults, spec.name)})")


def thresholds_of(args: argparse.Namespace) -> Thresholds:
    return Thresholds(**{spec.name: getattr(args, spec.name) for spec in fields(Thresholds)})


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def non_negative(text: str) -> float:
    value = number(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"a finite number of at least 0, got {text!r}")
    return value


def probability(text: str) -> float:
    value = number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a probability between 0 and 1 (exclusive), got {text!r}")
    return value


# --- Runs into series ---------------------------------------------------------------------------------------------------
@dataclass
class Commit:
    """The runs of one commit, pooled: a dirty tree's apart from the clean tree's."""

    id: str | None  # in full; None: a run outside a git checkout, a commit of its own
    dirty: bool
    time: datetime | None
    runs: list[RunFile] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Unique in a history: the short commit id, or the file's label for a run without one."""
        return self.id[:7] + ("+dirty" if self.dirty else "") if self.id else self.runs[0].label

    @property
    def order(self) -> tuple:
        started = [run.started for run in self.runs if run.started] or [datetime.max.replace(tzinfo=timezone.utc)]
        return self.time or min(started), min(started)


def commits_of(runs: list[RunFile]) -> list[Commit]:
    """The runs pooled by commit, in the order the commits were made (their sessions' start breaks ties)."""
    commits: dict[tuple, Commit] = {}
    for run in runs:
        key = (run.commit_id, run.dirty) if run.commit_id else (id(run),)
        commits.setdefault(key, Commit(run.commit_id, run.dirty, run.commit_time)).runs.append(run)
    return sorted(commits.values(), key=lambda commit: commit.order)


IGNORED_OPTIONS = {"seed", "min_accuracy"}  # they change neither an epoch's work nor what accuracy means


def configuration(record: RunRecord) -> str:
    """The options that set what a run does, as they differ from the defaults: runs are only compared with runs of
    the same configuration."""
    defaults = default_options()
    return ", ".join(f"{key} {value}" for key, value in sorted(record.options.items())
                     if key not in IGNORED_OPTIONS and value != defaults.get(key)) or "default options"


@dataclass
class Series:
    """One framework's runs on one machine and device with one configuration, commit by commit."""

    machine: str  # RunFile.device(record): the device and the machine's CPU model and cores
    framework: str
    configuration: str
    points: list[tuple[Commit, RunFile, RunRecord]] = field(default_factory=list)  # in commit order

    def samples(self, metric: Metric) -> list[tuple[Commit, list[float]]]:
        """The metric's values, commit by commit, for the commits with at least one."""
        by_commit: dict[int, tuple[Commit, list[float]]] = {}
        for commit, _, record in self.points:
            value = metric.value(record)
            if value is not None:
                by_commit.setdefault(id(commit), (commit, []))[1].append(value)
        return list(by_commit.values())


def series_of(commits: list[Commit]) -> list[Series]:
    found: dict[tuple, Series] = {}
    for commit in commits:
        for run in commit.runs:
            for framework, record in run.by_framework().items():
                key = (run.device(record), framework, configuration(record))
                found.setdefault(key, Series(*key)).points.append((commit, run, record))
    return list(found.values())


# --- Changes ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    series: Series
    metric: Metric
    last_good: Commit
    first: Commit
    before: list[float]  # the runs of the segment before the change
    after: list[float]
    p_value: float
    p_threshold: float

    @property
    def effect(self) -> float:
        """after / before (time, memory) or after - before in points (accuracy), of the segments' medians."""
        return effect(self.metric, statistics.median(self.before), statistics.median(self.after))

    @property
    def direction(self) -> str:
        worse = (self.effect > (1 if self.metric.relative else 0)) == self.metric.higher_is_worse
        return "regression" if worse else "improvement"

    def confirmed(self, thresholds: Thresholds) -> bool:
        return self.p_value < self.p_threshold and significant_effect(self.metric, self.effect, thresholds)

    def to_json(self) -> dict:
        return {
            "framework": self.series.framework, "metric": self.metric.name, "direction": self.direction,
            "machine": self.series.machine, "configuration": self.series.configuration,
            "last_good_commit": self.last_good.id, "first_commit": self.first.id,
            "first_commit_dirty": self.first.dirty,
            "first_commit_time": self.first.time.isoformat() if self.first.time else None,
            "before": statistics.median(self.before), "after": statistics.median(self.after), "unit": self.metric.unit,
            "effect": self.effect, "effect_kind": "ratio" if self.metric.relative else "points",
            "p_value": self.p_value, "p_threshold": self.p_threshold,
            "runs_before": len(self.before), "runs_after": len(self.after),
        }


def effect(metric: Metric, before: float, after: float) -> float:
    return after / before if metric.relative else after - before


def significant_effect(metric: Metric, change: float, thresholds: Thresholds) -> bool:
    size = abs(math.log(change)) if metric.relative else abs(change)
    minimum = thresholds.minimum(metric)
    return size >= (math.log1p(minimum) if metric.relative else minimum) - 1e-12


def scale(metric: Metric, values) -> np.ndarray:
    """Where a change is additive: the logarithm of times and memory (a factor), accuracy's points as they are."""
    values = np.asarray(values, dtype=float)
    return np.log(values) if metric.relative else values


def change_points(metric: Metric, medians: np.ndarray, thresholds: Thresholds) -> list[int]:
    """Where the commits' medians change level: PELT with the linear kernel (the l2 cost of a change in mean, ruptures'
    C implementation), with the BIC penalty for the noise of the series: 2 sigma^2 log n. Sigma is estimated from the
    differences of neighbouring commits (their median absolute deviation, robust to the steps themselves), and never
    taken below a quarter of the minimum effect: smaller changes are not reported, so they need not be segmented."""
    floor = (math.log1p(thresholds.minimum(metric)) if metric.relative else thresholds.minimum(metric)) / 4
    noise = max(stats.median_abs_deviation(np.diff(medians), scale="normal") / math.sqrt(2), floor)
    penalty = 2 * noise**2 * math.log(len(medians))
    return ruptures.KernelCPD(kernel="linear", min_size=1).fit(medians.reshape(-1, 1)).predict(pen=penalty)[:-1]


def series_changes(series: Series, metric: Metric, thresholds: Thresholds, tests: int) -> list[Change]:
    """The change points that survive confirmation. Of those whose two segments fail the test or the minimum effect,
    the one whose segments differ least (the smallest least-squares gain of the cut) is dropped and its segments
    merged, until every remaining one is confirmed: each is then tested between the longest stretches without another
    change, so that PELT's extra cuts at a noisy commit cannot leave a real change too few runs on one side."""
    samples = series.samples(metric)
    if len(samples) < 2:
        return []
    medians = scale(metric, [statistics.median(values) for _, values in samples])
    edges = [0, *change_points(metric, medians, thresholds), len(samples)]
    tried: dict[tuple[int, int, int], Change] = {}

    def candidate(left: int, cut: int, right: int) -> Change:
        if (left, cut, right) not in tried:
            before = [value for _, values in samples[left:cut] for value in values]
            after = [value for _, values in samples[cut:right] for value in values]
            p_value = float(stats.mannwhitneyu(before, after, alternative="two-sided").pvalue)
            tried[left, cut, right] = Change(series, metric, samples[cut - 1][0], samples[cut][0], before, after,
                                             1.0 if math.isnan(p_value) else p_value, thresholds.alpha / tests)
        return tried[left, cut, right]

    while True:
        triples = list(zip(edges, edges[1:], edges[2:]))
        rejected = [(gain(medians[left:cut], medians[cut:right]), cut) for left, cut, right in triples
                    if not candidate(left, cut, right).confirmed(thresholds)]
        if not rejected:
            break
        edges.remove(min(rejected)[1])
    changes = []
    for left, cut, right in triples:  # placed again by the best single cut of the merged stretch: a noisy commit
        best = left + best_cut(medians[left:right])  # beside the change may have drawn PELT's cut to it
        refined = candidate(left, best, right)
        changes.append(refined if best != cut and refined.confirmed(thresholds) else candidate(left, cut, right))
    return changes


def gain(before: np.ndarray, after: np.ndarray) -> float:
    """How much a cut between two segments lowers the sum of squared deviations from their means."""
    return len(before) * len(after) / (len(before) + len(after)) * float(np.mean(before) - np.mean(after)) ** 2


def best_cut(medians: np.ndarray) -> int:
    """Where one change in mean splits a stretch best (least squares, ruptures' exact dynamic programming)."""
    return ruptures.KernelCPD(kernel="linear", min_size=1).fit(medians.reshape(-1, 1)).predict(n_bkps=1)[0]


def tested(series_list: list[Series]) -> list[tuple[Series, Metric]]:
    """The (series, metric) pairs with values at two commits or more: those a change can be found in."""
    return [(series, metric) for series in series_list for metric in METRICS if len(series.samples(metric)) > 1]


def find_changes(series_list: list[Series], thresholds: Thresholds) -> tuple[list[Change], int]:
    """Every confirmed change, and the number of series tested (the Bonferroni divisor)."""
    pairs = tested(series_list)
    changes = [change for series, metric in pairs
               for change in series_changes(series, metric, thresholds, len(pairs))]
    return changes, len(pairs)


# --- One new run against the history (bench.gate --history) -------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    metric: Metric
    history: list[float]  # the same machine's and configuration's recent runs
    new: float
    p_value: float  # one-sided: the chance of a value this much worse if the new run were like the history's
    p_threshold: float

    @property
    def effect(self) -> float:
        return effect(self.metric, statistics.median(self.history), self.new)

    def regression(self, thresholds: Thresholds) -> bool:
        worse = (self.effect > (1 if self.metric.relative else 0)) == self.metric.higher_is_worse
        return worse and self.p_value < self.p_threshold and significant_effect(self.metric, self.effect, thresholds)


def compare_with_history(metric: Metric, history: list[float], new: float, tests: int,
                         thresholds: Thresholds) -> Comparison:
    """A single new run cannot make a rank test significant (one value against n gives p >= 1/(n+1)), so it is tested
    against the prediction interval of the history's runs (Student's t on the metric's scale), one-sided towards
    worse, with the same Bonferroni-corrected level and minimum effect as a change in bench.history."""
    values, value = scale(metric, history), float(scale(metric, [new])[0])
    spread = float(np.std(values, ddof=1))
    worse_by = (value - float(np.mean(values))) * (1 if metric.higher_is_worse else -1)
    if spread == 0:  # identical history (a deterministic accuracy): any move away from it is beyond its noise
        p_value = 0.0 if worse_by > 0 else 1.0
    else:
        p_value = float(stats.t.sf(worse_by / (spread * math.sqrt(1 + 1 / len(values))), df=len(values) - 1))
    return Comparison(metric, history, new, p_value, thresholds.alpha / tests)


# --- Shown -----------------------------------------------------------------------------------------------------------
def shown_effect(metric: Metric, value: float) -> str:
    return f"{value - 1:+.1%}" if metric.relative else f"{value:+.2f} pt"


def shown_value(metric: Metric, value: float, unit: bool = True) -> str:
    """A metric's value, short: accuracy in %, memory in MiB, epoch time as a bare number (its unit is explained
    where it is shown)."""
    number = f"{value:.2f}" if metric.unit == "%" else f"{value:,.0f}" if metric.unit == "MiB" else f"{value:,.3g}"
    return number + {"%": "%", "MiB": " MiB"}.get(metric.unit, "") if unit else number


def before_and_after(change: Change) -> str:
    return (f"{shown_value(change.metric, statistics.median(change.before), unit=False)} → "
            f"{shown_value(change.metric, statistics.median(change.after))}")


