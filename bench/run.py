"""A framework's benchmark run, driven from the benchmark process: worker start, warm-up, timed epochs, the record.

`pytest bench` times `FrameworkRun.train_epoch` through pytest-benchmark; `python -m bench run` calls it directly.
Both evaluate between epochs, outside the timed calls, and produce the same `RunRecord`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.data import load_mnist
from bench.errors import BenchError
from bench.gpu import GpuMemorySampler, cuda_problem
from bench.record import MatmulRate, RunRecord
from bench.worker import DEFAULT_CALL_TIMEOUT_S, FrameworkWorker
from implementations import FRAMEWORKS, Framework, contract, missing_packages


def resolve_frameworks(names: list[str], extra_modules: dict[str, str]) -> list[Framework]:
    """Registered frameworks, or ones given as NAME=package.module:Class (implementations outside this repository)."""
    known = ", ".join([*FRAMEWORKS, *extra_modules])
    if not names or "" in names:
        raise BenchError(f"--frameworks {','.join(names)!r} names {'no framework' if not names else 'an empty name'}; "
                         f"choose from {known} (or leave it out to run every installed one)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BenchError(f"--frameworks names {', '.join(duplicates)} more than once; name each framework once")
    frameworks = []
    for name in names:
        if name in extra_modules:
            frameworks.append(Framework(name, extra_modules[name], (), ""))
        elif name in FRAMEWORKS:
            frameworks.append(FRAMEWORKS[name])
        else:
            raise BenchError(f"unknown framework {name!r}; choose from {known}")
    return frameworks


def require_installed(framework: Framework) -> None:
    missing = missing_packages(framework)
    if missing:
        raise BenchError(f"{framework.name} is not installed (missing {', '.join(missing)}): {framework.install_hint}")


def run_data(config: contract.RunConfig, mnist_dir: str | None, verify_digests: bool) -> contract.Data:
    """The run's data, prepared once in the benchmark process (numpy only) and handed to every worker: a missing,
    unwritable or corrupt MNIST, and an option that asks for more images than it has, fail here, once, before any
    worker starts."""
    return contract.prepare_data(*load_mnist(mnist_dir, verify_digests=verify_digests), config)


def stop_on_sigterm(signum, frame):
    """SIGTERM (a CI runner's or job scheduler's stop) ends a run as Ctrl-C does: its workers are stopped, and nothing
    is recorded as complete."""
    raise KeyboardInterrupt("SIGTERM")


def check_device(config: contract.RunConfig) -> None:
    """--device cuda on a machine without an NVIDIA driver or GPU, refused before any worker: what is missing."""
    if config.device == "cuda" and (problem := cuda_problem()):
        raise BenchError(f"--device cuda: {problem}; use --device cpu (or auto)")


def worker_processes(framework: Framework, config: contract.RunConfig) -> int:
    """How many worker processes this benchmark process starts: one where it is a rank of a launched job (its worker
    joins the other ranks' through the variables it inherits), else one per replica where the framework's engine runs
    a process per replica (the harness then plays torchrun), else one."""
    return 1 if contract.job_process().processes > 1 else framework.worker_ranks(config.replicas)


@dataclass
class FrameworkRun:
    """Use as a context manager: entering starts and builds the worker; leaving stops it, whatever happened."""

    framework: Framework
    config: contract.RunConfig
    data: contract.Data  # run_data(): the same arrays for every framework of a session
    timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    progress_interval_s: float = contract.PROGRESS_INTERVAL_S  # within an epoch (0: no progress)
    matmul: MatmulRate | None = None  # the session's yardstick on this run's device, when measured
    environment: dict = field(default_factory=dict)  # the trainer's framework_version and device
    warmup_s: float | None = None
    epoch_results: list[contract.EpochResult] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # wall time of each train_epoch call, seen from here
    evaluations: list[contract.Evaluation] = field(default_factory=list)  # after each epoch
    on_epoch: Callable[[FrameworkRun], None] | None = None  # after each epoch's evaluation: progress display
    on_progress: Callable[[contract.EpochProgress], None] | None = None  # within an epoch, every few seconds
    worker: FrameworkWorker | None = None
    gpu: GpuMemorySampler | None = None
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __enter__(self) -> FrameworkRun:
        with self.resources as resources:  # on an error here, closes what was opened so far
            self.worker = resources.enter_context(FrameworkWorker(
                self.framework.name, self.framework.module, self.timeout_s, self.framework.environment,
                worker_processes(self.framework, self.config)))
            self.gpu = resources.enter_context(GpuMemorySampler(self.worker.pids))
            self.worker.call("build", self.config, self.data, self.progress_interval_s)
            self.environment = self.worker.call("environment")
            self.resources = resources.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self.resources.close()

    def warm_up(self) -> None:
        start = time.perf_counter()
        self.worker.call("warm_up")
        self.warmup_s = time.perf_counter() - start

    def train_epoch(self) -> contract.EpochResult:
        start = time.perf_counter()
        result = self.worker.call("train_epoch", len(self.epoch_results), on_progress=self.on_progress)
        self.epoch_seconds.append(time.perf_counter() - start)
        self.epoch_results.append(result)
        return result

    def evaluate_new_epoch(self) -> None:
        """Evaluate the last trained epoch unless done already: pytest-benchmark's untimed setup between rounds."""
        if len(self.evaluations) < len(self.epoch_results):
            self.evaluations.append(self.worker.call("evaluate"))
            if self.on_epoch:
                self.on_epoch(self)

    def train(self) -> None:
        """All epochs, each followed by its evaluation."""
        for _ in range(self.config.epochs):
            self.train_epoch()
            self.evaluate_new_epoch()

    def last_epoch_line(self) -> str:
        """The last evaluated epoch in one line: what progress displays show."""
        epoch = len(self.evaluations)
        result, seconds, evaluation = self.epoch_results[epoch - 1], self.epoch_seconds[epoch - 1], self.evaluations[-1]
        return (f"epoch {epoch}/{self.config.epochs}: {seconds:.2f} s, {result.images / seconds:,.0f} images/s, "
                f"train loss {result.mean_loss:.4f}, test accuracy {evaluation.accuracy:.2%}")

    def record(self) -> RunRecord:
        """Everything measured. Stops the GPU memory sampler: call it once, after the last epoch."""
        self.evaluate_new_epoch()
        self.gpu.stop()
        final = self.evaluations[-1] if self.evaluations else None
        return RunRecord(
            framework=self.framework.name,
            framework_version=self.environment.get("framework_version"),
            device=self.environment.get("device"),
            devices=self.environment.get("devices", []),
            threads_per_replica=self.environment.get("threads_per_replica"),
            processes=max(contract.job_process().processes, len(self.worker.pids)),
            config=self.config.as_dict(),
            train_images=self.epoch_results[0].images if self.epoch_results else None,
            epoch_seconds=self.epoch_seconds,
            worker_epoch_seconds=[r.seconds for r in self.epoch_results],
            epoch_train_loss=[r.mean_loss for r in self.epoch_results],
            epoch_test_accuracy=[e.accuracy for e in self.evaluations],
            epoch_label_digests=[r.label_digest for r in self.epoch_results],
            test_accuracy=final.accuracy if final else None,
            test_loss=final.loss if final else None,
            target_accuracy=self.config.min_accuracy,
            warmup_s=self.warmup_s,
            trainable_parameters=self.worker.call("trainable_parameters"),
            gpu_memory_peak_bytes=self.gpu.peak_bytes,
            allocator_peak_bytes=self.worker.call("memory_peak_bytes"),
            peak_rss_bytes=self.worker.call("peak_rss_bytes"),
            training_flops_per_image=contract.training_flops_per_image(),
            matmul=self.matmul,
            notes=[self.gpu.note] if self.gpu.note else [],
        )


def progress_line(run: FrameworkRun, progress: contract.EpochProgress) -> str:
    """The epoch in progress in one line."""
    rate = progress.images_done / progress.seconds if progress.seconds > 0 else 0.0
    return (f"epoch {len(run.epoch_results) + 1}/{run.config.epochs}: step {progress.steps_done}/{progress.steps}, "
            f"{progress.seconds:.0f} s, {rate:,.0f} images/s")


def accuracy_failure(record: RunRecord) -> str | None:
    """Why the run missed its accuracy target, or None if it reached it."""
    reached, required = record.test_accuracy, record.target_accuracy
    if reached is None or reached < required:
        shown = "no evaluation" if reached is None else f"{reached:.2%}"
        return (f"{record.framework}: test accuracy {shown} after {record.epochs} epoch(s) is below the required "
                f"{required:.2%} (per epoch: {', '.join(f'{a:.2%}' for a in record.epoch_test_accuracy)})")
    return None
