"""The harness under hostile input and signals: bad options refused before any worker starts, nothing measured lost
to an output that cannot be written, no interrupted session saved as complete, no worker outliving the benchmark.

Real commands in real processes: real signals, a real full disk (a small tmpfs, where this machine lets a test mount
one), the real PyTorch page and a trainer that hangs (tests/faulty_trainers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import options
from bench.record import load_run_file
from bench.worker import SHUTDOWN_GRACE_S
from commands import QUICK, REPO, TESTS, run_python, run_python_side_by_side
from implementations import contract

MINE = "mine=implementations.pytorch.trainer:TorchTrainer"
HANG = "hang=faulty_trainers:HangingTrainer"


# --- Options: refused in one line naming the option, before any worker starts, no folder created --------------------
BAD_OPTIONS = {  # options -> what the one line says, from `bench run` and from `pytest bench` alike
    ("--seed", "-1"): "--seed must be an integer from 0 to 4,294,967,295, got -1",
    ("--batch-size", "1"): "--batch-size must be an integer of at least 2 (BatchNorm trains on batch statistics",
    ("--test-subset", "1500"): "--test-subset must be a positive multiple of 1000",
    ("--replicas", "0"): "--replicas must be an integer from 1 to 64, got 0",
    ("--replicas", "3"): "--batch-size 128 does not split into --replicas 3 equal shards",
    ("--epochs", "1000000000"): "--epochs must be an integer from 1 to 1,000, got 1000000000",
    ("--worker-timeout", "nan"): "argument --worker-timeout: seconds from 1 to 604800 (a week), got 'nan'",
    ("--worker-timeout", "1e-9"): "argument --worker-timeout: seconds from 1 to 604800 (a week), got '1e-9'",
    # Checked against the data's size, still before any worker: MNIST is read once, in the benchmark process.
    ("--train-subset", "70000"): "--train-subset 70000 is larger than the 60000 training images",
    ("--test-subset", "20000"): "--test-subset 20000 is larger than the 10000 test images",
    ("--batch-size", "100000"): "--batch-size 100000 is larger than the 60000 training images",
    ("--epochs", "2", "--epochs", "3"): "--epochs is given 2 times (--epochs, --epochs); give it once",
    ("--framework-module", "pytorch=faulty_trainers:RaisingTrainer"):
        "pytorch is a registered framework; give your implementation a name of its own",
    # No NVIDIA driver here: what is missing is said up front, for every framework alike.
    ("--device", "cuda"): "--device cuda: this machine has no NVIDIA driver",
}


@pytest.mark.parametrize("option", BAD_OPTIONS, ids=" ".join)
def test_bad_run_options_are_refused_before_anything_runs(option, mnist_dir, tmp_path):
    if option[:2] == ("--device", "cuda") and os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has an NVIDIA driver")
    output = tmp_path / "new" / "out.json"
    ran, session = run_python_side_by_side(
        ("-m", "bench", "run", "pytorch", *option, "--mnist-dir", mnist_dir, "--output", str(output)),
        ("-m", "pytest", "bench", "--frameworks=pytorch", *option, "--mnist-dir", mnist_dir, "-p", "no:cacheprovider",
         f"--benchmark-json={output}"), timeout=120)
    for result, code in ((ran, 2), (session, 4)):
        assert result.returncode == code, result.stdout + result.stderr
        assert BAD_OPTIONS[option] in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert "warming up" not in result.stdout + result.stderr, "a worker started"
    assert not (tmp_path / "new").exists(), "a refused run created its output folder"


NUMERIC_OPTIONS = {  # option -> its documented range (README, "Options"), integers only, whether 0 switches it off
    "--epochs": (1, contract.MAX_EPOCHS, True, False),
    "--batch-size": (2, 60_000, True, False),
    "--train-subset": (128, 60_000, True, False),
    "--test-subset": (1000, 10_000, True, False),
    "--replicas": (1, 64, True, False),
    "--seed": (0, contract.MAX_SEED, True, False),
    "--min-accuracy": (0, 1, False, False),
    "--worker-timeout": (1, 604_800, False, False),
    "--progress-interval": (0.1, 3600, False, True),
}


@pytest.mark.parametrize("option", NUMERIC_OPTIONS)
def test_every_numeric_option_is_checked_at_its_edges(option):
    """What `bench run` and `pytest bench` parse (the same RUN_OPTIONS), in this process: each edge value (0, negative,
    tiny, huge, NaN, inf, non-numeric, and the range's own ends) is accepted, or refused in a message that names the
    option and its valid values."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    for flag, kwargs in options.RUN_OPTIONS:
        parser.add_argument(flag, **kwargs)
    low, high, integer, zero_is_off = NUMERIC_OPTIONS[option]
    edges = {"0": low <= 0 or zero_is_off, "-1": False, "1e-9": not integer and low <= 1e-9, "1e30": False,
             "99999999999999999999": False, "nan": False, "inf": False, "-inf": False, "many": False, "": False,
             str(low): True, str(high): True}
    for value, accepted in edges.items():
        try:
            config = options.run_config(vars(parser.parse_args([f"{option}={value}"])))
            config.check_sizes(60_000, 10_000)  # the bounds that MNIST's size sets
            refused = None
        except (argparse.ArgumentError, contract.ConfigError) as error:
            refused = str(error)
        if accepted:
            assert refused is None, f"{option}={value} is in the documented range, but: {refused}"
        else:
            assert refused is not None, f"{option}={value!r} was accepted"
            assert option in refused and re.search(r"\d", refused), f"{option}={value!r}: {refused}"


JOB = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
BAD_JOBS = {  # torchrun's variables of a launched job, --replicas -> what the one line says
    "replicas_not_one_per_process": ({**JOB}, "4", "RANK=0 of a job of WORLD_SIZE=2, one replica per process; "
                                                   "pass --replicas 2"),
    "rank_outside_the_job": ({**JOB, "RANK": "2"}, "2", "RANK=2 of WORLD_SIZE=2: the ranks of a job run from 0"),
    "no_coordinator": ({**JOB, "MASTER_PORT": ""}, "2", "WORLD_SIZE=2 needs MASTER_ADDR and MASTER_PORT"),
}


@pytest.mark.parametrize("job", BAD_JOBS)
def test_a_launched_job_that_does_not_add_up_is_refused_before_anything_runs(job, mnist_dir, tmp_path):
    environment, replicas, message = BAD_JOBS[job]
    output = tmp_path / "new" / "out.json"
    ran, session = run_python_side_by_side(
        ("-m", "bench", "run", "pytorch", "--replicas", replicas, "--mnist-dir", mnist_dir, "--output", str(output)),
        ("-m", "pytest", "bench", "--replicas", replicas, "--mnist-dir", mnist_dir, "-p", "no:cacheprovider",
         f"--benchmark-json={output}"), env=environment, timeout=120)
    for result, code in ((ran, 2), (session, 4)):
        assert result.returncode == code, result.stdout + result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "new").exists(), "a refused run created its output folder"


