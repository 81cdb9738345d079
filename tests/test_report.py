"""The report and the regression gate, on the JSON of a real short benchmark run and on files derived from it.

One real `pytest bench` session (PyTorch, two epochs on 512 images, and an implementation that raises in its first
epoch) is made per test session, saved both with --benchmark-json and in pytest-benchmark's autosave storage; the
other runs are edits of it (renamed tests, another device, a slower or crashed run, an older harness), and the
malformed inputs are written by hand.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench import report
from bench.summary import SELECTED_FRAMEWORKS, mebibytes
from implementations import FRAMEWORKS, missing_packages

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, mnist_dir) -> Path:
    """The JSON of a real, short benchmark session; its autosaved twin is in the `history` folder beside it."""
    if missing_packages(FRAMEWORKS["pytorch"]):
        pytest.skip("PyTorch is not installed")
    folder = tmp_path_factory.mktemp("real-run")
    out = folder / "run.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--frameworks=pytorch,raising", "--preset", "smoke",
         "--train-subset", "512", "--min-accuracy", "0", "--mnist-dir", mnist_dir, "-p", "no:cacheprovider",
         "--framework-module", "raising=faulty_trainers:RaisingTrainer", f"--benchmark-json={out}",
         "--benchmark-autosave", f"--benchmark-storage=file://{folder / 'history'}"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert "1 failed, 1 passed" in result.stdout, result.stdout + result.stderr
    return out


@pytest.fixture
def data(real_run) -> dict:
    return json.loads(real_run.read_text())


def entry(data: dict) -> dict:
    (only,) = data["benchmarks"]
    return only


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def variant(data: dict, **extra_info) -> dict:
    changed = copy.deepcopy(data)
    entry(changed)["extra_info"].update(extra_info)
    return changed


def renamed(data: dict) -> dict:
    """The same framework under another test name and options, as after a refactoring of the suite."""
    changed = variant(data, test_accuracy=entry(data)["extra_info"]["test_accuracy"] - 0.02)
    entry(changed).update(name="test_mnist[torch-eager]", fullname="bench/test_mnist.py::test_mnist[torch-eager]",
                          param="torch-eager", group="renamed group")
    return changed


def on_other_machine(data: dict) -> dict:
    changed = copy.deepcopy(data)
    changed["machine_info"]["cpu"]["brand_raw"] = "Intel Xeon Platinum 8480"
    return changed


def report_main(capsys, *args) -> tuple[int, str, str]:
    code = report.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_png(path: Path) -> None:
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 20_000, (path, len(content))
    with Image.open(path) as image:
        assert image.width >= 800 and image.height >= 400


# --- Tables -----------------------------------------------------------------------------------------------------------
def test_table_shows_every_column_of_a_real_run(capsys, real_run, data, tmp_path):
    code, out, err = report_main(capsys, real_run, "--plots", tmp_path / "plots")
    assert code == 0, err
    info = entry(data)["extra_info"]
    header = next(line for line in out.splitlines() if line.startswith("| framework"))
    for column in ("framework", "version", "device", "median epoch s", "images/s", "test accuracy", "time to target s",
                   "peak memory", "vs fastest"):
        assert column in header
    row = next(line for line in out.splitlines() if line.startswith("| pytorch"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:4] == ["pytorch", info["framework_version"], info["device"], "2"]
    assert cells[6] == f"{info['test_accuracy']:.2%}" and cells[9] == "1.00×"
    assert cells[4] == f"{statistics.median(info['epoch_seconds']):.2f}"
    memory = info["gpu_memory_peak_bytes"] or info["peak_rss_bytes"]
    assert cells[8].startswith(f"{memory / 2**20:,.0f} MiB")
    assert report.machine_name(data["machine_info"]) in out.splitlines()[0]  # the run's heading names the machine


def test_fastest_is_relative_within_a_device_only(capsys, data, tmp_path):
    fast = copy.deepcopy(entry(data))
    fast["extra_info"].update(framework="jax", device="NVIDIA H100", epoch_seconds=[0.1, 0.1])
    both = copy.deepcopy(data)
    both["benchmarks"].append(fast)
    code, out, _ = report_main(capsys, write(tmp_path / "both.json", both), "--plots", tmp_path / "plots")
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith(("| pytorch", "| jax"))]
    assert all(row.rstrip().endswith("| 1.00× |") for row in rows), rows


# --- Plots ------------------------------------------------------------------------------------------------------------
def test_two_runs_give_tables_a_plot_each_and_a_history_plot(capsys, real_run, data, tmp_path):
    second = write(tmp_path / "second.json", variant(data, test_accuracy=0.5))
    code, out, err = report_main(capsys, real_run, second, "--plots", tmp_path / "plots")
    assert code == 0, err
    names = sorted(path.name for path in (tmp_path / "plots").iterdir())
    assert names[0] == "history-" + report.slug(f"{entry(data)['extra_info']['device']} · " +
                                                 report.machine_name(data["machine_info"])) + ".png"
    assert names[1:] == ["run-epochs.png", "second-epochs.png"]
    for name in names:
        assert_png(tmp_path / "plots" / name)
        assert str(tmp_path / "plots" / name) in out
    assert "## History on" in out and "| pytorch | second |" in out


def test_default_plot_folder_is_beside_the_first_run(capsys, data, tmp_path):
    run = write(tmp_path / "results" / "out.json", data)
    code, _, err = report_main(capsys, run)
    assert code == 0, err
    assert_png(tmp_path / "results" / "out-plots" / "out-epochs.png")


def test_plots_of_other_runs_are_never_replaced_without_force(capsys, data, tmp_path):
    plots = tmp_path / "plots"
    first = write(tmp_path / "a" / "run.json", data)
    other = write(tmp_path / "b" / "run.json", variant(data, test_accuracy=0.5))  # another run, the same file name
    assert report_main(capsys, first, "--plots", plots)[0] == 0
    drawn = (plots / "run-epochs.png").read_bytes()
    code, out, err = report_main(capsys, other, "--plots", plots)
    assert code == 2 and out == ""
    assert err.strip() == (f"error: {plots / 'run-epochs.png'} exists and shows other runs: pass --force to replace "
                           "it, or --plots DIR to write elsewhere")
    assert (plots / "run-epochs.png").read_bytes() == drawn
    assert report_main(capsys, first, "--plots", plots)[0] == 0  # the same run: redrawn in place
    assert report_main(capsys, other, "--plots", plots, "--force")[0] == 0
    assert (plots / "run-epochs.png").read_bytes() != drawn
    assert sorted(path.name for path in plots.iterdir()) == ["run-epochs.png"]  # no temporary file left behind


def test_a_growing_history_redraws_its_plot_but_another_history_does_not(capsys, real_run, data, tmp_path):
    plots = tmp_path / "plots"
    second = write(tmp_path / "second.json", variant(data, test_accuracy=0.5))
    third = write(tmp_path / "third.json", variant(data, test_accuracy=0.6))
    assert report_main(capsys, real_run, second, "--plots", plots)[0] == 0
    assert report_main(capsys, real_run, second, third, "--plots", plots)[0] == 0
    code, _, err = report_main(capsys, second, third, "--plots", plots)  # leaves out a run the plot shows
    assert code == 2 and "history-" in err and "exists and shows other runs" in err


def test_a_file_that_is_no_plot_of_ours_is_not_replaced(capsys, real_run, tmp_path):
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "run-epochs.png").write_text("someone's notes")
    assert report_main(capsys, real_run, "--plots", plots)[0] == 2
    assert (plots / "run-epochs.png").read_text() == "someone's notes"


# --- History ----------------------------------------------------------------------------------------------------------
def test_autosaved_history_folder_is_read_in_run_order(capsys, real_run, data, tmp_path):
    (saved,) = (real_run.parent / "history").glob("*/0001_*.json")  # pytest-benchmark's own naming
    history = tmp_path / "history" / saved.parent.name
    history.mkdir(parents=True)
    (history / saved.name).write_bytes(saved.read_bytes())
    later = variant(json.loads(saved.read_text()), test_accuracy=0.5)
    later["datetime"] = "2999-01-01T00:00:00+00:00"
    write(history / saved.name.replace("0001_", "0002_"), later)
    code, out, err = report_main(capsys, tmp_path / "history", "--plots", tmp_path / "plots")
    assert code == 0, err
    commit = data["commit_info"]["id"][:7]
    rows = [line for line in out.splitlines() if line.startswith("| pytorch |")]
    assert [row.split("|")[2].strip() for row in rows[-2:]] == [f"0001_{commit}", f"0002_{commit}"]
    assert "50.00%" in rows[-1]


def test_history_matches_frameworks_across_renamed_tests(capsys, real_run, data, tmp_path):
    code, out, err = report_main(capsys, real_run, write(tmp_path / "renamed.json", renamed(data)),
                                 "--plots", tmp_path / "plots")
    assert code == 0, err
    history = out.split("## History on")[1]
    rows = [line for line in history.splitlines() if line.startswith("| pytorch |")]
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


def test_older_harness_without_extra_info_still_reports_its_timing(capsys, data, tmp_path):
    old = copy.deepcopy(data)
    del entry(old)["extra_info"]
    code, out, err = report_main(capsys, write(tmp_path / "old.json", old), "--plots", tmp_path / "plots")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("| pytorch"))  # named after the test's param
    assert f"| {entry(data)['stats']['median']:.2f} |" in row and "| – |" in row
    assert "note: pytorch: no framework in its extra_info" in out


# --- The gate ---------------------------------------------------------------------------------------------------------
def gate(capsys, baseline: Path, new: Path, *options) -> tuple[int, str, str]:
    return report_main(capsys, "gate", "--baseline", baseline, new, *options)


def test_gate_passes_an_unchanged_run(capsys, real_run):
    code, out, _ = gate(capsys, real_run, real_run)
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["ok", "ok", "ok", "gate:"]
    assert out.splitlines()[-1].startswith("gate: passed")


@pytest.mark.parametrize("metric", ["accuracy", "time", "memory"])
def test_gate_fails_a_regression_naming_framework_metric_and_both_values(capsys, real_run, data, tmp_path, metric):
    old = entry(data)["extra_info"]
    if metric == "accuracy":
        change = {"test_accuracy": old["test_accuracy"] - 0.05}
        expected = (f"REGRESSION pytorch test accuracy: baseline {old['test_accuracy']:.2%}, "
                    f"new {change['test_accuracy']:.2%} (-5.00 points; allowed -1.00)")
    elif metric == "time":
        change = {"epoch_seconds": [2 * s for s in old["epoch_seconds"]]}
        median = report.median_epoch_seconds(old)
        expected = (f"REGRESSION pytorch median epoch time: baseline {median:.2f} s, new {2 * median:.2f} s "
                    "(+100%; allowed +50%)")
    else:
        memory, kind = report.peak_memory_bytes(old)
        change = {"gpu_memory_peak_bytes" if kind == "GPU" else "peak_rss_bytes": 2 * memory}
        expected = (f"REGRESSION pytorch peak {kind} memory: baseline {mebibytes(memory)}, new {mebibytes(2 * memory)} "
                    "(+100%; allowed +25%)")
    code, out, _ = gate(capsys, real_run, write(tmp_path / "worse.json", variant(data, **change)))
    assert code == 1
    assert [line for line in out.splitlines() if line.startswith("REGRESSION")] == [expected]
    assert out.splitlines()[-1].startswith("gate: FAILED, 1 regression(s)")


def test_gate_tolerances_are_options(capsys, real_run, data, tmp_path):
    slower = variant(data, epoch_seconds=[1.3 * s for s in entry(data)["extra_info"]["epoch_seconds"]])
    slower_file = write(tmp_path / "slower.json", slower)
    assert gate(capsys, real_run, slower_file)[0] == 0
    assert gate(capsys, real_run, slower_file, "--max-time-increase", "0.2")[0] == 1


def test_gate_matches_by_framework_not_by_test_name(capsys, real_run, data, tmp_path):
    code, out, _ = gate(capsys, real_run, write(tmp_path / "renamed.json", renamed(data)))
    assert code == 1 and "REGRESSION pytorch test accuracy" in out and "(-2.00 points; allowed -1.00)" in out


def test_gate_fails_a_framework_missing_from_the_new_run_and_notes_a_new_one(capsys, real_run, data, tmp_path):
    swapped = variant(data, framework="jax")
    code, out, _ = gate(capsys, real_run, write(tmp_path / "jax-only.json", swapped))
    assert code == 1
    assert ("REGRESSION pytorch: in the baseline, missing from the new run (it crashed, failed in its timed epochs, "
            "or was skipped as not installed)") in out
    assert "note: jax: new, not in the baseline (record a new baseline to gate it)" in out


def test_gate_notes_a_baseline_framework_the_new_run_did_not_select(capsys, real_run, data, tmp_path):
    assert data[SELECTED_FRAMEWORKS] == ["pytorch", "raising"]  # recorded by the real session
    baseline = copy.deepcopy(data)
    baseline["benchmarks"].append(entry(variant(data, framework="jax")))
    baseline = write(tmp_path / "baseline.json", baseline)
    code, out, _ = gate(capsys, baseline, real_run)
    assert code == 0 and "note: jax: in the baseline, not selected in the new run (--frameworks), not checked" in out
    unrecorded = {key: value for key, value in data.items() if key != SELECTED_FRAMEWORKS}  # an older harness's file
    code, out, _ = gate(capsys, baseline, write(tmp_path / "old.json", unrecorded))
    assert code == 1 and "REGRESSION jax: in the baseline, missing from the new run" in out


def test_a_framework_that_failed_in_its_timed_epochs_is_left_out_and_fails_the_gate(capsys, data, real_run, tmp_path):
    # pytest-benchmark leaves out the entry of a test that failed inside benchmark.pedantic
    assert [benchmark["extra_info"]["framework"] for benchmark in data["benchmarks"]] == ["pytorch"]
    baseline = copy.deepcopy(data)
    baseline["benchmarks"].append(entry(variant(data, framework="raising")))
    code, out, _ = gate(capsys, write(tmp_path / "baseline.json", baseline), real_run)
    assert code == 1 and "REGRESSION raising: in the baseline, missing from the new run" in out


def test_gate_fails_a_run_that_crashed_after_its_timed_epochs(capsys, real_run, data, tmp_path):
    crashed = copy.deepcopy(data)
    entry(crashed)["extra_info"] = {}  # what pytest-benchmark keeps when record() fails after the timed rounds
    code, out, _ = gate(capsys, real_run, write(tmp_path / "crashed.json", crashed))
    assert code == 1
    assert (f"REGRESSION pytorch test accuracy: baseline {entry(data)['extra_info']['test_accuracy']:.2%}, new none "
            "(the run failed before evaluating)") in out


def test_gate_refuses_a_baseline_from_another_device(capsys, real_run, data, tmp_path):
    other = write(tmp_path / "xeon.json", on_other_machine(data))
    code, out, err = gate(capsys, other, real_run)
    assert code == 2 and out == ""
    assert f"its baseline on {entry(data)['extra_info']['device']} · Intel Xeon Platinum 8480" in err
    assert "--allow-device-change" in err and len(err.strip().splitlines()) == 1
    code, out, _ = gate(capsys, other, real_run, "--allow-device-change")
    assert code == 0 and "epoch time and memory not compared" in out


def test_gate_cli_exit_codes_for_ci(real_run, data, tmp_path):
    worse = write(tmp_path / "worse.json", variant(data, test_accuracy=0.1))
    command = [sys.executable, "-m", "bench.report", "gate", "--baseline", str(real_run)]
    runs = {name: subprocess.run([*command, str(new)], cwd=REPO, capture_output=True, text=True)
            for name, new in {"same": real_run, "worse": worse, "missing": tmp_path / "missing.json"}.items()}
    assert [runs[name].returncode for name in ("same", "worse", "missing")] == [0, 1, 2]
    assert "Traceback" not in runs["missing"].stderr and "no such file" in runs["missing"].stderr


# --- Malformed inputs -------------------------------------------------------------------------------------------------
MALFORMED = {
    "empty.json": (b"", "the file is empty"),
    "truncated.json": (None, "invalid JSON ("),  # the real run, cut in the middle
    "list.json": (b"[1, 2]", "not pytest-benchmark JSON (no 'benchmarks' list)"),
    "other.json": (b'{"name": "something else"}', "not pytest-benchmark JSON (no 'benchmarks' list)"),
    "record.json": (b'{"framework": "pytorch", "epochs": 2}', "a `python -m bench run --output` record"),
    "binary.json": (bytes(range(256)), "not a text file"),
    "no-stats.json": (b'{"benchmarks": [{"name": "test_train[pytorch]"}]}', "benchmark 1 has no 'stats' object"),
    "bad-field.json": (b'{"benchmarks": [{"stats": {"median": 1.0}, "extra_info": {"framework": "jax", '
                       b'"test_accuracy": "high"}}]}', "(jax): extra_info 'test_accuracy' is 'high', not a number"),
    "bad-list.json": (b'{"benchmarks": [{"stats": {}, "extra_info": {"epoch_seconds": [1, null]}}]}',
                      "extra_info 'epoch_seconds' is not a list of numbers"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_input_is_one_clear_line_and_writes_nothing(capsys, real_run, tmp_path, name):
    content, message = MALFORMED[name]
    if content is None:
        text = real_run.read_text()
        content = text[: text.index('"extra_info"') + 30].encode()
    bad = tmp_path / name
    bad.write_bytes(content)
    plots = tmp_path / "plots"
    for args in ([real_run, bad, "--plots", plots], ["gate", "--baseline", real_run, bad],
                 ["gate", "--baseline", bad, real_run]):
        code, out, err = report_main(capsys, *args)
        assert code == 2 and out == "", (args, out)
        assert err.startswith(f"error: {bad}") and message in err and err.count("\n") == 1, err
    assert not plots.exists()


def test_missing_files_and_empty_folders_are_clear_errors(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = report_main(capsys, tmp_path / "empty")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'empty'}: no .json files in this folder"
    code, _, err = report_main(capsys, tmp_path / "gone.json")
    assert code == 2 and "gone.json: no such file (pytest-benchmark writes no JSON when no benchmark finished" in err


def test_a_run_without_benchmarks_is_reported_and_fails_the_gate(capsys, real_run, data, tmp_path):
    nothing = copy.deepcopy(data)
    nothing["benchmarks"] = []
    empty_run = write(tmp_path / "nothing.json", nothing)
    code, out, _ = report_main(capsys, empty_run, "--plots", tmp_path / "plots")
    assert code == 0 and "note: no benchmark entries" in out
    assert gate(capsys, real_run, empty_run)[0] == 1


def test_two_entries_for_one_framework_cannot_be_matched(capsys, real_run, data, tmp_path):
    doubled = copy.deepcopy(data)
    doubled["benchmarks"].append(copy.deepcopy(entry(data)))
    code, _, err = gate(capsys, real_run, write(tmp_path / "doubled.json", doubled))
    assert code == 2 and "two entries for pytorch" in err


def test_negative_tolerances_are_refused(capsys, real_run):
    code, _, err = gate(capsys, real_run, real_run, "--max-time-increase", "-0.1")
    assert code == 2 and "tolerances are fractions of at least 0" in err


def test_the_committed_baseline_is_a_readable_smoke_run():
    baseline = report.load_run(REPO / "results" / "baseline-smoke-cpu.json")
    assert baseline.by_framework() and all(record["config"]["train_subset"] == 4096 for record in baseline.records)
    assert os.path.getsize(REPO / "results" / "baseline-smoke-cpu.json") < 200_000
