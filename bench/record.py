"""The run record, declared once: what one framework's benchmark run measured, and the run files that hold records.

`FrameworkRun.record()` makes a `RunRecord`; `pytest bench` stores it as the benchmark's extra_info (pytest-benchmark
JSON, `--benchmark-json` or the autosaved history), `python -m bench run --output` as a file of its own. The report
and the gate read run files through `load_run_file`, which refuses values that cannot be true (NaN, an accuracy
outside [0, 1], a negative time, a field of the wrong type) with one line naming the file, the framework and the field.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from implementations import contract

SCHEMA_VERSION = 2  # 1: the first harness's extra_info (no "schema" key): read as version 2 with the new fields unset
# Top-level keys `pytest bench` adds to pytest-benchmark's JSON.
SELECTED_FRAMEWORKS = "mnist_bench_selected_frameworks"  # what the session set out to run (--frameworks, else all)
INTERRUPTED = "mnist_bench_interrupted"  # present and true in the file an interrupted session keeps


@dataclass(frozen=True)
class MatmulRate:
    """The session's yardstick (bench/yardstick.py): a dense matrix multiply on the run's device, timed in the same
    session; model FLOPs utilization divides by it and the gate compares epoch times in its units."""

    device: str  # "cpu" or "cuda"
    hardware: str  # the CPU model or the GPU name
    precision: str  # the run's --precision this rate stands for
    dtype: str  # what was multiplied, e.g. "float32", "float32 on TF32 tensor cores", "bfloat16"
    size: int  # n of the n x n by n x n product: 2 n^3 FLOPs
    flops_per_second: float  # of the fastest product: the machine's measured peak
    median_flops_per_second: float
    products: int  # how many were timed (after one warm-up)
    threads: int | None  # BLAS threads on CPU; None on GPU
    method: str  # one line: library, version, what was timed
    nominal_peak_flops: float | None  # GPU: the vendor's datasheet figure (dense), None where the model is not listed
    nominal_peak_source: str  # which datasheet row, or why there is none

    @property
    def description(self) -> str:
        return f"{self.hardware}, {self.dtype} {self.size}x{self.size}: {self.method}"


@dataclass(frozen=True)
class RunRecord:
    framework: str  # the name the run was asked for: the registry's, or --framework-module's
    framework_version: str | None = None
    device: str | None = None
    devices: list[str] = field(default_factory=list)  # with --replicas: one per replica (empty: the one `device`)
    threads_per_replica: int | None = None  # with --replicas on a CPU: the compute threads each replica may use
    processes: int = 1  # the worker processes that trained, all machines together: one per replica in a launched job
    config: dict | None = None  # contract.RunConfig.as_dict()
    train_images: int | None = None  # per epoch (whole batches)
    epoch_seconds: list[float] = field(default_factory=list)  # each train_epoch call as the harness timed it
    worker_epoch_seconds: list[float] = field(default_factory=list)  # the same epochs as the trainer timed them
    epoch_train_loss: list[float] = field(default_factory=list)
    epoch_test_accuracy: list[float] = field(default_factory=list)  # fractions, after each epoch
    epoch_label_digests: list[str] = field(default_factory=list)
    test_accuracy: float | None = None  # after the last epoch
    test_loss: float | None = None
    target_accuracy: float | None = None
    warmup_s: float | None = None
    trainable_parameters: int | None = None
    gpu_memory_peak_bytes: int | None = None  # NVML, the worker process
    allocator_peak_bytes: int | None = None  # the framework allocator's own peak
    peak_rss_bytes: int | None = None  # the worker's peak resident memory
    training_flops_per_image: float | None = None  # contract.training_flops_per_image()
    matmul: MatmulRate | None = None
    notes: list[str] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    # --- What follows from the measurements ---------------------------------------------------------------------------
    @property
    def epochs(self) -> int:
        return len(self.epoch_seconds)

    @property
    def median_epoch_seconds(self) -> float | None:
        return statistics.median(self.epoch_seconds) if self.epoch_seconds else None

    @property
    def options(self) -> dict:
        """The run's options; one that an older record lacks (the option came later) at its default, what it ran with."""
        return {} if self.config is None else {**contract.RunConfig().as_dict(), **self.config}

    @property
    def replicas(self) -> int:
        return self.options.get("replicas", 1)

    @property
    def images_per_second(self) -> float | None:
        if not self.epoch_seconds or self.train_images is None:
            return None
        return self.train_images * self.epochs / sum(self.epoch_seconds)

    @property
    def images_per_second_per_replica(self) -> float | None:
        return None if self.images_per_second is None else self.images_per_second / self.replicas

    def scaling_efficiency(self, single: RunRecord) -> float | None:
        """Throughput over `replicas` times that of `single`, the same framework's one-replica run on the same device:
        1.0 is perfect scaling."""
        if self.images_per_second is None or single.images_per_second is None:
            return None
        return self.images_per_second / (self.replicas * single.images_per_second)

    @property
    def harness_overhead(self) -> float | None:
        """The share of the harness's epoch time that the trainer did not see (worker calls, pipe, pickling)."""
        if len(self.worker_epoch_seconds) != self.epochs or not self.epochs:
            return None
        return 1 - sum(self.worker_epoch_seconds) / sum(self.epoch_seconds)

    @property
    def time_to_target_s(self) -> float | None:
        """Training time up to the first epoch whose test accuracy reached the target (evaluation not counted)."""
        elapsed = 0.0
        for seconds, accuracy in zip(self.epoch_seconds, self.epoch_test_accuracy):
            elapsed += seconds
            if self.target_accuracy is not None and accuracy >= self.target_accuracy:
                return elapsed
        return None

    @property
    def achieved_flops_per_second(self) -> float | None:
        if self.training_flops_per_image is None or self.images_per_second is None:
            return None
        return self.training_flops_per_image * self.images_per_second

    @property
    def matmul_utilization(self) -> float | None:
        """Achieved model FLOP/s over the session's measured matmul rate on the same device."""
        if self.achieved_flops_per_second is None or self.matmul is None:
            return None
        return self.achieved_flops_per_second / self.matmul.flops_per_second

    @property
    def peak_memory(self) -> tuple[int | None, str]:
        """GPU memory from NVML where there is a GPU, else the worker's peak resident memory; and which."""
        if self.gpu_memory_peak_bytes is not None:
            return self.gpu_memory_peak_bytes, "GPU"
        return self.peak_rss_bytes, "RSS"

    DERIVED = ("epochs", "replicas", "median_epoch_seconds", "images_per_second", "images_per_second_per_replica",
               "harness_overhead", "time_to_target_s", "achieved_flops_per_second", "matmul_utilization")

    def to_json(self) -> dict:
        """The stored fields and, for readers of the JSON, the figures derived from them."""
        return {**asdict(self), **{name: getattr(self, name) for name in self.DERIVED}}

    @classmethod
    def from_json(cls, data: Any, where: str) -> RunRecord:
        """A record from its JSON object; derived figures in it are recomputed, not trusted. BenchError if invalid."""
        if not isinstance(data, dict):
            raise BenchError(f"{where}: the record is {type(data).__name__}, not an object")
        framework = data.get("framework")
        if not isinstance(framework, str) or not framework:
            raise BenchError(f"{where}: 'framework' is {framework!r}, not a name")
        values = {}
        for spec in fields(cls):
            if spec.name in data and data[spec.name] is not None:
                values[spec.name] = checked(spec.name, data[spec.name], f"{where} ({framework})")
        if values.get("schema", SCHEMA_VERSION) > SCHEMA_VERSION:
            raise BenchError(f"{where} ({framework}): record schema {values['schema']} is newer than this harness's "
                             f"{SCHEMA_VERSION}: update the harness to read it")
        return cls(**values)


