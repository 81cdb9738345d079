"""The report, on the JSON of a real short benchmark session and on files derived from it.

The real session (the `real_session` fixture) is saved both with --benchmark-json and in pytest-benchmark's autosave
storage; the other runs are edits of it (renamed tests, another device, a slower run, an older harness), and the
malformed inputs are written by hand.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import statistics
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from bench import report
from bench.record import INTERRUPTED, load_runs, machine_name
from commands import REPO, TESTS, run_python
from runfiles import FRAMEWORK, entry, on_other_machine, renamed, variant, write

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def real_run(real_session) -> Path:
    return real_session.json_path


@pytest.fixture
def data(real_run) -> dict:
    return json.loads(real_run.read_text())


def report_main(capsys, *args) -> tuple[int, str, str]:
    code = report.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_png(path: Path) -> None:
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 20_000, (path, len(content))
    with Image.open(path) as image:
        assert image.width >= 800 and image.height >= 400


def row_of(out: str, framework: str) -> list[str]:
    row = next(line for line in out.splitlines() if line.startswith(f"| {framework} "))
    return [cell.strip() for cell in row.strip("|").split("|")]


# --- Tables -----------------------------------------------------------------------------------------------------------
def test_table_shows_every_column_of_a_real_run(capsys, real_run, data, tmp_path):
    code, out, err = report_main(capsys, real_run, "--plots", tmp_path / "plots")
    assert code == 0, err
    info = entry(data)["extra_info"]
    header = next(line for line in out.splitlines() if line.startswith("| framework"))
    for column in ("framework", "version", "device", "replicas", "median epoch s", "images/s", "test accuracy",
                   "time to target s", "peak memory", "model TFLOP/s", "of matmul", "harness overhead", "vs fastest"):
        assert column in header
    cells = row_of(out, FRAMEWORK)
    assert cells[:5] == [FRAMEWORK, info["framework_version"], info["device"], "1", "2"]  # 1 replica, 2 epochs
    assert cells[5] == f"{statistics.median(info['epoch_seconds']):.2f}"
    assert cells[7] == f"{info['test_accuracy']:.2%}" and cells[-1] == "1.00×"
    memory = info["gpu_memory_peak_bytes"] or info["peak_rss_bytes"]
    assert cells[9].startswith(f"{memory / 2**20:,.0f} MiB")
    assert cells[10] == f"{info['achieved_flops_per_second'] / 1e12:.3f}"
    assert cells[11] == f"{info['matmul_utilization']:.0%}" and cells[12] == f"{info['harness_overhead']:.1%}"
    assert machine_name(data["machine_info"]) in out.splitlines()[0]  # the run's heading names the machine
    matmul = info["matmul"]
    assert (f"matmul yardstick: {matmul['flops_per_second'] / 1e9:,.0f} GFLOP/s ({matmul['hardware']} (cpu, "
            f"{matmul['threads']} BLAS threads), float32 {matmul['size']}x{matmul['size']} for --precision fp32: the "
            f"fastest of {matmul['products']} products, median {matmul['median_flops_per_second'] / 1e9:,.0f} "
            "GFLOP/s; numpy ") in out, out
    for note in info["notes"]:  # each record's notes, once per note, naming its frameworks
        assert f"note ({FRAMEWORK}): {note}" in out


def test_a_data_parallel_run_is_shown_with_its_scaling_against_one_replica(capsys, data, tmp_path):
    info = entry(data)["extra_info"]
    two = variant(data, config={**info["config"], "replicas": 2}, devices=["CPU", "CPU"], processes=2,
                  threads_per_replica=1,
                  epoch_seconds=[seconds / 1.5 for seconds in info["epoch_seconds"]])  # 1.5x the throughput on two
    code, out, err = report_main(capsys, write(tmp_path / "one.json", data), write(tmp_path / "two.json", two),
                                 "--plots", tmp_path / "plots")
    assert code == 0, err
    scaling = out.split("## Data parallel on ")[1]
    cells = row_of(scaling, FRAMEWORK)
    assert cells[2:6] == ["2", "CPU, CPU", "2", "1"] and cells[-1] == "75%", scaling
    assert cells[-2] == f"{1.5 * info['images_per_second'] / 2:,.0f}"


def test_fastest_is_relative_within_a_device_only(capsys, data, tmp_path):
    fast = copy.deepcopy(entry(data))
    fast["extra_info"].update(framework="jax", device="NVIDIA H100", epoch_seconds=[0.1, 0.1])
    both = copy.deepcopy(data)
    both["benchmarks"].append(fast)
    code, out, _ = report_main(capsys, write(tmp_path / "both.json", both), "--plots", tmp_path / "plots")
    assert code == 0
    assert row_of(out, FRAMEWORK)[-1] == row_of(out, "jax")[-1] == "1.00×"


# --- Plots ------------------------------------------------------------------------------------------------------------
def test_two_runs_give_tables_a_plot_each_and_a_history_plot(capsys, real_run, data, tmp_path):
    second = write(tmp_path / "second.json", variant(data, test_accuracy=0.5))
    code, out, err = report_main(capsys, real_run, second, "--plots", tmp_path / "plots")
    assert code == 0, err
    names = sorted(path.name for path in (tmp_path / "plots").iterdir())  # no temporary file left beside them
    assert names[0] == "history-" + report.slug(f"{entry(data)['extra_info']['device']} · " +
                                                 machine_name(data["machine_info"])) + ".png"
    assert names[1:] == ["run-epochs.png", "second-epochs.png"]
    for name in names:
        assert_png(tmp_path / "plots" / name)
        assert str(tmp_path / "plots" / name) in out
    assert "## History on" in out and f"| {FRAMEWORK} | second |" in out


def test_default_plot_folder_is_beside_the_first_run(capsys, data, tmp_path):
    run = write(tmp_path / "results" / "out.json", data)
    code, _, err = report_main(capsys, run)
    assert code == 0, err
    assert_png(tmp_path / "results" / "out-plots" / "out-epochs.png")


# --- History ----------------------------------------------------------------------------------------------------------
def test_autosaved_history_folder_is_read_in_run_order(capsys, real_session, data, tmp_path):
    (saved,) = real_session.history.glob("*/0001_*.json")  # pytest-benchmark's own naming
    history = tmp_path / "history" / saved.parent.name
    history.mkdir(parents=True)
    (history / saved.name).write_bytes(saved.read_bytes())
    later = variant(json.loads(saved.read_text()), test_accuracy=0.5)
    later["datetime"] = "2999-01-01T00:00:00+00:00"
    write(history / saved.name.replace("0001_", "0002_"), later)
    code, out, err = report_main(capsys, tmp_path / "history", "--plots", tmp_path / "plots")
    assert code == 0, err
    commit = data["commit_info"]["id"][:7]
    rows = [line for line in out.splitlines() if line.startswith(f"| {FRAMEWORK} |")]
    assert [row.split("|")[2].strip() for row in rows[-2:]] == [f"0001_{commit}", f"0002_{commit}"]
    assert "50.00%" in rows[-1]


def test_history_matches_frameworks_across_renamed_tests(capsys, real_run, data, tmp_path):
    code, out, err = report_main(capsys, real_run, write(tmp_path / "renamed.json", renamed(data)),
                                 "--plots", tmp_path / "plots")
    assert code == 0, err
    history = out.split("## History on")[1]
    rows = [line for line in history.splitlines() if line.startswith(f"| {FRAMEWORK} |")]
    assert len(rows) == 2 and "-2.00 pt" in rows[1]
    assert "torch-eager" not in out


def test_runs_from_different_devices_are_kept_apart(capsys, real_run, data, tmp_path):
    other = write(tmp_path / "xeon.json", on_other_machine(data))
    code, out, err = report_main(capsys, real_run, other, "--plots", tmp_path / "plots")
    assert code == 0, err
    warning = next(line for line in out.splitlines() if line.startswith("warning:"))
    assert "2 different devices" in warning and "Intel Xeon Platinum 8480" in warning
    assert "## History on" not in out  # one run per device: nothing to compare
    assert not any(path.name.startswith("history-") for path in (tmp_path / "plots").iterdir())


def test_a_run_whose_record_failed_after_its_timed_epochs_still_reports_its_timing(capsys, data, tmp_path):
    crashed = copy.deepcopy(data)
    entry(crashed)["extra_info"] = {}  # what pytest-benchmark keeps when record() fails after the timed rounds
    code, out, err = report_main(capsys, write(tmp_path / "crashed.json", crashed), "--plots", tmp_path / "plots")
    assert code == 0, err
    cells = row_of(out, FRAMEWORK)  # named after the test's param
    assert cells[5] == f"{entry(data)['stats']['median']:.2f}" and cells[7] == "–"
    assert f"note: {FRAMEWORK}: no record in its extra_info" in out


# --- Bad input: one line, exit 2, nothing written ----------------------------------------------------------------------
def extra_info_json(**fields) -> bytes:
    return json.dumps({"benchmarks": [{"stats": {"median": 1.0}, "extra_info": {"framework": "jax", **fields}}]},
                      allow_nan=True).encode()


MALFORMED = {
    "empty.json": (b"", "the file is empty"),
    "truncated.json": (None, "invalid JSON ("),  # the real run, cut in the middle
    "list.json": (b"[1, 2]", "not pytest-benchmark JSON (no 'benchmarks' list)"),
    "other.json": (b'{"name": "something else"}', "not pytest-benchmark JSON (no 'benchmarks' list)"),
    "record.json": (b'{"framework": "pytorch", "epochs": 2}', "a `python -m bench run --output` record"),
    "binary.json": (bytes(range(256)), "not a text file"),
    "deep.json": (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    "long-integer.json": (b'{"benchmarks": [], "x": ' + b"9" * 5000 + b"}", "JSON the standard parser refuses"),
    "interrupted.json": (b'{"benchmarks": [], "mnist_bench_interrupted": true}', "an interrupted session's partial"),
    "no-stats.json": (b'{"benchmarks": [{"name": "test_train[pytorch]"}]}', "benchmark 1 has no 'stats' object"),
    "text-accuracy.json": (extra_info_json(test_accuracy="high"),
                           "(jax): test_accuracy is 'high', not a fraction in [0, 1]"),
    "nan-accuracy.json": (extra_info_json(test_accuracy=float("nan")), "(jax): test_accuracy is nan, not a fraction"),
    "accuracy-above-one.json": (extra_info_json(epoch_test_accuracy=[0.9, 99.3]),
                                "(jax): epoch_test_accuracy is [0.9, 99.3], not a list of fractions in [0, 1]"),
    "infinite-time.json": (extra_info_json(epoch_seconds=[1.0, float("inf")]),
                           "(jax): epoch_seconds is [1.0, inf], not a list of positive finite seconds"),
    "zero-time.json": (extra_info_json(epoch_seconds=[0.0]), "(jax): epoch_seconds is [0.0], not a list of positive"),
    "denormal-time.json": (extra_info_json(epoch_seconds=[5e-324, 5e-324], train_images=4096),  # inf images/s
                           "(jax): epoch_seconds is [5e-324, 5e-324], not a list of positive finite seconds (each "
                           "from 1 µs to 1e7 s)"),
    "fewer-accuracies.json": (extra_info_json(epoch_seconds=[1.0, 1.0], epoch_test_accuracy=[0.9]),
                              "(jax): epoch_test_accuracy holds 1 values for 2 timed epochs (epoch_seconds)"),
    "more-losses.json": (extra_info_json(epoch_seconds=[1.0], epoch_train_loss=[0.5, 0.2]),
                         "(jax): epoch_train_loss holds 2 values for 1 timed epochs (epoch_seconds)"),
    "epochs-disagree.json": (extra_info_json(epoch_seconds=[1.0, 1.0], epochs=3),
                             "(jax): epochs is 3, but epoch_seconds holds 2 timed epochs"),
    "config-epochs-disagree.json": (extra_info_json(epoch_seconds=[1.0], config={"epochs": 2}),
                                    "(jax): config's epochs is 2, but epoch_seconds holds 1 timed epochs"),
    "absurd-matmul.json": (extra_info_json(matmul={"device": "cpu", "hardware": "x", "precision": "fp32", "dtype": "f",
                                                   "size": 8, "flops_per_second": 1e300, "median_flops_per_second": 1,
                                                   "products": 1, "threads": 1, "method": "m", "nominal_peak_flops": None,
                                                   "nominal_peak_source": ""}),
                           "not a matmul yardstick with positive rates of at most 1e+18 FLOP/s"),
    "null-in-times.json": (extra_info_json(epoch_seconds=[1, None]), "(jax): epoch_seconds is [1, None], not a list"),
    "negative-memory.json": (extra_info_json(peak_rss_bytes=-1), "(jax): peak_rss_bytes is -1, not a non-negative"),
    "device-list.json": (extra_info_json(device=["CPU"]), "(jax): device is ['CPU'], not a string"),
    "config-string.json": (extra_info_json(config="fast"), "(jax): config is 'fast', not an object"),
    "no-framework.json": (b'{"benchmarks": [{"stats": {}, "extra_info": {"framework": 7}}]}',
                          "'framework' is 7, not a name"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_bad_input_is_one_clear_line_and_writes_nothing(capsys, real_run, tmp_path, name):
    content, message = MALFORMED[name]
    if content is None:
        text = real_run.read_text()
        content = text[: text.index('"extra_info"') + 30].encode()
    bad = tmp_path / name
    bad.write_bytes(content)
    plots = tmp_path / "plots"
    code, out, err = report_main(capsys, real_run, bad, "--plots", plots)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {bad}") and message in err and err.count("\n") == 1, err
    assert not plots.exists()


def test_missing_files_and_empty_folders_are_clear_errors(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = report_main(capsys, tmp_path / "empty")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'empty'}: no .json files in this folder"
    code, _, err = report_main(capsys, tmp_path / "gone.json")
    assert code == 2 and "gone.json: no such file (pytest-benchmark writes no JSON when no benchmark finished" in err


def test_a_run_without_benchmarks_is_reported(capsys, data, tmp_path):
    nothing = copy.deepcopy(data)
    nothing["benchmarks"] = []
    code, out, _ = report_main(capsys, write(tmp_path / "nothing.json", nothing), "--plots", tmp_path / "plots")
    assert code == 0 and "note: no benchmark entries" in out


# --- Names: a plot file per run, every name shown as it is -------------------------------------------------------------
def listed_plots(out: str) -> list[str]:
    return [line[2:] for line in out.splitlines() if line.startswith("- ")]


def test_runs_whose_names_differ_only_in_punctuation_case_or_spaces_get_a_plot_each(capsys, data, tmp_path):
    runs = [write(tmp_path / name, data) for name in ("run_1.json", "run-1.json", "Run 1.json")]
    code, out, err = report_main(capsys, *runs, "--plots", tmp_path / "plots")
    assert code == 0, err
    listed = listed_plots(out)
    assert len(listed) == len({name.casefold() for name in listed}) == 4, listed  # three runs and their history
    assert sorted(path.name for path in (tmp_path / "plots").iterdir()) == sorted(Path(name).name for name in listed)


def unescaped_bars(row: str) -> int:
    return len(re.findall(r"(?<!\\)\|", row))


def test_names_that_read_as_markup_are_shown_as_plain_text(capsys, data, tmp_path):
    """matplotlib reads "$...$" as TeX and hides legend labels that start with "_"; Markdown splits a cell at "|" and a
    row at a newline; a terminal obeys an escape sequence."""
    odd = variant(data, framework="_my|frame\nwork $x^$ \x1b[31m")
    code, out, err = report_main(capsys, write(tmp_path / "cost $x^$.json", odd), "--plots", tmp_path / "plots")
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("| framework"))
    (row,) = [line for line in out.splitlines() if line.startswith("| _my")]
    assert row.startswith("| _my\\|frame\\nwork $x^$ \\x1b[31m |") and unescaped_bars(row) == unescaped_bars(header)
    assert "## cost $x^$:" in out and "\x1b" not in out
    (plot,) = listed_plots(out)
    assert_png(Path(plot))


def test_a_file_name_that_is_not_utf8_is_shown_with_its_bytes_escaped(data, tmp_path):
    run = write(tmp_path / os.fsdecode(b"r\xffn.json"), data)
    result = run_python("-m", "bench.report", str(run), "--plots", str(tmp_path / "plots"), timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "## r\\xffn:" in result.stdout
    (plot,) = (tmp_path / "plots").iterdir()
    assert_png(plot)


# --- A folder with files that are not runs -----------------------------------------------------------------------------
def test_a_folder_names_and_skips_what_is_not_a_run_and_reports_the_rest(capsys, data, tmp_path):
    folder = tmp_path / "history"
    write(folder / "good.json", data)
    write(folder / "sub.json" / "inner.json", variant(data, test_accuracy=0.5))  # a folder named *.json: read inside
    (folder / "dangling.json").symlink_to(tmp_path / "gone.json")
    write(folder / "run.partial.json", {**data, INTERRUPTED: True})
    write(folder / "record.json", entry(data)["extra_info"])  # what `python -m bench run --output` writes
    (folder / "empty.json").write_bytes(b"")
    code, out, err = report_main(capsys, folder, "--plots", tmp_path / "plots")
    assert code == 0, err
    warnings = err.splitlines()
    assert all(line.startswith("warning: skipped ") for line in warnings) and len(warnings) == 4, err
    for name, why in (("dangling.json", "a dangling symbolic link"), ("run.partial.json", "an interrupted session"),
                      ("record.json", "a `python -m bench run --output` record"), ("empty.json", "the file is empty")):
        assert any(f"{folder / name}: {why}" in line for line in warnings), (name, err)
    assert f"| {FRAMEWORK} | good |" in out and f"| {FRAMEWORK} | inner |" in out


def test_a_folder_without_a_single_run_is_bad_input(capsys, tmp_path):
    folder = tmp_path / "history"
    write(folder / "other.json", {"name": "another tool's output"})
    code, out, err = report_main(capsys, folder, "--plots", tmp_path / "plots")
    assert code == 2 and out == ""
    assert err.splitlines()[-1] == f"error: {folder}: none of its 1 .json files is a benchmark run (each is named above)"


@contextlib.contextmanager
def read_only(folder: Path):
    """A folder no one may write in, root included: root ignores permission bits, not the immutable attribute."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_a_run_in_a_read_only_folder_gets_its_table_and_a_word_on_where_plots_could_go(data, tmp_path):
    run = write(tmp_path / "mounted" / "run.json", data)
    with read_only(run.parent):
        result = run_python("-m", "bench.report", str(run), timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert f"| {FRAMEWORK} |" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith(f"no plots: {run.parent / 'run-plots'} cannot be written (")
    assert "pass --plots DIR to draw them in another folder" in result.stdout
    assert sorted(run.parent.iterdir()) == [run]


def test_the_report_of_the_current_folder_puts_its_plots_beside_it(data, tmp_path):
    folder = tmp_path / "results"
    write(folder / "out.json", data)
    result = run_python("-m", "bench.report", ".", cwd=folder, env={"PYTHONPATH": os.pathsep.join(map(str, (REPO, TESTS)))},
                        timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in folder.iterdir()) == ["out.json"]  # no "-plots" folder
    assert_png(tmp_path / "results-plots" / "out-epochs.png")


# --- Plot files: every one tried before any is drawn --------------------------------------------------------------------
def test_every_plot_file_is_tried_before_the_first_is_drawn(capsys, data, tmp_path):
    runs = write(tmp_path / "a.json", data), write(tmp_path / "b.json", data)
    plots = tmp_path / "plots"
    (plots / "b-epochs.png").mkdir(parents=True)  # a folder stands where the second plot goes
    code, out, err = report_main(capsys, *runs, "--plots", plots)
    assert code == 2 and out == ""
    assert err == f"error: --plots {plots}: {plots / 'b-epochs.png'} cannot be written (a folder stands where the " \
                  "plot goes); choose another folder\n", err
    assert [path.name for path in plots.iterdir()] == ["b-epochs.png"]  # nothing drawn, nothing left behind


def test_a_run_name_too_long_for_a_plot_name_gets_a_shorter_one(capsys, data, tmp_path):
    run = write(tmp_path / ("r" * 250 + ".json"), data)  # 255 bytes: the longest name the file system takes
    code, out, err = report_main(capsys, run, "--plots", tmp_path / "plots")
    assert code == 0, err
    (plot,) = (tmp_path / "plots").iterdir()
    assert len(plot.name) < 128 and plot.name.endswith("-epochs.png")
    assert_png(plot)


# --- What the plots show: 17 rows apart, no legend over data, no empty panel -------------------------------------------
def rows(data: dict, count: int) -> dict:
    many = copy.deepcopy(data)
    many["benchmarks"] = [entry(variant(data, framework=f"row-{index:02d}")) for index in range(count)]
    return many


@pytest.mark.parametrize("count", [10, 17])
def test_legends_cover_no_data_and_every_row_has_its_own_style(data, tmp_path, count):
    runs = load_runs([write(tmp_path / "one.json", rows(data, count)), write(tmp_path / "two.json", rows(data, count))],
                     print)
    plots = report.planned_plots(runs, tmp_path)
    assert [plot.path.name for plot in plots][-1].startswith("history-")
    for plot in plots:
        figure = report.drawn(plot)
        figure.canvas.draw()
        panels = [axes for axes in figure.axes if axes.has_data()]
        legends = figure.legends + [axes.get_legend() for axes in figure.axes if axes.get_legend()]
        (legend,) = legends
        assert len(legend.get_texts()) >= count
        for axes in panels:
            assert not legend.get_window_extent().overlaps(axes.get_window_extent()), (plot.path.name, axes.get_title())
        styles = {(tuple(line.get_color()), line.get_marker()) for line in panels[0].lines}
        assert len(styles) == count


def test_a_run_without_a_yardstick_gets_no_empty_utilization_panel(data, tmp_path):
    old = copy.deepcopy(data)
    del entry(old)["extra_info"]["matmul"]  # a run of the first harness
    (plot,) = report.planned_plots(load_runs([write(tmp_path / "old.json", old)], print), tmp_path)
    assert [axes.get_title() for axes in report.drawn(plot).axes] == ["Time per epoch", "Test accuracy after each epoch"]
