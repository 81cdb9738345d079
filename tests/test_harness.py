"""The harness: worker isolation and failure reporting, the benchmark's record, the CLI, the shared contract."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from bench.data import load_mnist
from bench.output import keep_elsewhere, write_new_file
from bench.record import RunRecord
from bench.run import FrameworkRun
from bench.worker import TRAINER_METHODS, FrameworkWorker, WorkerError
from implementations import FRAMEWORKS, contract

from commands import QUICK, REAL_SESSION_IMAGES, REPO, run_python

SMOKE = contract.PRESETS["smoke"]
RECORD_FIELDS = {
    "framework", "framework_version", "device", "epochs", "train_images", "images_per_second", "test_accuracy",
    "test_loss", "epoch_test_accuracy", "time_to_target_s", "warmup_s", "trainable_parameters",
    "gpu_memory_peak_bytes", "allocator_peak_bytes", "peak_rss_bytes", "epoch_seconds", "worker_epoch_seconds",
    "harness_overhead", "epoch_label_digests", "training_flops_per_image", "matmul", "matmul_utilization", "processes",
    "schema",
}


# --- The benchmark session: records, JSON, failures isolated per framework ------------------------------------------
def test_failing_frameworks_fail_alone_with_clear_messages(real_session):
    output = real_session.result.stdout + real_session.result.stderr
    assert real_session.result.returncode == 1, output
    assert "results written to" in output
    assert "raising: 'train_epoch' failed in the worker: RuntimeError" in output, output
    assert "selfkill: the worker process" in output and "was killed by SIGKILL" in output, output
    assert "mine: warm-up " in output and "mine: epoch 2/2: " in output, "no progress lines: " + output
    assert re.search(r"mine: epoch 1/2: step \d+/4, \d+ s, [\d,]+ images/s", output), "no progress within an epoch"
    assert "test_train[hang]" not in output, "a deselected framework ran"
    assert [p.name for p in real_session.json_path.parent.iterdir() if p.is_file()] == ["run.json"], \
        "the temporary JSON was left behind"


def test_benchmark_json_has_per_epoch_rounds_and_every_field(real_session, mnist_dir):
    report = json.loads(real_session.json_path.read_text())
    (entry,) = report["benchmarks"]
    assert entry["stats"]["rounds"] == SMOKE.epochs and len(entry["stats"]["data"]) == SMOKE.epochs
    info = entry["extra_info"]
    assert RECORD_FIELDS <= set(info), RECORD_FIELDS - set(info)
    assert info["framework"] == "mine", "the harness names the record after the run's name, not the trainer's class"
    assert info["trainable_parameters"] == contract.TRAINABLE_PARAMETERS
    assert info["train_images"] == REAL_SESSION_IMAGES and info["epochs"] == SMOKE.epochs
    assert info["config"]["batch_size"] == 128 and len(info["epoch_test_accuracy"]) == SMOKE.epochs
    assert info["images_per_second"] > 0 and info["peak_rss_bytes"] > 100 * 2**20
    assert np.isclose(info["epoch_seconds"], entry["stats"]["data"], rtol=0.05, atol=0.05).all()
    # The trainer's own epoch time is inside the harness's: the difference is the harness's overhead per epoch.
    assert all(0 < inner <= outer for inner, outer in zip(info["worker_epoch_seconds"], info["epoch_seconds"]))
    assert 0 <= info["harness_overhead"] < 0.5
    assert info["matmul"]["flops_per_second"] > 1e9 and 0 < info["matmul_utilization"]
    assert info["training_flops_per_image"] == contract.training_flops_per_image()
    labels = load_mnist(mnist_dir).train_labels[:info["train_images"]]
    assert info["epoch_label_digests"] == [contract.label_digest(labels[contract.epoch_batches(0, epoch, len(labels), 128)])
                                           for epoch in range(SMOKE.epochs)]
    if info["device"] == "CPU":  # no GPU: recorded nulls and a note, never an error
        assert info["gpu_memory_peak_bytes"] is None and info["allocator_peak_bytes"] is None
        assert any("NVML" in note for note in info["notes"])
    assert RunRecord.from_json(info, "run.json").to_json() == info, "the record does not round-trip through JSON"


def test_replicas_run_on_the_engine_of_each_framework_that_has_one_and_skip_the_others(tmp_path, mnist_dir):
    """--replicas 2: PyTorch as two torch.distributed processes on localhost (gloo), recorded as two replicas; a
    framework without a data-parallel engine is skipped, saying so."""
    out = tmp_path / "run.json"
    result = run_python("-m", "pytest", "bench", "--replicas", "2", *QUICK, "--frameworks=pytorch,keras-torch",
                        "--mnist-dir", mnist_dir, "-p", "no:cacheprovider", f"--benchmark-json={out}", "-rs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 skipped" in result.stdout
    assert "keras-torch has no data-parallel engine, for --replicas 2" in result.stdout, result.stdout
    (entry,) = json.loads(out.read_text())["benchmarks"]
    info = entry["extra_info"]
    assert info["replicas"] == 2 and info["devices"] == ["CPU", "CPU"] and info["threads_per_replica"] >= 1
    assert info["processes"] == 2, "the harness starts PyTorch's replicas as processes, torchrun's way"
    assert info["images_per_second_per_replica"] == pytest.approx(info["images_per_second"] / 2)
    labels = load_mnist(mnist_dir).train_labels[:256]  # the two ranks' shards together are the contract's batches
    assert info["epoch_label_digests"] == [contract.label_digest(labels[contract.epoch_batches(0, 0, 256, 128)])]


def test_a_launched_job_runs_one_replica_per_benchmark_process_and_rank_0_keeps_the_record(tmp_path, mnist_dir):
    """torchrun starts two benchmark processes on localhost, as it would on two machines: each one's worker joins the
    job through the variables it inherits, both train the contract's batches, and only rank 0 writes the record."""
    out = tmp_path / "run.json"
    result = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bench", "run",
                        "pytorch", "--replicas", "2", *QUICK, "--mnist-dir", mnist_dir, "--output", str(out),
                        env={"COLUMNS": "200"})  # rich's lines unwrapped
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "rank 0 of a job of 2 processes" in output and "rank 0 writes the record, not this one" in output, output
    losses = [line.split("train loss ")[1].split(",")[0] for line in output.splitlines() if "train loss " in line]
    assert len(losses) == 2 and losses[0] == losses[1], f"the ranks disagree on the epoch's loss: {losses}"
    assert [path.name for path in tmp_path.iterdir()] == ["run.json"]
    record = RunRecord.from_json(json.loads(out.read_text()), str(out))
    assert (record.processes, record.replicas, record.devices) == (2, 2, ["CPU", "CPU"])
    labels = load_mnist(mnist_dir).train_labels[:256]
    assert record.epoch_label_digests == [contract.label_digest(labels[contract.epoch_batches(0, 0, 256, 128)])]