# --- Validation: every stored field, what it may hold -------------------------------------------------------------------
def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fraction(value) -> bool:
    return finite(value) and 0 <= value <= 1


def positive(value) -> bool:
    return finite(value) and value > 0


def non_negative(value) -> bool:
    return finite(value) and value >= 0


def count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def text(value) -> bool:
    return isinstance(value, str)


def list_of(check, what: str):
    return lambda value: isinstance(value, list) and all(map(check, value)), f"a list of {what}"


FIELD_RULES = {  # field -> (check, what a valid value is)
    "framework": (lambda value: isinstance(value, str) and bool(value), "a name"),
    "framework_version": (text, "a string"),
    "device": (text, "a string"),
    "devices": list_of(text, "strings"),
    "threads_per_replica": (lambda value: count(value) and value > 0, "a positive integer"),
    "processes": (lambda value: count(value) and value > 0, "a positive integer"),
    "config": (lambda value: isinstance(value, dict) and count(value.get("replicas", 1)) and value.get("replicas", 1) > 0,
               "an object (the run configuration, with a positive number of replicas)"),
    "train_images": (count, "a non-negative integer"),
    "epoch_seconds": list_of(positive, "positive finite seconds"),
    "worker_epoch_seconds": list_of(positive, "positive finite seconds"),
    "epoch_train_loss": list_of(non_negative, "non-negative finite losses"),
    "epoch_test_accuracy": list_of(fraction, "fractions in [0, 1]"),
    "epoch_label_digests": list_of(text, "strings"),
    "test_accuracy": (fraction, "a fraction in [0, 1]"),
    "test_loss": (non_negative, "a non-negative finite number"),
    "target_accuracy": (fraction, "a fraction in [0, 1]"),
    "warmup_s": (non_negative, "non-negative finite seconds"),
    "trainable_parameters": (count, "a non-negative integer"),
    "gpu_memory_peak_bytes": (count, "a non-negative integer of bytes"),
    "allocator_peak_bytes": (count, "a non-negative integer of bytes"),
    "peak_rss_bytes": (count, "a non-negative integer of bytes"),
    "training_flops_per_image": (positive, "a positive finite number"),
    "matmul": (lambda value: isinstance(value, dict) and {spec.name for spec in fields(MatmulRate)} <= set(value)
               and positive(value["flops_per_second"]) and positive(value["median_flops_per_second"])
               and (value["nominal_peak_flops"] is None or positive(value["nominal_peak_flops"])),
               "a matmul yardstick with positive finite rates"),
    "notes": list_of(text, "strings"),
    "schema": (count, "a schema version"),
}


