"""bench.history on histories generated from the real session's record (bench/generated_history.py): the planted
changes found at their commits and nothing else, noise alone quiet, bad input refused; its HTML opened in real
headless Chromium. Every command runs as a real process, as a user runs it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from bench import history
from bench.generated_history import Planted, commit_id, planted_example, write_history
from browser import INSTALL, chromium, render
from commands import run_python
from runfiles import entry, on_other_machine, variant, write

FRAMEWORKS = ["alpha", "beta", "gamma", "delta"]  # the real record, four times


@pytest.fixture
def real_run(real_session) -> Path:
    return real_session.json_path


def generated(real_run: Path, folder: Path, planted=(), commits: int = 24, runs_per_commit: int = 2, seed: int = 0) -> Path:
    write_history(real_run, folder, commits, runs_per_commit, FRAMEWORKS, list(planted), seed=seed)
    return folder


def bench_history(*args) -> subprocess.CompletedProcess:
    """`python -m bench.history ARGS` in this process: its exit status, standard output and error."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = history.main([str(arg) for arg in args])
        except SystemExit as usage_error:  # argparse's
            code = usage_error.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def changes_of(path: Path) -> list[dict]:
    return json.loads(path.read_text())["changes"]


# --- What is found ----------------------------------------------------------------------------------------------------
def test_the_three_planted_code_changes_are_found_at_their_commits_and_the_machine_change_is_not(real_run, tmp_path):
    folder = generated(real_run, tmp_path / "history", planted_example(FRAMEWORKS))
    files = sorted(folder.rglob("*.json"))
    for number, path in enumerate(reversed(files), start=1):  # file names against commit order: the commits decide
        path.rename(path.with_name(f"{number:04d}_{path.name[5:]}"))
    result = run_python("-m", "bench.history", str(folder), "--json", str(tmp_path / "changes.json"), timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    found = {(change["framework"], change["metric"]): change for change in changes_of(tmp_path / "changes.json")}
    planted_at = {("alpha", "epoch_time"): 6, ("beta", "test_accuracy"): 14, ("gamma", "peak_memory_resident"): 18}
    assert set(found) == set(planted_at)  # the machine, 1.6x slower from commit 10 on, is no change
    for key, first in planted_at.items():
        change = found[key]
        assert change["first_commit"] == commit_id(first) and change["last_good_commit"] == commit_id(first - 1)
        assert change["direction"] == "regression" and change["p_value"] < change["p_threshold"]
        assert change["machine"].startswith(f"{entry(json.loads(real_run.read_text()))['extra_info']['device']} · ")
    assert 1.3 < found["alpha", "epoch_time"]["effect"] < 1.4 and found["alpha", "epoch_time"]["effect_kind"] == "ratio"
    assert -2.3 < found["beta", "test_accuracy"]["effect"] < -1.7
    assert 1.25 < found["gamma", "peak_memory_resident"]["effect"] < 1.35
    assert "3 regression(s), 0 improvement(s)" in result.stdout and commit_id(6)[:7] in result.stdout


def test_noise_alone_reports_nothing_and_exits_0(real_run, tmp_path):
    folder = generated(real_run, tmp_path / "history")
    result = bench_history(folder, "--json", tmp_path / "changes.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert changes_of(tmp_path / "changes.json") == [] and "no changes found" in result.stdout


def test_runs_of_different_machines_are_never_compared(real_run, tmp_path):
    """A later commit on a machine twice as slow, yardstick and all: a series of its own, not a change."""
    folder = generated(real_run, tmp_path / "history", commits=6)
    for path in sorted(folder.rglob("*.json"))[6:]:
        data = on_other_machine(json.loads(path.read_text()))
        for benchmark in data["benchmarks"]:
            benchmark["extra_info"]["epoch_seconds"] = [2 * s for s in benchmark["extra_info"]["epoch_seconds"]]
        write(path, data)
    result = bench_history(folder, "--json", tmp_path / "changes.json")
    assert result.returncode == 0 and changes_of(tmp_path / "changes.json") == [], result.stdout
    assert "12 runs of 6 commits, 8 series" in result.stdout  # four frameworks on each of two machines


def test_a_change_at_a_dirty_tree_is_marked(real_run, tmp_path):
    folder = generated(real_run, tmp_path / "history", [Planted(8, "alpha", time=1.5)], commits=16, runs_per_commit=1)
    for path in sorted(folder.rglob("*.json"))[8:]:  # uncommitted changes on top of the last clean commit, run 8 times
        data = json.loads(path.read_text())
        data["commit_info"].update(id=commit_id(7), dirty=True)
        write(path, data)
    result = bench_history(folder, "--json", tmp_path / "changes.json")
    (change,) = changes_of(tmp_path / "changes.json")
    assert change["first_commit"] == change["last_good_commit"] == commit_id(7) and change["first_commit_dirty"]
    assert f"{commit_id(7)[:7]}+dirty" in result.stdout and result.returncode == 1


def test_records_of_the_first_harness_are_read(real_run, tmp_path):
    """Without a yardstick (schema 1, no "schema" key) a record has no epoch time in machine units: its other
    metrics are still compared."""
    folder = generated(real_run, tmp_path / "history", commits=4, runs_per_commit=1)
    for path in folder.rglob("*.json"):
        data = json.loads(path.read_text())
        for benchmark in data["benchmarks"]:
            for key in ("matmul", "schema", "devices", "processes", "threads_per_replica"):
                benchmark["extra_info"].pop(key, None)
        write(path, data)
    result = bench_history(folder)
    assert result.returncode == 0 and "4 series (8 with two commits or more to compare)" in result.stdout, result.stdout


# --- Bad input --------------------------------------------------------------------------------------------------------
def test_a_folder_names_and_skips_a_file_that_is_not_a_run(real_run, tmp_path):
    folder = generated(real_run, tmp_path / "history", planted_example(FRAMEWORKS))
    foreign = write(folder / "other-project.json", {"benchmarks": [{"name": "test_x", "stats": {"median": 1.0},
                                                                     "extra_info": {"size": 3}}]})
    (folder / "unreadable.json").write_bytes(b"\xff\xfe")
    (folder / "empty.json").write_bytes(b"")
    result = bench_history(folder, "--json", tmp_path / "changes.json")
    assert result.returncode == 1 and len(changes_of(tmp_path / "changes.json")) == 3
    warnings = result.stderr.splitlines()
    assert len(warnings) == 3 and all(line.startswith("warning: skipped ") for line in warnings), result.stderr
    assert any(f"{foreign}: benchmark 1: 'framework' is None" in line for line in warnings)


@pytest.mark.parametrize("case", ["foreign", "nan", "negative", "interrupted"])
def test_a_file_given_by_name_that_cannot_be_used_is_refused(real_run, tmp_path, case):
    data = json.loads(real_run.read_text())
    bad = write(tmp_path / "bad.json", {
        "foreign": {"benchmarks": [{"name": "test_x", "stats": {}, "extra_info": {"size": 3}}]},
        "nan": variant(data, test_accuracy=float("nan")),
        "negative": variant(data, peak_rss_bytes=-1),
        "interrupted": {**data, "mnist_bench_interrupted": True},
    }[case])
    result = bench_history(real_run, bad, "--json", tmp_path / "changes.json")
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {bad}") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "changes.json").exists()


def test_outputs_are_new_files_checked_before_anything_is_read(real_run, tmp_path):
    existing = write(tmp_path / "changes.json", {"kept": True})
    result = bench_history(real_run, "--json", existing)
    assert result.returncode == 2
    assert result.stderr == f"error: --json {existing} exists: results are never overwritten; choose a new file name\n"
    assert json.loads(existing.read_text()) == {"kept": True}
    result = bench_history(tmp_path / "missing.json", "--html", tmp_path / "no-such-folder" / "file" / "x.html",
                           "--alpha", "0")
    assert result.returncode == 2 and "argument --alpha: a probability between 0 and 1" in result.stderr


def test_calibration_measures_the_noise_of_repeated_runs_of_one_commit(real_run, tmp_path):
    folder = generated(real_run, tmp_path / "history", commits=1, runs_per_commit=8)
    result = bench_history("--calibrate", folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" of 8") == len(FRAMEWORKS) * 3  # time, accuracy, resident memory per framework
    advice = result.stdout.strip().splitlines()[-3:]
    assert [line.split(":")[0] for line in advice] == ["accuracy", "memory", "time"]
    assert all(line.count("it holds") == 2 for line in advice), advice  # the generated noise is below the defaults


# --- The HTML report, in a real browser ---------------------------------------------------------------------------------
@pytest.fixture
def browser():
    if chromium() is None:
        if os.environ.get("CI"):  # CI must show the browser check, not skip it
            pytest.fail(f"chromium is missing in CI, so the HTML report was not checked: {INSTALL}", pytrace=False)
        pytest.skip(f"chromium is not installed: {INSTALL}")


def test_the_html_report_renders_every_chart_offline_with_no_console_message(browser, real_run, tmp_path):
    folder = generated(real_run, tmp_path / "history", planted_example(FRAMEWORKS))
    odd = sorted(folder.rglob("*.json"))[0]
    data = json.loads(odd.read_text())
    data["benchmarks"][0]["extra_info"]["framework"] = "<b>bold</b> & $x$"  # markup to plotly and to HTML
    write(odd, data)
    write(tmp_path / "other" / "run.json", on_other_machine(json.loads(real_run.read_text())))  # a second machine
    page = tmp_path / "history.html"
    result = run_python("-m", "bench.history", str(folder), str(tmp_path / "other"), "--html", str(page), timeout=120)
    assert result.returncode == 1, result.stderr
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text  # everything inline: nothing to fetch
    rendering = render(page, tmp_path / "screenshot.png")
    assert rendering.console == [], rendering.console
    assert sorted(rendering.charts) == ["chart-1", "chart-2"] and rendering.undrawn() == [], rendering.charts
    assert rendering.charts["chart-1"]["traces"] == (len(FRAMEWORKS) + 1) * 6  # six panels, a line per framework
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; $x$" in rendering.dom  # the name shown as it is, not as bold text
    assert rendering.dom.count("<tr>") == 1 + 3  # the changes table: its header and the three planted changes
    with Image.open(tmp_path / "screenshot.png") as screenshot:
        assert screenshot.size == (1400, 1600)
        assert coloured_pixels(screenshot) > 10_000  # the frameworks' lines drawn, not a page of black text


def coloured_pixels(image: Image.Image) -> int:
    return sum(image.convert("HSV").getchannel("S").histogram()[100:])


def test_the_browser_check_sees_a_broken_page(browser, tmp_path):
    """The check itself: a chart that never draws and a console error are both seen."""
    page = tmp_path / "broken.html"
    page.write_text('<html><body><div id="chart-1" class="plotly-graph-div"></div>'
                    '<script>console.error("broken"); Plotly.newPlot("chart-1", []);</script></body></html>')
    rendering = render(page, tmp_path / "broken.png", height=400)
    assert rendering.undrawn() == ["chart-1"]
    with Image.open(tmp_path / "broken.png") as screenshot:
        assert coloured_pixels(screenshot) == 0
    assert [message.split(",")[0] for message in rendering.console] == [
        '"broken"', '"Uncaught ReferenceError: Plotly is not defined"']
