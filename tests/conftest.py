"""Fixtures of the harness tests: real MNIST and real framework workers, shared across a session."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

from bench.data import MNIST, load_mnist
from bench.worker import FrameworkWorker, UnsupportedRun
from commands import REAL_SESSION_IMAGES, REPO, run_python
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

    Tests are grouped by framework (the parametrization is module-scoped): the first request for a framework's worker
    closes the workers of the frameworks before it, so only the PyTorch reference, the framework under test and the
    workers built ahead for the next framework hold memory.

    build_ahead starts a worker's build in the background, for a later get(): a framework's import and compilation
    keep one core busy, so on two cores the workers that the next checks need build while the current ones run.
    """

    def __init__(self, mnist: MNIST):
        self.mnist, self.workers, self.unsupported = mnist, {}, {}  # workers: key -> (worker, its config)
        self.ahead, self.builders = {}, ThreadPoolExecutor(4, thread_name_prefix="build-ahead")  # ahead: request -> Future
        self.built = set()  # every request a build was started for, failed or not: built ahead once at most
        self.checked = set()  # the frameworks whose workers were asked for

    def get(self, framework, config: contract.RunConfig, copy: int = 0, processes: int | None = None) -> FrameworkWorker:
        """processes: start the trainer as a job of that many processes (default: the harness's choice for `config`)."""
        request = self.request(framework, config, copy, processes)
        if request in self.unsupported:
            raise self.unsupported[request]
        # A framework's first check: those of the frameworks before it are done. The reference serves every framework.
        if framework.name not in self.checked | {"pytorch"}:
            self.close(self.checked - {"pytorch"})
        self.checked.add(framework.name)
        key = self.key(request)
        worker, built = self.workers.pop(key, (None, None))
        if request in self.ahead:
            if worker is not None:
                worker.close()
            worker, built = self.collect(request), config
        if built != config:
            worker = self.build(framework, config, request, worker)
        self.workers[key] = worker, config
        return worker

    def build_ahead(self, framework, config: contract.RunConfig, copy: int = 0, processes: int | None = None) -> None:
        """Start building the worker that get() with the same arguments will return, unless one is there for it."""
        request = self.request(framework, config, copy, processes)
        if request not in self.built and self.key(request) not in self.workers:
            self.built.add(request)
            self.ahead[request] = self.builders.submit(self.build, framework, config, request)

    @staticmethod
    def request(framework, config, copy, processes) -> tuple:
        return framework.name, config, copy, processes or framework.worker_ranks(config.replicas)

    @staticmethod
    def key(request) -> tuple:
        """The worker that serves `request`, rebuilt in place for another configuration with the same replicas."""
        name, config, copy, processes = request
        return name, config.replicas, copy, processes

    def build(self, framework, config, request, worker: FrameworkWorker | None = None) -> FrameworkWorker:
        self.built.add(request)
        if worker is None:
            worker = FrameworkWorker(framework.name, framework.module, timeout_s=900, environment=framework.environment,
                                     ranks=request[3])
        try:
            worker.call("build", config, contract.prepare_data(*self.mnist, config))
        except BaseException as error:
            worker.close()
            if isinstance(error, UnsupportedRun):
                self.unsupported[request] = error
            raise
        return worker

    def collect(self, request) -> FrameworkWorker:
        """The worker built ahead for `request`, once its build has ended (its error, if it failed)."""
        return self.ahead.pop(request).result()

    def close(self, frameworks=None) -> None:
        """Close the workers, those being built ahead too, of `frameworks` (names), or of every framework."""
        closing = lambda name: frameworks is None or name in frameworks
        for request in [request for request in self.ahead if closing(request[0])]:
            try:
                self.collect(request).close()
            except Exception:  # a build that failed closed its worker; no check asked for it
                pass
        for key in [key for key in self.workers if closing(key[0])]:
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
    pool.builders.shutdown()



class BenchSessionRun(NamedTuple):
    result: subprocess.CompletedProcess
    json_path: Path  # --benchmark-json
    history: Path  # the --benchmark-autosave storage


@pytest.fixture(scope="session")
def real_session(tmp_path_factory, mnist_dir) -> BenchSessionRun:
    """One real `pytest bench` session with the smoke preset, shared by the harness and report tests: two broken
    implementations and the PyTorch page run as an outside implementation named `mine`. Its two epochs train on 4
    batches and it evaluates on 1,000 test images, with no accuracy target: the smoke gate's own run holds the PyTorch
    page to the preset's target (bench/test_benchmark.py), on the preset's images."""
    folder = tmp_path_factory.mktemp("real-session")
    out = folder / "run.json"
    result = run_python(
        "-m", "pytest", "bench", "--preset", "smoke", "--train-subset", str(REAL_SESSION_IMAGES), "--test-subset", "1000",
        "--min-accuracy", "0", "--mnist-dir", mnist_dir, "-p", "no:cacheprovider", "--progress-interval", "0.1",
        "--frameworks=raising,selfkill,mine,hang", f"--benchmark-json={out}",
        "--deselect", "bench/test_benchmark.py::test_train[hang]",  # pytest's own selection: not in the record's
        "--benchmark-autosave", f"--benchmark-storage=file://{folder / 'history'}",
        "--framework-module", "raising=faulty_trainers:RaisingTrainer",
        "--framework-module", "selfkill=faulty_trainers:SelfKillingTrainer",
        "--framework-module", "mine=implementations.pytorch.trainer:TorchTrainer",
        "--framework-module", "hang=faulty_trainers:HangingTrainer")
    assert "2 failed, 1 passed, 1 deselected" in result.stdout, result.stdout + result.stderr
    return BenchSessionRun(result, out, folder / "history")
