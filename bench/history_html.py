"""The HTML report of a history (`python -m bench.history --html FILE`): one self-contained file that works offline.

Per machine and device, one chart of six panels against the commits, in the order they were made: the median epoch
time in units of the machine's speed, the test accuracy, the peak memory (resident, GPU, the framework's allocator),
the model FLOP/s as a share of the matmul yardstick, the warm-up (compilation, tracing) in the epoch time's units and
the last epoch's training loss; one line per framework (its colour the same as in the report's PNGs), a point per
commit (the median of its runs; the hover shows the commit, its date, every run's value and file, and the test loss),
and each detected change marked at its first commit. A table of the changes ends the page.

Plotly, with its JavaScript library written into the page once (`get_plotlyjs()`): nothing is fetched from a CDN, the
file works from disk and as a CI artifact. Chosen over bokeh's INLINE resources because plotly's hover templates show
a point's commit, date and values without custom JavaScript, and plotly brings one small dependency (narwhals) where
bokeh brings tornado (a web server) and xyzservices (map tiles) that a static page never uses.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Callable

import plotly.io
import plotly.offline
from matplotlib.colors import to_hex
from plotly.subplots import make_subplots

from bench.changes import METRICS, Change, Metric, Series, Thresholds, before_and_after, shown_effect
from bench.record import RunRecord
from bench.report import framework_styles
from bench.text import printable


def plain(text) -> str:
    """Text that plotly's labels and the page show as it is: printable, no markup (plotly reads <b> and <br>, and a
    "$...$" as TeX for MathJax, which the page does not load)."""
    return html.escape(printable(text)).replace("$", "&#36;")


MEMORY_STYLES = {"peak_memory_resident": "solid", "peak_memory_gpu": "dash", "peak_memory_allocator": "dot"}
PANELS: list[tuple[str, list[Metric] | Callable[[RunRecord], float | None], str]] = [
    # (title, the metrics it shows or the value it plots, unit)
    ("Median epoch time, in units of the machine's speed",
     [metric for metric in METRICS if metric.name == "epoch_time"], METRICS[0].unit),
    ("Test accuracy", [metric for metric in METRICS if metric.name == "test_accuracy"], "%"),
    ("Peak memory: resident (solid), GPU (dashed), allocator (dotted)",
     [metric for metric in METRICS if metric.name in MEMORY_STYLES], "MiB"),
    ("Model FLOP/s, % of the matmul yardstick",
     lambda record: None if record.matmul_utilization is None else 100 * record.matmul_utilization, "%"),
    ("Warm-up (compilation, tracing), in units of the machine's speed",
     lambda record: record.normalized(record.warmup_s), METRICS[0].unit),
    ("Mean training loss of the last epoch",
     lambda record: record.epoch_train_loss[-1] if record.epoch_train_loss else None, ""),
]


class Hovers:
    """The hover lines of commits and runs, written once each: a history of 1,000 runs draws every run in six panels."""

    def __init__(self):
        self.commits: dict[int, str] = {}
        self.runs: dict[int, str] = {}

    def commit(self, commit) -> str:
        if id(commit) not in self.commits:
            when = commit.time.strftime("%Y-%m-%d %H:%M") if commit.time else "no commit time"
            self.commits[id(commit)] = (f"commit {plain(commit.id or commit.label)}{' (dirty)' if commit.dirty else ''}"
                                        f"<br>committed {when}")
        return self.commits[id(commit)]

    def run(self, run) -> str:
        if id(run) not in self.runs:
            self.runs[id(run)] = plain(run.label)
        return self.runs[id(run)]


def commit_points(series: Series, value: Callable[[RunRecord], float | None], hovers: Hovers) -> list[tuple]:
    """(commit label, median, hover text) per commit with a value."""
    by_commit: dict[int, tuple] = {}
    for commit, run, record in series.points:
        figure = value(record)
        if figure is not None:
            by_commit.setdefault(id(commit), (commit, []))[1].append((figure, run, record))
    points = []
    for commit, runs in by_commit.values():
        median = statistics.median(figure for figure, _, _ in runs)
        losses = [record.test_loss for _, _, record in runs if record.test_loss is not None]
        hover = "<br>".join([hovers.commit(commit), f"median {median:,.4g} of {len(runs)} run(s)",
                             *(f"{figure:,.4g}: {hovers.run(run)}" for figure, run, _ in runs[:8]),
                             *([f"test loss {statistics.median(losses):.4f}"] if losses else [])])
        points.append((commit.label, median, hover))
    return points


def machine_figure(series_list: list[Series], changes: list[Change], colors: dict[str, str],
                   several_configurations: bool) -> dict:
    """One machine's chart as plotly's figure dictionary: the layout made by make_subplots, the traces added as plain
    data, since plotly's validation of each trace costs seconds on a history of 1,000 runs (the page is written with
    validate=False)."""
    figure = make_subplots(rows=len(PANELS), cols=1, shared_xaxes=True, vertical_spacing=0.05,
                           subplot_titles=[title for title, _, _ in PANELS])
    order = list(dict.fromkeys(commit.label for series in series_list for commit, _, _ in series.points))
    hovers, traces = Hovers(), []
    for series in series_list:
        name = plain(series.framework + (f" ({series.configuration})" if several_configurations else ""))
        shown_in_legend = True
        for row, (_, plotted, unit) in enumerate(PANELS, start=1):
            lines = [(metric.value, MEMORY_STYLES.get(metric.name, "solid"), metric.short) for metric in plotted] \
                if isinstance(plotted, list) else [(plotted, "solid", "")]
            for value, dash, what in lines:
                points = commit_points(series, value, hovers)
                if not points:
                    continue
                labels, values, hover = zip(*points)
                axis = "" if row == 1 else str(row)  # make_subplots names row r's axes x<r> and y<r>
                traces.append(dict(
                    type="scatter", x=labels, y=values, customdata=hover, mode="lines+markers", name=name,
                    legendgroup=name, showlegend=shown_in_legend, line=dict(color=colors[series.framework], dash=dash),
                    hovertemplate=f"<b>{name}</b> {what}<br>%{{y:,.4g}} {html.escape(unit)}<br>%{{customdata}}"
                                  "<extra></extra>", xaxis=f"x{axis}", yaxis=f"y{axis}"))
                shown_in_legend = False
    rows = {metric.name: row for row, (_, plotted, _) in enumerate(PANELS, start=1) if isinstance(plotted, list)
            for metric in plotted}
    position = {label: index for index, label in enumerate(order)}
    for change in changes:
        figure.add_vline(x=position[change.first.label], row=rows[change.metric.name], col=1, line_dash="dot",
                         line_color=colors[change.series.framework], exclude_empty_subplots=False,
                         annotation_text=plain(f"{change.series.framework} {shown_effect(change.metric, change.effect)}"
                                               f" at {change.first.label}"),
                         annotation_position="top left", annotation_font_color=colors[change.series.framework])
    figure.update_xaxes(type="category", categoryorder="array", categoryarray=order, tickangle=-45)
    for row, (_, _, unit) in enumerate(PANELS, start=1):
        figure.update_yaxes(title_text=html.escape(unit), row=row, col=1)
    figure.update_layout(height=260 * len(PANELS) + 120, margin=dict(t=40, b=80), hovermode="closest",
                         legend=dict(title_text="framework"), template="plotly_white")
    return {**figure.to_dict(), "data": traces}


CHANGE_COLUMNS = ("machine", "framework", "metric", "change", "before → after", "last good → first commit",
                  "committed", "runs before / after", "p (threshold)")


def commit_cell(commit) -> str:
    """The commit's id, cut to 12 characters; the whole id on hover (and in --json)."""
    return f'<code title="{plain(commit.id or commit.label)}">{plain((commit.id or commit.label)[:12])}' \
           f'{" (dirty)" if commit.dirty else ""}</code>'


