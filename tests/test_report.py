"""The report, on the JSON of a real short benchmark session and on files derived from it.

The real session (the `real_session` fixture) is saved both with --benchmark-json and in pytest-benchmark's autosave
storage; the other runs are edits of it (renamed tests, another device, a slower run, an older harness), and the
malformed inputs are written by hand.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from bench import report
from bench.record import machine_name
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
    assert "matmul yardstick:" in out


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
