"""A framework's benchmark run, driven from the benchmark process: worker start, warm-up, timed epochs, the record.

`pytest bench` times `FrameworkRun.train_epoch` through pytest-benchmark; `python -m bench run` calls it directly.
Both evaluate between epochs, outside the timed calls, and produce the same record (pytest-benchmark's extra_info).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bench.errors import BenchError
from bench.gpu import GpuMemorySampler
from bench.worker import FrameworkWorker
from implementations import FRAMEWORKS, Framework, contract, missing_packages

DEFAULT_WORKER_TIMEOUT_S = 1800.0  # per worker call: one epoch of a slow framework on a 2-core CPU fits


def resolve_framework(name: str, extra_modules: dict[str, str] | None = None) -> Framework:
    """A registered framework, or one given as NAME=package.module:Class (an implementation outside this repository)."""
    if extra_modules and name in extra_modules:
        return Framework(name, extra_modules[name], (), "")
    if name not in FRAMEWORKS:
        raise BenchError(f"unknown framework {name!r}; choose from {', '.join(FRAMEWORKS)}")
    return FRAMEWORKS[name]


def require_installed(framework: Framework) -> None:
    missing = missing_packages(framework)
    if missing:
        raise BenchError(f"{framework.name} is not installed (missing {', '.join(missing)}): {framework.install_hint}")


@dataclass
class FrameworkRun:
    framework: Framework
    config: contract.RunConfig
    mnist_dir: str | None = None
    verify_digests: bool = True
    timeout_s: float = DEFAULT_WORKER_TIMEOUT_S
    epoch_results: list = field(default_factory=list)  # contract.EpochResult per trained epoch
    epoch_seconds: list = field(default_factory=list)  # wall time of each train_epoch call, seen from here
    evaluations: list = field(default_factory=list)  # contract.Evaluation after each epoch
    notes: list = field(default_factory=list)

    def __enter__(self):
        self.worker = FrameworkWorker(self.framework.name, self.framework.module, self.timeout_s,
                                     self.framework.environment)
        self.gpu = GpuMemorySampler(self.worker.pid).__enter__()
        try:
            self.worker.call("build", self.config, self.mnist_dir, self.verify_digests)
            self.environment = self.worker.call("environment")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        self.gpu.__exit__()
        self.worker.close()

    def warm_up(self) -> None:
        start = time.perf_counter()
        self.worker.call("warm_up")
        self.warmup_s = time.perf_counter() - start

    def train_epoch(self) -> contract.EpochResult:
        start = time.perf_counter()
        result = self.worker.call("train_epoch", len(self.epoch_results))
        self.epoch_seconds.append(time.perf_counter() - start)
        self.epoch_results.append(result)
        return result

    def evaluate_new_epoch(self) -> None:
        """Evaluate the last trained epoch unless done already: pytest-benchmark's untimed setup between rounds."""
        if len(self.evaluations) < len(self.epoch_results):
            self.evaluations.append(self.worker.call("evaluate"))

    def train(self, on_epoch=None) -> None:
        """All epochs, each followed by its evaluation; on_epoch(run) after each (progress display)."""
        for _ in range(self.config.epochs):
            self.train_epoch()
            self.evaluate_new_epoch()
            if on_epoch:
                on_epoch(self)

    def record(self) -> dict:
        """Everything measured, JSON-ready: the benchmark's extra_info and the CLI's summary."""
        self.evaluate_new_epoch()
        self.gpu.__exit__()
        if self.gpu.note:
            self.notes.append(self.gpu.note)
        accuracies = [e.accuracy for e in self.evaluations]
        cumulative, time_to_target = 0.0, None
        for seconds, accuracy in zip(self.epoch_seconds, accuracies):
            cumulative += seconds
            if time_to_target is None and accuracy >= self.config.min_accuracy:
                time_to_target = cumulative
        images = sum(r.images for r in self.epoch_results)
        final = self.evaluations[-1] if self.evaluations else None
        weights = self.worker.call("export_weights")
        return {
            "framework": self.framework.name,
            **self.environment,
            "epochs": len(self.epoch_results),
            "batch_size": self.config.batch_size,
            "train_images": self.epoch_results[0].images if self.epoch_results else 0,
            "images_per_second": images / sum(self.epoch_seconds) if self.epoch_seconds else None,
            "test_accuracy": final.accuracy if final else None,
            "test_loss": final.loss if final else None,
            "epoch_test_accuracy": accuracies,
            "epoch_train_loss": [r.mean_loss for r in self.epoch_results],
            "epoch_seconds": self.epoch_seconds,
            "epoch_label_digests": [r.label_digest for r in self.epoch_results],
            "target_accuracy": self.config.min_accuracy,
            "time_to_target_s": time_to_target,
            "warmup_s": getattr(self, "warmup_s", None),
            "trainable_parameters": contract.trainable_parameter_count(weights),
            "gpu_memory_peak_bytes": self.gpu.peak_bytes,
            "allocator_peak_bytes": self.worker.call("memory_peak_bytes"),
            "peak_rss_bytes": self.worker.call("peak_rss_bytes"),
            "config": self.config.as_dict(),
            "notes": self.notes,
        }


def accuracy_failure(record: dict) -> str | None:
    """Why the run missed its accuracy target, or None if it reached it."""
    reached, required = record["test_accuracy"], record["target_accuracy"]
    if reached is None or reached < required:
        shown = "no evaluation" if reached is None else f"{reached:.2%}"
        return (f"{record['framework']}: test accuracy {shown} after {record['epochs']} epoch(s) is below the required "
                f"{required:.2%} (per epoch: {', '.join(f'{a:.2%}' for a in record['epoch_test_accuracy'])})")
    return None
