"""Fixtures of the harness tests: real MNIST and real framework workers, shared across a session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

from bench.data import MNIST, load_mnist
from bench.worker import FrameworkWorker, UnsupportedRun
from commands import REPO, run_python
from implementations import contract

SHARED_MNIST = REPO.parent / "shared" / "mnist"  # the copy that CI and developers have beside the checkout


@pytest.fixture(scope="session")
def mnist_dir(pytestconfig) -> str:
    folder = pytestconfig.getoption("mnist_dir") or os.environ.get("MNIST_DIR") or (
        str(SHARED_MNIST) if SHARED_MNIST.is_dir() else None)
    if folder is None:
        pytest.fail("the harness tests need MNIST: set MNIST_DIR or --mnist-dir", pytrace=False)
    return folder


class WorkerPool:
    """One worker per (framework, replicas, copy, processes), started on first use and rebuilt in place for another
    configuration (the framework is imported once; its replicas are set before that import, so they key the worker). A
    configuration the framework cannot run (contract.Unsupported) is refused again without a new build.

    Tests are grouped by framework (the parametrization is module-scoped): starting a framework's first worker closes
    those of the previous one, so only the PyTorch reference and the framework under test hold memory.
    """

    def __init__(self, mnist: MNIST):
        self.mnist, self.workers, self.unsupported = mnist, {}, {}  # workers: key -> (worker, its config)

    def get(self, framework, config: contract.RunConfig, copy: int = 0, processes: int | None = None) -> FrameworkWorker:
        """processes: start the trainer as a job of that many processes (default: the harness's choice for `config`)."""
        processes = processes or framework.worker_ranks(config.replicas)
        request = (framework.name, config, copy, processes)
        if request in self.unsupported:
            raise self.unsupported[request]
        key = (framework.name, config.replicas, copy, processes)
        worker, built = self.workers.pop(key, (None, None))
        if worker is None:
            if framework.name != "pytorch":  # the reference's worker never closes the framework under test
                self.close(keep={framework.name, "pytorch"})
            worker = FrameworkWorker(framework.name, framework.module, timeout_s=900, environment=framework.environment,
                                     ranks=processes)
        if built != config:
            try:
                worker.call("build", config, contract.prepare_data(*self.mnist, config))
            except BaseException as error:
                worker.close()
                if isinstance(error, UnsupportedRun):
                    self.unsupported[request] = error
                raise
        self.workers[key] = worker, config
        return worker

    def close(self, keep=()) -> None:
        for key in [key for key in self.workers if key[0] not in keep]:
            worker, _ = self.workers.pop(key)
            worker.close()


@pytest.fixture(scope="session")
def mnist(mnist_dir) -> MNIST:
    return load_mnist(mnist_dir)


@pytest.fixture(scope="session")
def workers(mnist):
    pool = WorkerPool(mnist)
    yield pool
    pool.close()



class BenchSessionRun(NamedTuple):
    result: subprocess.CompletedProcess
    json_path: Path  # --benchmark-json
    history: Path  # the --benchmark-autosave storage


@pytest.fixture(scope="session")
def real_session(tmp_path_factory, mnist_dir) -> BenchSessionRun:
    """One real `pytest bench` session with the smoke preset, shared by the harness and report tests: two broken
    implementations and the PyTorch page run as an outside implementation named `mine`. It trains as the smoke preset
    does and evaluates on one batch of test images: enough to check the preset's accuracy target."""
    folder = tmp_path_factory.mktemp("real-session")
    out = folder / "run.json"
    result = run_python(
        "-m", "pytest", "bench", "--preset", "smoke", "--test-subset", "1000", "--mnist-dir", mnist_dir,
        "-p", "no:cacheprovider", "--progress-interval", "0.5",
        "--frameworks=raising,selfkill,mine,hang", f"--benchmark-json={out}",
        "--deselect", "bench/test_benchmark.py::test_train[hang]",  # pytest's own selection: not in the record's
        "--benchmark-autosave", f"--benchmark-storage=file://{folder / 'history'}",
        "--framework-module", "raising=faulty_trainers:RaisingTrainer",
        "--framework-module", "selfkill=faulty_trainers:SelfKillingTrainer",
        "--framework-module", "mine=implementations.pytorch.trainer:TorchTrainer",
        "--framework-module", "hang=faulty_trainers:HangingTrainer")
    assert "2 failed, 1 passed, 1 deselected" in result.stdout, result.stdout + result.stderr
    return BenchSessionRun(result, out, folder / "history")
