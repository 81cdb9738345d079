"""The regression gate, on the real session's JSON, on the committed baseline, and on files derived from them."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gate
from bench.generated_history import Planted, write_history
from bench.record import SELECTED_FRAMEWORKS, RunRecord, load_run_file
from bench.summary import mebibytes
from commands import QUICK, REPO, run_python
from implementations import contract
from runfiles import FRAMEWORK, entry, on_other_machine, renamed, variant, write

# The baseline that `make test` gates against (bench/smoke-gate.sh), and those it gated against before: all are data.
BASELINE = REPO / re.search(r"results/baseline-[\w.-]+\.json", (REPO / "bench" / "smoke-gate.sh").read_text()).group()
EARLIER_BASELINES = [REPO / "results" / "baseline-smoke-cpu.json", REPO / "results" / "baseline-smoke-cpu-epyc.json"]


@pytest.fixture
def real_run(real_session) -> Path:
    return real_session.json_path


@pytest.fixture
def data(real_run) -> dict:
    return json.loads(real_run.read_text())


def run_gate(capsys, baseline: Path | None, new: Path, *options) -> tuple[int, str, str]:
    code = gate.main([str(arg) for arg in (*(("--baseline", baseline) if baseline else ()), new, *options)])
    out, err = capsys.readouterr()
    return code, out, err


def regressions(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("REGRESSION")]


def test_gate_passes_an_unchanged_run(capsys, real_run):
    code, out, _ = run_gate(capsys, real_run, real_run)
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["ok", "ok", "ok", "gate:"]
    assert out.splitlines()[-1].startswith("gate: passed")


@pytest.mark.parametrize("metric", ["accuracy", "time", "memory"])
def test_gate_fails_a_regression_naming_framework_metric_and_both_values(capsys, real_run, data, tmp_path, metric):
    old = RunRecord.from_json(entry(data)["extra_info"], "real run")
    if metric == "accuracy":
        change = {"test_accuracy": old.test_accuracy - 0.05}
        expected = (f"REGRESSION {FRAMEWORK} test accuracy: baseline {old.test_accuracy:.2%}, "
                    f"new {change['test_accuracy']:.2%} (-5.00 points; allowed -1.00)")
    elif metric == "time":
        change = {"epoch_seconds": [2 * s for s in old.epoch_seconds]}
        rate = f"{old.matmul.flops_per_second / 1e9:,.0f} GFLOP/s"
        expected = (f"REGRESSION {FRAMEWORK} median epoch time relative to the machine's matmul speed: baseline "
                    f"{old.median_epoch_seconds:.2f} s at {rate}, new {2 * old.median_epoch_seconds:.2f} s at {rate} "
                    "(+100%; allowed +35%)")
    else:
        memory, kind = old.peak_memory
        change = {"gpu_memory_peak_bytes" if kind == "GPU" else "peak_rss_bytes": 2 * memory}
        expected = (f"REGRESSION {FRAMEWORK} peak {kind} memory: baseline {mebibytes(memory)}, new "
                    f"{mebibytes(2 * memory)} (+100%; allowed +25%)")
    code, out, _ = run_gate(capsys, real_run, write(tmp_path / "worse.json", variant(data, **change)))
    assert code == 1
    assert regressions(out) == [expected]
    assert out.splitlines()[-1].startswith("gate: FAILED, 1 regression(s)")


# --- Time relative to the machine: the committed baseline from a slower machine, and a slower framework ---------------
def scaled(data: dict, time_factor: float, matmul_factor: float, frameworks=None) -> dict:
    """The run as a machine `1/time_factor` as fast would record it (times x time_factor, matmul rate x matmul_factor),
    for the given frameworks (default: all)."""
    changed = copy.deepcopy(data)
    for benchmark in changed["benchmarks"]:
        info = benchmark["extra_info"]
        if frameworks is None or info["framework"] in frameworks:
            for key in ("epoch_seconds", "worker_epoch_seconds"):
                info[key] = [time_factor * s for s in info[key]]
            benchmark["stats"]["data"] = [time_factor * s for s in benchmark["stats"]["data"]]
            info["matmul"]["flops_per_second"] *= matmul_factor
    return changed


def test_the_committed_baseline_is_a_readable_smoke_run_of_every_framework():
    baseline = load_run_file(BASELINE)
    records = baseline.by_framework()
    assert set(records) >= {"pytorch", "lightning", "tensorflow", "jax"}
    assert all(r.config["train_subset"] == contract.PRESETS["smoke"].train_subset and r.matmul is not None
               for r in records.values())
    assert BASELINE.stat().st_size < 300_000


def test_a_uniformly_twice_slower_machine_passes_the_committed_baseline(capsys, tmp_path):
    baseline = json.loads(BASELINE.read_text())
    slower = write(tmp_path / "slower-machine.json", scaled(baseline, 2.0, 0.5))
    code, out, _ = run_gate(capsys, BASELINE, slower)
    assert code == 0 and not regressions(out), out
    code, out, _ = run_gate(capsys, BASELINE, slower, "--absolute-time")  # what the seconds alone would have said
    assert code == 1 and len(regressions(out)) == len(baseline["benchmarks"]), out


def test_one_framework_alone_half_as_slow_again_fails_on_the_committed_baseline(capsys, tmp_path):
    baseline = json.loads(BASELINE.read_text())
    slower = scaled(scaled(baseline, 2.0, 0.5), 1.5, 1.0, frameworks={"jax"})
    code, out, _ = run_gate(capsys, BASELINE, write(tmp_path / "jax-slower.json", slower))
    assert code == 1
    (line,) = regressions(out)
    assert line.startswith("REGRESSION jax median epoch time relative to the machine's matmul speed") and "+50%" in line


def test_a_baseline_without_a_yardstick_is_compared_in_seconds_only_when_asked(capsys, real_run, data, tmp_path):
    old = copy.deepcopy(data)
    del entry(old)["extra_info"]["matmul"]
    old = write(tmp_path / "old.json", old)
    code, out, _ = run_gate(capsys, old, real_run)
    assert code == 0 and "the baseline has no matmul yardstick" in out and "--absolute-time" in out
    code, out, _ = run_gate(capsys, old, real_run, "--absolute-time")
    assert code == 0 and f"ok {FRAMEWORK} median epoch time: baseline" in out


# --- Matching ---------------------------------------------------------------------------------------------------------
def test_gate_tolerances_are_options(capsys, real_run, data, tmp_path):
    slower = variant(data, epoch_seconds=[1.3 * s for s in entry(data)["extra_info"]["epoch_seconds"]])
    slower_file = write(tmp_path / "slower.json", slower)
    assert run_gate(capsys, real_run, slower_file)[0] == 0
    assert run_gate(capsys, real_run, slower_file, "--max-time-increase", "0.2")[0] == 1


def test_an_option_that_a_baseline_predates_counts_at_its_default(capsys, real_run, data, tmp_path):
    """A baseline recorded before an option existed ran with the option's default: no configuration note for it; a
    real change of an option is still noted."""
    config = entry(data)["extra_info"]["config"]
    older = write(tmp_path / "older.json", variant(data, config={k: v for k, v in config.items() if k != "replicas"}))
    code, out, _ = run_gate(capsys, older, real_run)
    assert code == 0 and "run configuration differs" not in out, out
    reseeded = write(tmp_path / "reseeded.json", variant(data, config={**config, "seed": 1}))
    code, out, _ = run_gate(capsys, older, reseeded)
    assert f"note: {FRAMEWORK}: run configuration differs from the baseline (seed 0 → 1)" in out, out


def test_a_model_with_another_parameter_count_is_noted(capsys, real_run, data, tmp_path):
    other = write(tmp_path / "other-model.json", variant(data, trainable_parameters=11_175_380))
    code, out, _ = run_gate(capsys, real_run, other)
    assert code == 0 and (f"note: {FRAMEWORK}: 11,175,380 trainable parameters, 11,175,370 in the reference: another "
                          "model") in out, out


def test_gate_matches_by_framework_not_by_test_name(capsys, real_run, data, tmp_path):
    code, out, _ = run_gate(capsys, real_run, write(tmp_path / "renamed.json", renamed(data)))
    assert code == 1 and f"REGRESSION {FRAMEWORK} test accuracy" in out and "(-2.00 points; allowed -1.00)" in out


def test_gate_fails_a_framework_missing_from_the_new_run_and_notes_a_new_one(capsys, real_run, data, tmp_path):
    swapped = variant(data, framework="jax")
    code, out, _ = run_gate(capsys, real_run, write(tmp_path / "jax-only.json", swapped))
    assert code == 1
    assert (f"REGRESSION {FRAMEWORK}: in the baseline, missing from the new run (it crashed, failed in its timed "
            "epochs, or was skipped as not installed)") in out
    assert "note: jax: new, not in the baseline (record a new baseline to gate it)" in out


def test_gate_notes_a_run_of_the_same_options_that_trained_on_other_batches(capsys, real_run, data, tmp_path):
    reordered = variant(data, epoch_label_digests=["0" * 16, "1" * 16])
    code, out, _ = run_gate(capsys, real_run, write(tmp_path / "reordered.json", reordered))
    assert code == 0 and f"note: {FRAMEWORK}: the first epoch trained on other batches than in the reference" in out


def test_gate_notes_a_baseline_framework_the_new_run_did_not_select(capsys, real_run, data, tmp_path):
    assert data[SELECTED_FRAMEWORKS] == ["raising", "selfkill", FRAMEWORK]  # recorded by the real session
    baseline = copy.deepcopy(data)
    baseline["benchmarks"].append(entry(variant(data, framework="jax")))
    baseline = write(tmp_path / "baseline.json", baseline)
    code, out, _ = run_gate(capsys, baseline, real_run)
    assert code == 0 and "note: jax: in the baseline, not selected in the new run (--frameworks), not checked" in out
    unrecorded = {key: value for key, value in data.items() if key != SELECTED_FRAMEWORKS}  # an older harness's file
    code, out, _ = run_gate(capsys, baseline, write(tmp_path / "old.json", unrecorded))
    assert code == 1 and "REGRESSION jax: in the baseline, missing from the new run" in out


def test_a_framework_that_failed_in_its_timed_epochs_is_left_out_and_fails_the_gate(capsys, data, real_run, tmp_path):
    # pytest-benchmark leaves out the entry of a test that failed inside benchmark.pedantic
    assert [benchmark["extra_info"]["framework"] for benchmark in data["benchmarks"]] == [FRAMEWORK]
    baseline = copy.deepcopy(data)
    baseline["benchmarks"].append(entry(variant(data, framework="raising")))
    code, out, _ = run_gate(capsys, write(tmp_path / "baseline.json", baseline), real_run)
    assert code == 1 and "REGRESSION raising: in the baseline, missing from the new run" in out


def test_gate_fails_a_run_that_crashed_after_its_timed_epochs(capsys, real_run, data, tmp_path):
    crashed = copy.deepcopy(data)
    entry(crashed)["extra_info"] = {}  # what pytest-benchmark keeps when record() fails after the timed rounds
    code, out, _ = run_gate(capsys, real_run, write(tmp_path / "crashed.json", crashed))
    assert code == 1
    assert (f"REGRESSION {FRAMEWORK} test accuracy: baseline {entry(data)['extra_info']['test_accuracy']:.2%}, new "
            "none (the run failed before evaluating)") in out


def test_gate_refuses_a_baseline_from_another_device(capsys, real_run, data, tmp_path):
    other = write(tmp_path / "xeon.json", on_other_machine(data))
    code, out, err = run_gate(capsys, other, real_run)
    assert code == 2 and out == ""
    assert f"its baseline on {entry(data)['extra_info']['device']} · Intel Xeon Platinum 8480" in err
    assert "--allow-device-change" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_gate(capsys, other, real_run, "--allow-device-change")
    assert code == 0 and "epoch time and memory not compared" in out


def test_a_run_without_benchmarks_fails_the_gate(capsys, real_run, data, tmp_path):
    nothing = copy.deepcopy(data)
    nothing["benchmarks"] = []
    assert run_gate(capsys, real_run, write(tmp_path / "nothing.json", nothing))[0] == 1


def test_two_entries_for_one_framework_cannot_be_matched(capsys, real_run, data, tmp_path):
    doubled = copy.deepcopy(data)
    doubled["benchmarks"].append(copy.deepcopy(entry(data)))
    code, _, err = run_gate(capsys, real_run, write(tmp_path / "doubled.json", doubled))
    assert code == 2 and f"two entries for {FRAMEWORK}" in err


# --- Bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["baseline", "new"])
def test_values_that_cannot_be_true_are_refused_on_either_side(capsys, real_run, data, tmp_path, side):
    bad = write(tmp_path / "nan.json", variant(data, test_accuracy=float("nan")))
    code, out, err = run_gate(capsys, *((bad, real_run) if side == "baseline" else (real_run, bad)))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {bad}: benchmark 1 ({FRAMEWORK}): test_accuracy is nan"), err


@pytest.mark.parametrize("value", ["-0.1", "nan", "inf", "many"])
def test_tolerances_must_be_finite_and_not_negative(real_run, value):
    result = run_python("-m", "bench.gate", "--baseline", str(real_run), str(real_run), "--max-time-increase", value,
                        timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"argument --max-time-increase: a finite fraction of at least 0, got {value!r}" in result.stderr


def test_gate_cli_exit_codes_for_ci(real_run, data, tmp_path):
    worse = write(tmp_path / "worse.json", variant(data, test_accuracy=0.1))
    runs = {name: run_python("-m", "bench.gate", "--baseline", str(real_run), str(new), timeout=60)
            for name, new in {"same": real_run, "worse": worse, "missing": tmp_path / "missing.json"}.items()}
    assert [runs[name].returncode for name in ("same", "worse", "missing")] == [0, 1, 2]
    assert "Traceback" not in runs["missing"].stderr and "no such file" in runs["missing"].stderr


# --- What cannot be compared is bad input, never a pass --------------------------------------------------------------
def foreign_or_empty(data: dict, case: str) -> dict:
    if case == "no entries":
        return {"benchmarks": []}
    if case == "another project's file":
        return {"machine_info": data["machine_info"], "commit_info": data["commit_info"],
                "benchmarks": [{"name": "test_parse", "fullname": "tests/test_speed.py::test_parse",
                                "stats": {"median": 0.1, "data": [0.1, 0.1]}, "extra_info": {}}]}
    crashed = copy.deepcopy(data)
    entry(crashed)["extra_info"] = {}
    return crashed


@pytest.mark.parametrize("case, missing", [
    ("no entries", "no benchmark entries, so nothing to compare with"),
    ("another project's file", "no run record in the extra_info of test_parse (another project's pytest-benchmark "
                               "file, or a run whose record failed)"),
    ("entries without a record", f"no run record in the extra_info of {FRAMEWORK} ")])
def test_a_baseline_without_records_of_this_project_is_bad_input(real_run, data, tmp_path, case, missing):
    baseline = write(tmp_path / "baseline.json", foreign_or_empty(data, case))
    result = run_python("-m", "bench.gate", "--baseline", str(baseline), str(real_run), timeout=60)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.startswith(f"error: {baseline}: {missing}") and result.stderr.count("\n") == 1, result.stderr


def test_a_gate_that_compared_nothing_is_bad_input_not_a_pass(capsys, real_run, data, tmp_path):
    """The baseline's only framework was not selected, the new run's only one is new: nothing is compared."""
    baseline = write(tmp_path / "jax-baseline.json", variant(data, framework="jax"))
    code, out, err = run_gate(capsys, baseline, real_run)
    assert code == 2 and out == "" and "passed" not in err
    assert err.startswith(f"error: {real_run}: nothing was compared (none of its frameworks is in {baseline} for this "
                          "machine, and none of those was selected): not a pass"), err


def test_a_new_run_that_selected_no_framework_is_bad_input(capsys, real_run, data, tmp_path):
    nothing = {**data, "benchmarks": [], SELECTED_FRAMEWORKS: []}
    new = write(tmp_path / "nothing-selected.json", nothing)
    code, out, err = run_gate(capsys, real_run, new)
    assert code == 2 and out == ""
    assert err == f"error: {new}: the session selected no framework, so there is nothing to gate; run `pytest bench` " \
                  "with at least one framework\n"


def test_a_denormal_epoch_time_is_bad_input_not_a_faster_run(capsys, real_run, data, tmp_path):
    absurd = write(tmp_path / "absurd.json", variant(data, epoch_seconds=[5e-324, 5e-324]))  # inf images/s
    code, out, err = run_gate(capsys, real_run, absurd)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {absurd}: benchmark 1 ({FRAMEWORK}): epoch_seconds is [5e-324, 5e-324], not a list "
                          "of positive finite seconds"), err


# --- Against a history of runs ------------------------------------------------------------------------------------------
HISTORY_FRAMEWORKS = ["alpha", "beta", "gamma"]


def history_and_new_run(real_run: Path, tmp_path: Path, planted=()) -> tuple[Path, Path]:
    """Ten commits of the real record, the changes planted from commit 10 on; the run of commit 10 is the new run."""
    folder = tmp_path / "history"
    write_history(real_run, folder, 11, frameworks=HISTORY_FRAMEWORKS, planted=list(planted), seed=1)
    newest = sorted(folder.rglob("*.json"))[-1]
    return folder, newest.rename(tmp_path / "new.json")


@pytest.mark.parametrize("machine", ["the same", "uniformly 1.3x slower"])
def test_a_run_inside_the_noise_of_its_history_passes(capsys, real_run, tmp_path, machine):
    slower = [Planted(10, None, time=1.3, matmul=1 / 1.3)] if machine != "the same" else []
    folder, new = history_and_new_run(real_run, tmp_path, slower)
    code, out, _ = run_gate(capsys, None, new, "--history", folder)
    assert code == 0, out
    checks = out.splitlines()[:-1]
    assert len(checks) == 3 * 3 and all(line.startswith("ok ") and " against the history: " in line for line in checks)
    assert out.splitlines()[-1] == f"gate: passed, {new} is within tolerance of the history {folder}"


def test_a_framework_half_as_slow_again_fails_against_its_history(capsys, real_run, tmp_path):
    folder, new = history_and_new_run(real_run, tmp_path, [Planted(10, "beta", time=1.5)])
    code, out, _ = run_gate(capsys, None, new, "--history", folder)
    assert code == 1
    (line,) = regressions(out)
    assert line.startswith("REGRESSION beta epoch time against the history: new ") and "of the last 10 runs" in line
    assert re.search(r"\(\+[45]\d\.\d%, p = ", line), line


def test_frameworks_without_a_history_on_this_machine_are_gated_against_the_baseline(capsys, real_run, tmp_path):
    folder = tmp_path / "history"
    write_history(real_run, folder, 4)
    for path in folder.rglob("*.json"):  # the history was recorded elsewhere
        write(path, on_other_machine(json.loads(path.read_text())))
    code, out, _ = run_gate(capsys, real_run, real_run, "--history", folder)
    assert code == 0 and "against the history" not in out
    assert f"ok {FRAMEWORK} test accuracy: baseline" in out
    code, out, err = run_gate(capsys, None, real_run, "--history", folder)
    assert code == 2 and "nothing was compared" in err


def quick(data: dict) -> dict:
    """The real record as a run of QUICK's configuration would hold it: one epoch of 256 images."""
    info = entry(data)["extra_info"]
    per_epoch = {key: info[key][:1] for key in ("epoch_seconds", "worker_epoch_seconds", "epoch_train_loss",
                                                 "epoch_test_accuracy", "epoch_label_digests")}
    return variant(data, config={**info["config"], "epochs": 1, "train_subset": 256, "min_accuracy": 0.0}, epochs=1,
                   **per_epoch)