def test_bench_modules_import_each_other_without_a_cycle():
    """bench/ is layered: the record below the report and the gate, which import neither each other nor anything
    that imports them."""
    graph = {}
    for path in (REPO / "bench").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {f"bench.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.module == "bench" for alias in node.names}
        graph[f"bench.{path.stem}"] = {name for name in imported if name.startswith("bench.")}

    def reaches(start, goal, seen=()):
        return any(name == goal or (name not in seen and reaches(name, goal, (*seen, name)))
                   for name in graph.get(start, ()))

    cycles = [module for module in graph if reaches(module, module)]
    assert not cycles, f"import cycles through {cycles}"
    assert "bench.record" in graph["bench.gate"] and "bench.record" in graph["bench.report"]


def test_the_contract_declares_every_method_the_harness_calls():
    declared = {name for name in vars(contract.Trainer) if not name.startswith("_")}
    assert TRAINER_METHODS <= declared, TRAINER_METHODS - declared


def test_bare_pytest_collects_the_harness_tests_only():
    result = run_python("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", timeout=120)
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert collected and all(line.startswith("tests/") for line in collected), result.stdout[-2000:]


# --- The worker in isolation ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_data(mnist) -> contract.Data:
    return contract.prepare_data(*mnist, SMOKE)


def test_worker_killed_mid_epoch_reports_the_signal(smoke_data):
    framework = FRAMEWORKS["pytorch"]
    with FrameworkWorker("pytorch", framework.module, timeout_s=300) as worker:
        worker.call("build", SMOKE, smoke_data)
        threading.Timer(1.0, os.kill, (worker.pid, signal.SIGKILL)).start()  # the epoch takes ~3 s
        with pytest.raises(WorkerError, match=r"pytorch: the worker process \(pid \d+\) was killed by SIGKILL .* during 'train_epoch'"):
            worker.call("train_epoch", 0)


def test_worker_past_its_time_limit_is_stopped(smoke_data):
    with FrameworkWorker("hanging", "faulty_trainers:HangingTrainer", timeout_s=300) as worker:
        worker.call("build", SMOKE, smoke_data)
        with pytest.raises(WorkerError, match=r"hanging: 'train_epoch' ran past its 3 s limit; the worker was stopped"):
            worker.call("train_epoch", 0, timeout_s=3)
        assert not worker.process.is_alive(), "the hanging worker was waited for, not stopped"


def test_user_errors_in_the_worker_come_back_without_a_traceback(smoke_data):
    """A configuration the harness lets through but the framework refuses (a GPU that torch cannot use): the page's
    own message, naming what is missing, in one line."""
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(WorkerError) as caught, FrameworkRun(FRAMEWORKS["pytorch"], SMOKE.with_options(device="cuda"),
                                                            smoke_data):
        pass
    assert "--device cuda: PyTorch sees no CUDA GPU" in str(caught.value) and "no NVIDIA driver" in str(caught.value)
    assert "Traceback" not in str(caught.value)


def test_a_trainer_that_returns_a_framework_object_fails_without_bringing_the_framework_in(smoke_data):
    """torch.__version__ is a TorchVersion: unpickling it would import torch into this process. The reply is refused
    before that, naming the class, and this process still holds no framework."""
    with FrameworkWorker("versioned", "faulty_trainers:TorchVersionTrainer", timeout_s=300) as worker:
        worker.call("build", SMOKE, smoke_data)
        with pytest.raises(WorkerError, match=r"versioned: 'environment' returned a torch\.torch_version\.TorchVersion "
                                              r"object, which the benchmark process cannot read without importing "
                                              "torch; a trainer returns plain data"):
            worker.call("environment")
    assert "torch" not in sys.modules


def test_cli_run_prints_a_summary_and_keeps_the_record(tmp_path, mnist_dir):
    out = tmp_path / "run.json"
    args = ["-m", "bench", "run", "pytorch", *QUICK, "--mnist-dir", mnist_dir, "--output", str(out)]
    result = run_python(*args, env={"COLUMNS": "80"})  # a narrow terminal: the table's lines scroll, never wrap
    assert result.returncode == 0, result.stdout + result.stderr
    assert "epoch 1/1:" in result.stdout and "images/s" in result.stdout
    header, _, row = [line for line in result.stdout.splitlines() if line.startswith("|")][:3]
    assert header.startswith("| framework |") and row.startswith("| pytorch |") and row.count("|") == 15, row
    record = json.loads(out.read_text())
    assert record["epochs"] == 1 and RECORD_FIELDS <= set(record)
    again = run_python(*args)  # the record is never overwritten
    assert again.returncode == 2 and f"--output {out} exists" in again.stderr and "Traceback" not in again.stderr


def test_a_compiled_run_compiles_in_its_warm_up_not_in_a_timed_epoch(tmp_path, mnist_dir):
    """--compile (torch.compile): the warm-up runs the epochs' own path on their first batches (the same layouts,
    strides, dtypes and shapes) and one evaluation, so no timed epoch compiles again: torch logs no recompilation after
    the warm-up, and the first epoch takes no longer than the others, within a busy machine's noise."""
    out = tmp_path / "run.json"
    result = subprocess.run(  # one stream, in the order it was written: the worker's log and the run's lines
        [sys.executable, "-m", "bench", "run", "pytorch", "--compile", "--epochs", "2", "--train-subset", "1024",
         "--test-subset", "1000", "--min-accuracy", "0", "--mnist-dir", mnist_dir, "--output", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        env={**os.environ, "TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout
    assert "warm-up " in result.stdout and "Recompiling" not in result.stdout.split("warm-up ", 1)[1], result.stdout
    first, *later = json.loads(out.read_text())["epoch_seconds"]
    assert first <= 2 * max(later), f"epoch 1 took {first:.2f} s, the later one {later}: it compiled"


def test_an_output_file_that_appeared_during_the_run_is_left_as_it_was_and_the_record_kept_elsewhere(tmp_path):
    out = tmp_path / "run.json"
    out.write_text("someone else's")
    with pytest.raises(FileExistsError):
        write_new_file(out, '{"framework": "pytorch"}')
    assert out.read_text() == "someone else's" and [path.name for path in tmp_path.iterdir()] == ["run.json"]
    kept = Path(keep_elsewhere('{"framework": "pytorch"}', "record is").split("the record is kept in ")[1])
    assert json.loads(kept.read_text()) == {"framework": "pytorch"}
    kept.unlink()


# --- The shared contract ----------------------------------------------------------------------------------------------
def test_canonical_weights_are_resnet18_with_torchvision_init():
    weights = contract.initial_weights(0)
    assert contract.trainable_parameter_count(weights) == contract.TRAINABLE_PARAMETERS == 11_175_370
    assert weights["conv1.weight"].shape == (64, 1, 7, 7) and weights["fc.weight"].shape == (10, 512)
    assert "layer2.0.downsample.0.weight" in weights and "layer1.0.downsample.0.weight" not in weights
    conv = weights["layer4.1.conv2.weight"]
    assert np.isclose(conv.std(), np.sqrt(2 / (512 * 9)), rtol=0.01)  # kaiming normal, fan_out
    assert np.abs(weights["fc.bias"]).max() <= 1 / np.sqrt(512)
    assert all(np.array_equal(a, b) for a, b in zip(weights.values(), contract.initial_weights(0).values()))
    assert not np.array_equal(weights["conv1.weight"], contract.initial_weights(1)["conv1.weight"])


def test_channels_last_layouts_round_trip():
    weights = contract.initial_weights(0)
    converted = {name: contract.to_channels_last(array) for name, array in weights.items()}
    assert converted["conv1.weight"].shape == (7, 7, 1, 64) and converted["fc.weight"].shape == (512, 10)
    assert converted["conv1.weight"][2, 3, 0, 5] == weights["conv1.weight"][5, 0, 2, 3]
    assert all(np.array_equal(contract.from_channels_last(converted[name]), array) for name, array in weights.items())
    images = np.arange(2 * 28 * 28, dtype=np.float32).reshape(2, 1, 28, 28)
    assert contract.nhwc(images).shape == (2, 28, 28, 1) and contract.nhwc(images)[1, 4, 7, 0] == images[1, 0, 4, 7]


def test_check_weights_names_the_problem():
    weights = contract.initial_weights(0)
    weights["fc.weight"] = weights["fc.weight"].T
    with pytest.raises(contract.ConfigError, match=r"fc.weight has shape \(512, 10\), expected \(10, 512\)"):
        contract.check_weights(weights)
    del weights["bn1.running_var"]
    with pytest.raises(contract.ConfigError, match="missing \\['bn1.running_var'\\]"):
        contract.check_weights(weights)


def test_schedule_warms_up_then_decays():
    total = 2340
    rates = contract.learning_rate(np.arange(total), total, 0.05)
    peak = int(np.argmax(rates))
    assert peak == 233 and rates[peak] == 0.05  # 10% warm-up: 234 steps
    assert rates[0] == pytest.approx(0.05 / 234) and rates[-1] > 0
    assert np.all(np.diff(rates[:peak + 1]) > 0) and np.all(np.diff(rates[peak:]) < 0)


def test_peak_rate_scales_linearly_with_the_batch():
    assert contract.peak_learning_rate(256) == 0.1 and contract.peak_learning_rate(128) == 0.05
    for batch_size in (128, 512):
        table = contract.learning_rate_table(contract.RunConfig(batch_size=batch_size), 60_000)
        assert len(table) == 5 * (60_000 // batch_size)
        assert table.max() == np.float32(contract.peak_learning_rate(batch_size))


def test_epoch_order_is_a_seeded_permutation_dropping_the_last_partial_batch():
    first, again = contract.epoch_batches(0, 0, 1000, 128), contract.epoch_batches(0, 0, 1000, 128)
    assert first.shape == (7, 128) and np.array_equal(first, again)
    assert len(np.unique(first)) == 896  # no index twice
    assert not np.array_equal(first, contract.epoch_batches(0, 1, 1000, 128))
    assert not np.array_equal(first, contract.epoch_batches(1, 0, 1000, 128))