@pytest.mark.parametrize("frameworks, message", [
    ("", "--frameworks '' names no framework; choose from pytorch"),
    (",", "--frameworks ',' names an empty name; choose from pytorch"),
    ("pytorch,jax,pytorch", "--frameworks names pytorch more than once"),
    ("pytorch,cobol", "unknown framework 'cobol'; choose from pytorch"),
])
def test_a_framework_list_that_names_no_framework_once_is_refused(frameworks, message, mnist_dir):
    result = run_python("-m", "pytest", "bench", f"--frameworks={frameworks}", "--mnist-dir", mnist_dir,
                        "-p", "no:cacheprovider", timeout=120)
    assert result.returncode == 4 and message in result.stderr, result.stderr


@pytest.mark.parametrize("flag", ["--benchmark-disable", "--benchmark-skip"])
def test_a_benchmark_that_times_nothing_cannot_promise_a_json(flag, mnist_dir, tmp_path):
    result = run_python("-m", "pytest", "bench", flag, f"--benchmark-json={tmp_path / 'out.json'}",
                        "--mnist-dir", mnist_dir, "-p", "no:cacheprovider", timeout=120)
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"{flag} times nothing, so --benchmark-json would never be written; drop one of them" in result.stderr


def test_a_configuration_a_row_cannot_run_skips_it_before_its_worker_and_says_what_was_not_written(mnist_dir, tmp_path):
    """bf16 on the rows that train in fp32 only, as --replicas on a row without an engine: skipped, saying why; every
    row skipped, the JSON that was asked for is not written, and the session says so."""
    out = tmp_path / "out.json"
    result = run_python("-m", "pytest", "bench", "--frameworks=haskell,burn", "--precision", "bf16", "-rs",
                        "--mnist-dir", mnist_dir, "-p", "no:cacheprovider", f"--benchmark-json={out}", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("haskell", "burn"):
        assert f"cannot run this configuration: {row} trains in fp32 only, not --precision bf16" in result.stdout
    assert "warming up" not in result.stdout
    assert f"no framework finished its timed epochs: {out} not written" in result.stdout and not out.exists()


@pytest.mark.parametrize("how", ["autoload off", "plugin off"])
def test_pytest_benchmark_is_there_without_autoloading_or_refused_in_one_line(how, mnist_dir):
    if how == "autoload off":  # as CI systems set it: the root conftest registers the plugin itself
        result = run_python("-m", "pytest", "bench", "--collect-only", "-q", "--mnist-dir", mnist_dir,
                            "-p", "no:cacheprovider", env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}, timeout=120)
        assert result.returncode == 0 and "test_train[pytorch]" in result.stdout, result.stdout + result.stderr
    else:
        result = run_python("-m", "pytest", "bench", "-p", "no:benchmark", "--mnist-dir", mnist_dir,
                            "-p", "no:cacheprovider", timeout=120)
        assert result.returncode == 4, result.stdout + result.stderr
        assert result.stderr.strip() == ("ERROR: this suite needs pytest-benchmark, which `-p no:benchmark` turned "
                                         "off; drop that option"), result.stderr