def test_the_smoke_gate_uses_the_committed_history_where_it_holds_runs_of_this_machine(data, mnist_dir, tmp_path):
    """bench/smoke-gate.sh, as `make test` runs it (a QUICK run of the PyTorch page), with a history of this machine
    and configuration: each framework is gated against the history, whatever the verdict of its noise."""
    folder = tmp_path / "history"
    write_history(write(tmp_path / "quick.json", quick(data)), folder, 4)
    environment = {"SMOKE_JSON": str(tmp_path / "smoke.json"), "HISTORY": str(folder),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["sh", "bench/smoke-gate.sh", *QUICK[2:], "--mnist-dir", mnist_dir, "-p", "no:cacheprovider",
         f"--frameworks={FRAMEWORK}", "--framework-module", f"{FRAMEWORK}=implementations.pytorch.trainer:TorchTrainer"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **environment})
    checks = [re.sub(r"^(ok|REGRESSION) ", "", line).split(" against ")[0] for line in result.stdout.splitlines()
              if line.startswith(("ok ", "REGRESSION "))]
    assert checks == [f"{FRAMEWORK} epoch time", f"{FRAMEWORK} accuracy", f"{FRAMEWORK} resident memory"], result.stdout
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr  # the verdict is the noise's


# --- The docs say what the committed baseline holds ----------------------------------------------------------------------
DOCS = [REPO / "README.md", *sorted(REPO.glob("*/README.md")), *sorted(REPO.glob(".github/workflows/*.yml"))]
CPU = re.compile(r"(\d+)-core (AMD EPYC|Intel Xeon|Intel Core|AMD Ryzen|Apple M\d|Graviton\d?)")
COMMIT = re.compile(r"\bcommit ([0-9a-f]{7,40})\b")