def checked(name: str, value, where: str):
    check, what = FIELD_RULES[name]
    if not check(value):
        raise BenchError(f"{where}: {name} is {short(value)}, not {what}")
    if name == "matmul":
        return MatmulRate(**{spec.name: value[spec.name] for spec in fields(MatmulRate)})
    return value


def short(value) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


# --- Run files --------------------------------------------------------------------------------------------------------
AUTOSAVED = re.compile(r"^(\d{4})_")  # pytest-benchmark's autosave names: NNNN_<commit>_<date>[_uncommitted-changes]


@dataclass
class RunFile:
    """One pytest-benchmark JSON file of `pytest bench`: its records, in the order the frameworks ran."""

    path: Path
    label: str  # short and unique within a report: "0003_f50e434" for an autosaved run, else the file's stem
    date: str
    commit: str
    machine: str
    records: list[RunRecord] = field(default_factory=list)
    selected: list[str] | None = None  # the frameworks the session set out to run; None: unknown (every one)
    notes: list[str] = field(default_factory=list)

    def device(self, record: RunRecord) -> str:
        """Where a record ran: its device on this machine; figures are only ever compared between equal devices."""
        return f"{record.device or 'unknown device'} · {self.machine}"

    def by_framework(self) -> dict[str, RunRecord]:
        found = {}
        for record in self.records:
            if record.framework in found:
                raise BenchError(f"{self.path}: two entries for {record.framework}; compare runs with one entry "
                                 "per framework")
            found[record.framework] = record
        return found