@pytest.mark.parametrize("module, message", [
    ("faulty_trainers:NotATrainer", "is not a subclass of implementations.contract.Trainer"),
    ("faulty_trainers:NoSuchClass", "cannot be loaded (AttributeError"),
])
def test_a_framework_module_that_is_no_trainer_is_refused(module, message, mnist_dir):
    result = run_python("-m", "pytest", "bench", "--frameworks=mine", f"--framework-module=mine={module}",
                        "--mnist-dir", mnist_dir, "-p", "no:cacheprovider", timeout=300)
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"--framework-module mine={module}: " in result.stderr and message in result.stderr, result.stderr


@pytest.fixture
def read_only_folder(tmp_path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs here, and root writes into any folder")
        folder.chmod(0o555)
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


def test_an_output_that_cannot_be_written_is_refused_before_training(tmp_path, read_only_folder, mnist_dir):
    """Every file a run will write is made and removed before anything trains: its folder, and its exact name."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere" / "out.json")
    cannot_write = r"cannot be written \((Read-only file system|Permission denied)\)"
    cases = {
        tmp_path / "a-file" / "out.json": re.escape(f"{tmp_path / 'a-file'} is a file, not a folder"),
        read_only_folder / "out.json": cannot_write,
        tmp_path / "dangling.json": "is a dangling symbolic link",
        tmp_path / "dangling.json" / "out.json": "is a dangling symbolic link",
        tmp_path / ("x" * 251 + ".json"): r"cannot be written \(File name too long\)",
    }
    session = ("-m", "pytest", "bench", "--mnist-dir", mnist_dir, "-p", "no:cacheprovider")
    runs = [("-m", "bench", "run", "pytorch", "--mnist-dir", mnist_dir, "--output", str(output)) for output in cases]
    sessions = [(*session, f"--benchmark-json={output}") for output in cases]
    # The longest name a file may have, whose interrupted twin (NAME.partial.json) could not be written.
    longest = tmp_path / ("x" * 250 + ".json")
    # The autosaved history, as `make bench` writes it (a read-only results/ in a container run as another user).
    storages = {read_only_folder: cannot_write, tmp_path / "a-file": "is a file, not a folder"}
    autosaves = [(*session, "--benchmark-autosave", f"--benchmark-storage=file://{storage}") for storage in storages]
    results = iter(run_python_side_by_side(*runs, *sessions, (*session, f"--benchmark-json={longest}"), *autosaves,
                                           timeout=120))
    ended_runs, ended_sessions = [next(results) for _ in runs], [next(results) for _ in sessions]
    refused_longest = next(results)
    for (output, message), ran, refused in zip(cases.items(), ended_runs, ended_sessions):
        assert ran.returncode == 2 and f"--output {output}" in ran.stderr and re.search(message, ran.stderr), ran.stderr
        assert refused.returncode == 4 and re.search(message, refused.stderr), refused.stderr
    assert refused_longest.returncode == 4 and f"{'x' * 250}.partial.json cannot be written (File name too long)" \
        in refused_longest.stderr, refused_longest.stderr
    for (storage, message), refused in zip(storages.items(), results):
        assert refused.returncode == 4 and f"--benchmark-autosave (--benchmark-storage {storage})" in refused.stderr
        assert re.search(message, refused.stderr), refused.stderr
    assert not (tmp_path / "nowhere").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file", "dangling.json", "read-only"], \
        "a refused run left a file or a folder behind"


# --- Nothing measured is lost ------------------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path) -> Path:
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"no tmpfs to fill here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        with open(folder / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
    except OSError:
        pass
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


def kept_path(stderr: str, what: str) -> Path:
    return Path(stderr.split(f"the {what} kept in ")[1].split()[0].rstrip(";"))


def test_a_record_that_cannot_be_written_after_training_is_kept_elsewhere(full_disk, mnist_dir):
    output = full_disk / "run.json"
    ran = run_python("-m", "bench", "run", "pytorch", *QUICK, "--mnist-dir", mnist_dir, "--output", str(output))
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert f"--output {output} could not be written (No space left on device)" in ran.stderr, ran.stderr
    kept = kept_path(ran.stderr, "record is")
    assert json.loads(kept.read_text())["framework"] == "pytorch"
    kept.unlink()
    assert sorted(path.name for path in full_disk.iterdir()) == ["filler"], "a temporary file was left behind"


def test_benchmark_json_that_cannot_be_written_keeps_the_records_elsewhere(full_disk, mnist_dir):
    output = full_disk / "out.json"
    session = run_python("-m", "pytest", "bench", *QUICK, "--frameworks=mine", f"--framework-module={MINE}",
                         "--mnist-dir", mnist_dir, "-p", "no:cacheprovider", f"--benchmark-json={output}")
    assert session.returncode == 4, session.stdout + session.stderr
    assert f"--benchmark-json {output} could not be written (No space left on device)" in session.stderr
    kept = kept_path(session.stderr, "run is")
    assert [record.framework for record in load_run_file(kept).records] == ["mine"], "the report cannot read it"
    kept.unlink()
    assert sorted(path.name for path in full_disk.iterdir()) == ["filler"], "a temporary file was left behind"


def test_benchmark_json_is_never_overwritten(tmp_path, mnist_dir):
    existing = tmp_path / "out.json"
    existing.write_text("{}")
    result = run_python("-m", "pytest", "bench", "--frameworks=pytorch", "--mnist-dir", mnist_dir, "-p", "no:cacheprovider",
                        f"--benchmark-json={existing}", timeout=120)
    assert result.returncode == 4 and f"--benchmark-json {existing} exists" in result.stderr, result.stderr
    assert existing.read_text() == "{}"


# --- Interruptions and signals ---------------------------------------------------------------------------------------
def descendants(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found |= {int(child)} | descendants(int(child))
    return found


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie holds nothing
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def default_ctrl_c() -> None:
    """Ctrl-C's default in the child, whatever this process inherited: a shell starts background jobs ignoring SIGINT,
    and an ignored SIGINT stays ignored through exec (Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def start_session(tmp_path, mnist_dir):
    """start_session(frameworks): `pytest bench` in its own process group, as a terminal or a CI runner starts it,
    returned once HangingTrainer has started to hang. A session a failed test left running is killed with its group."""
    marker, sessions = tmp_path / "hanging", []

    def start(frameworks: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "bench", *QUICK, f"--frameworks={frameworks}", f"--framework-module={MINE}",
             f"--framework-module={HANG}", "--mnist-dir", mnist_dir, "-p", "no:cacheprovider",
             f"--benchmark-json={tmp_path / 'out.json'}", "--benchmark-autosave",
             f"--benchmark-storage=file://{tmp_path / 'history'}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            preexec_fn=default_ctrl_c, env={**os.environ, "PYTHONPATH": str(TESTS), "HANG_MARKER": str(marker)})
        sessions.append(process)
        wait_for(marker.exists, 300, "the hanging trainer to start its epoch")
        return process

    yield start
    for process in sessions:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


@pytest.mark.parametrize("how, frameworks, finished", [
    ("SIGTERM to pytest alone", "mine,hang", ["mine"]),
    ("Ctrl-C to the process group", "hang", []),  # interrupted in the first framework's first epoch
])
def test_an_interrupted_session_keeps_what_finished_as_partial_and_leaves_no_worker(how, frameworks, finished,
                                                                                     start_session, tmp_path):
    process = start_session(frameworks)
    workers = descendants(process.pid)
    assert workers, "no worker process found"
    if how.startswith("SIGTERM"):
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2, out + err  # pytest's "interrupted"
    wait_for(lambda: all(map(gone, workers)), 2 * SHUTDOWN_GRACE_S + 5, f"workers {workers} to end")
    assert "Traceback" not in out + err, out + err
    assert not (tmp_path / "out.json").exists(), "an interrupted session was saved as complete"
    assert not list((tmp_path / "history").rglob("*.json")), "an interrupted session went into the history"
    partial = tmp_path / "out.partial.json"
    if not finished:  # nothing to keep: no empty partial file that the report and the gate could not use
        assert not partial.exists() and f"interrupted before any framework finished: {partial} not written" in out
        return
    content = json.loads(partial.read_text())
    assert content["mnist_bench_interrupted"] is True
    assert [b["extra_info"]["framework"] for b in content["benchmarks"]] == finished
    assert f"kept in {partial}, marked incomplete" in out
    gate = run_python("-m", "bench.gate", "--baseline", str(partial), str(partial), timeout=60)
    assert gate.returncode == 2 and "an interrupted session's partial results" in gate.stderr


def test_a_worker_whose_benchmark_process_died_ends_itself(start_session):
    process = start_session("hang")
    workers = descendants(process.pid)
    process.kill()  # SIGKILL: no handler runs, nothing is cleaned up by the parent
    process.communicate(timeout=60)
    wait_for(lambda: all(map(gone, workers)), 10, f"orphaned workers {workers} to end")


def test_sigterm_to_a_standalone_run_stops_its_worker_in_one_line(tmp_path, mnist_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", "run", "pytorch", "--preset", "smoke", "--mnist-dir", mnist_dir,
         "--output", str(tmp_path / "run.json")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:  # the worker is built: it is warming up (busy) when the signal comes
        if "warming up" in line:
            break
    workers = descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, out + err
    assert err.strip() == "interrupted by SIGTERM: the worker is stopped, nothing is recorded", err
    wait_for(lambda: all(map(gone, workers)), 2 * SHUTDOWN_GRACE_S + 5, f"workers {workers} to end")
    assert not (tmp_path / "run.json").exists()