def statements(text: str) -> list[str]:
    """Paragraphs, and each row of a table on its own."""
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.splitlines()
        found += lines if lines and all(line.lstrip().startswith("|") for line in lines) else [paragraph]
    return found


CURRENT_DOCS = {REPO / "README.md", REPO / "results" / "README.md", REPO / ".github" / "workflows" / "benchmark.yml"}


@pytest.mark.parametrize("baseline, described", [(BASELINE, CURRENT_DOCS),
                                                 *[(earlier, {REPO / "results" / "README.md"})
                                                   for earlier in EARLIER_BASELINES]],
                         ids=["current", "earlier-xeon", "earlier-epyc"])
def test_the_docs_describe_the_machine_and_commit_of_the_committed_baseline(baseline, described):
    data = json.loads(baseline.read_text())
    brand, cores, commit = data["machine_info"]["cpu"]["brand_raw"], data["machine_info"]["cpu"]["count"], \
        data["commit_info"]["id"]
    checked = []
    for doc in DOCS:
        for statement in statements(doc.read_text()):
            if baseline.name not in statement:
                continue
            for count, name in CPU.findall(" ".join(statement.split())):
                assert all(word in brand for word in name.split()) and int(count) == cores, \
                    f"{doc.relative_to(REPO)} says {baseline.name} ran on a {count}-core {name}; its machine_info " \
                    f"says {brand!r}, {cores} cores: {statement!r}"
                checked.append(doc)
            for mentioned in COMMIT.findall(statement):
                assert commit.startswith(mentioned), f"{doc.relative_to(REPO)}: commit {mentioned}, not {commit}"
    assert described <= set(checked), f"no machine named for {baseline.name} in {described - set(checked)}"