def read_json(path: Path) -> Any:
    """The JSON content of a file, or a one-line BenchError saying why it cannot be read."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise BenchError(f"{path}: no such file (pytest-benchmark writes no JSON when no benchmark finished its timed "
                         "epochs)") from None
    except OSError as error:
        raise BenchError(f"{path}: cannot be read ({error.strerror})") from None
    if not content.strip():
        raise BenchError(f"{path}: the file is empty (an interrupted run?); rerun the benchmark")
    try:
        return json.loads(content.decode("utf-8"))
    except UnicodeDecodeError:
        raise BenchError(f"{path}: not a text file, so not pytest-benchmark JSON") from None
    except json.JSONDecodeError as error:
        raise BenchError(f"{path}: invalid JSON ({error.msg} at line {error.lineno} column {error.colno}): truncated "
                         "by an interrupted run, or not pytest-benchmark output") from None
    except RecursionError:
        raise BenchError(f"{path}: JSON nested too deeply to be a benchmark run") from None
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        raise BenchError(f"{path}: JSON the standard parser refuses ({error})") from None


def load_run_file(path: Path) -> RunFile:
    data = read_json(path)
    if isinstance(data, dict) and "framework" in data and "benchmarks" not in data:
        raise BenchError(f"{path}: a `python -m bench run --output` record, not pytest-benchmark JSON; the report "
                         "reads `pytest bench --benchmark-json=FILE` output and results/history")
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise BenchError(f"{path}: not pytest-benchmark JSON (no 'benchmarks' list); the report reads "
                         "`pytest bench --benchmark-json=FILE` output and results/history")
    if data.get(INTERRUPTED):
        raise BenchError(f"{path}: an interrupted session's partial results; they are not compared or gated: "
                         "rerun the benchmark")
    commit = data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {}
    short_commit = str(commit.get("id") or "?")[:7]
    number = AUTOSAVED.match(path.name)
    selected = data.get(SELECTED_FRAMEWORKS)
    run = RunFile(path=path, label=f"{number.group(1)}_{short_commit}" if number else path.stem,
                  date=str(data.get("datetime") or "")[:16].replace("T", " "),
                  commit=short_commit + (" (dirty)" if commit.get("dirty") else ""),
                  machine=machine_name(data.get("machine_info")),
                  selected=selected if isinstance(selected, list) and all(map(text, selected)) else None)
    for index, entry in enumerate(data["benchmarks"], start=1):
        run.records.append(entry_record(entry, f"{path}: benchmark {index}", run.notes))
    if not run.records:
        run.notes.append("no benchmark entries: every framework failed before or during its timed epochs")
    return run


def machine_name(machine_info) -> str:
    cpu = machine_info.get("cpu") if isinstance(machine_info, dict) else None
    if not isinstance(cpu, dict) or not cpu.get("brand_raw"):
        return "unknown machine"
    return f"{cpu['brand_raw']}, {cpu.get('count', '?')} cores"


def entry_record(entry, where: str, notes: list[str]) -> RunRecord:
    """The entry's record; an entry whose record() failed after the timed epochs keeps only its timing."""
    if not isinstance(entry, dict) or not isinstance(entry.get("stats"), dict):
        raise BenchError(f"{where} has no 'stats' object: not pytest-benchmark JSON")
    info, stats = entry.get("extra_info", {}), entry["stats"]
    if not isinstance(info, dict):
        raise BenchError(f"{where}: 'extra_info' is {type(info).__name__}, not an object")
    if not info:
        name = str(entry.get("param") or entry.get("name") or where)
        notes.append(f"{name}: no record in its extra_info (a failure after the timed epochs): named after its "
                     "test, only its timing is known")
        info = {"framework": name, "epoch_seconds": stats.get("data")}
    return RunRecord.from_json(info, where)