def changes_table(changes: list[Change]) -> str:
    if not changes:
        return "<p>No changes found.</p>"
    rows = []
    for change in changes:
        cells = [plain(text) for text in (
            change.series.machine, change.series.framework, change.metric.short,
            f"{shown_effect(change.metric, change.effect)} {change.direction}", before_and_after(change))]
        cells.append(f"{commit_cell(change.last_good)} → {commit_cell(change.first)}")
        cells += [plain(text) for text in (
            change.first.time.strftime("%Y-%m-%d %H:%M") if change.first.time else "–",
            f"{len(change.before)} / {len(change.after)}", f"{change.p_value:.1e} ({change.p_threshold:.1e})")]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    header = "".join(f"<th>{column}</th>" for column in CHANGE_COLUMNS)
    return (f'<table id="changes"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f"<p>Epoch times: {plain(METRICS[0].unit)}.</p>")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
code { font-size: 0.95em; }
"""


def page(series_list: list[Series], changes: list[Change], thresholds: Thresholds) -> str:
    """The whole page; its only script is plotly's, in its <head>, and each chart's call of Plotly.newPlot."""
    names = sorted({series.framework for series in series_list})
    colors = {name: to_hex(style["color"]) for name, style in framework_styles(names).items()}
    machines: dict[str, list[Series]] = {}
    for series in series_list:
        machines.setdefault(series.machine, []).append(series)
    sections = []
    for index, (machine, in_machine) in enumerate(machines.items(), start=1):
        several = len({series.configuration for series in in_machine}) > 1
        figure = machine_figure(in_machine, [change for change in changes if change.series.machine == machine], colors,
                                several)
        chart = plotly.io.to_html(figure, full_html=False, include_plotlyjs=False, div_id=f"chart-{index}",
                                  config={"displaylogo": False, "responsive": True}, validate=False)
        configurations = "; ".join(sorted({plain(series.configuration) for series in in_machine}))
        sections.append(f"<h2>{plain(machine)}</h2><p>Run configuration: {configurations}.</p>{chart}")
    runs = {id(run) for series in series_list for _, run, _ in series.points}
    regressions = sum(change.direction == "regression" for change in changes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>MNIST ResNet18: benchmark history</title>
<style>{STYLE}</style>
<script>{plotly.offline.get_plotlyjs()}</script></head>
<body>
<h1>MNIST ResNet18: benchmark history</h1>
<p>{len(runs)} runs, {len(machines)} machine(s), {len(changes)} change(s), {regressions} of them regressions.
Commits left to right in the order they were made; a point is the median of a commit's runs (hover for each run).
A dotted line marks a change at its first commit: found by PELT (ruptures) on the commits' medians, confirmed by a
Mann-Whitney U test between the runs before and after (p below {thresholds.alpha} divided by the series tested) and
at least {thresholds.min_time_change:.0%} in time, {thresholds.min_memory_change:.0%} in memory or
{thresholds.min_accuracy_change} points in accuracy. Epoch times are seconds × the session's matmul rate, shown as the
seconds of a machine whose matmul runs at 1 TFLOP/s: a uniformly slower machine leaves them unchanged.</p>
{"".join(sections)}
<h2>Changes</h2>
{changes_table(changes)}
</body></html>
"""
