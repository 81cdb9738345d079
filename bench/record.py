"""The run record, declared once: what one framework's benchmark run measured, and the run files that hold records.

`FrameworkRun.record()` makes a `RunRecord`; `pytest bench` stores it as the benchmark's extra_info (pytest-benchmark
JSON, `--benchmark-json` or the autosaved history), `python -m bench run --output` as a file of its own. The report
and the gate read run files through `load_run_file`, and the history (bench/history.py) too, all through `load_runs`
for files and folders; it refuses values that cannot be true (NaN, an accuracy outside [0, 1], a negative time, a
per-epoch list that does not hold one value per epoch, a field of the wrong type) with one line naming the file, the
framework and the field.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.text import printable
from implementations import contract

SCHEMA_VERSION = 2  # 1: the first harness's extra_info (no "schema" key): read as version 2 with the new fields unset
# Top-level keys `pytest bench` adds to pytest-benchmark's JSON.
SELECTED_FRAMEWORKS = "mnist_bench_selected_frameworks"  # what the session set out to run (--frameworks, else all)
INTERRUPTED = "mnist_bench_interrupted"  # present and true in the file an interrupted session keeps
REFERENCE_MATMUL_RATE = 1e12  # FLOP/s: normalized epoch times are seconds on a machine whose matmul runs this fast
NORMALIZED_TIME_UNIT = "s at a 1 TFLOP/s matmul"


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
        """Every field but the rate itself, in one line: what the report prints beside it."""
        threads = "" if self.threads is None else f", {self.threads} BLAS threads"
        nominal = "" if self.nominal_peak_flops is None else \
            f"; nominal peak {self.nominal_peak_flops / 1e12:,.1f} TFLOP/s ({self.nominal_peak_source})"
        return (f"{self.hardware} ({self.device}{threads}), {self.dtype} {self.size}x{self.size} for --precision "
                f"{self.precision}: the fastest of {self.products} products, median "
                f"{self.median_flops_per_second / 1e9:,.0f} GFLOP/s; {self.method}{nominal}")


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
    def normalized_epoch_time(self) -> float | None:
        """The median epoch in units of the machine's speed: its seconds x the session's matmul rate, shown as the
        seconds a machine whose matmul runs at 1 TFLOP/s would take. A uniformly slower machine of the same kind leaves
        it unchanged; the gate, the report's history and bench.history compare epoch times in these units."""
        return self.normalized(self.median_epoch_seconds)

    def normalized(self, seconds: float | None) -> float | None:
        """Seconds of this run in units of its machine's speed (see normalized_epoch_time); None without a yardstick."""
        if seconds is None or self.matmul is None:
            return None
        return seconds * self.matmul.flops_per_second / REFERENCE_MATMUL_RATE

    @property
    def options(self) -> dict:
        """The run's options; one that an older record lacks (the option came later) at its default, what it ran with."""
        return {} if self.config is None else {**default_options(), **self.config}

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
        for name in STORED_FIELDS:
            if data.get(name) is not None:
                values[name] = checked(name, data[name], f"{where} ({framework})")
        if values.get("schema", SCHEMA_VERSION) > SCHEMA_VERSION:
            raise BenchError(f"{where} ({framework}): record schema {values['schema']} is newer than this harness's "
                             f"{SCHEMA_VERSION}: update the harness to read it")
        check_epoch_counts(values, data.get("epochs"), f"{where} ({framework})")
        return cls(**values)


PER_EPOCH = ("worker_epoch_seconds", "epoch_train_loss", "epoch_test_accuracy", "epoch_label_digests")


def check_epoch_counts(values: dict, stored_epochs, where: str) -> None:
    """Every per-epoch list, the configured epochs and the stored count agree with the epochs timed (epoch_seconds):
    a record that disagrees was cut or edited, and its medians and time to target would mean nothing."""
    timed = len(values.get("epoch_seconds", []))
    if not timed:
        return
    for name in PER_EPOCH:
        if values.get(name) and len(values[name]) != timed:
            raise BenchError(f"{where}: {name} holds {len(values[name])} values for {timed} timed epochs "
                             "(epoch_seconds): a record cut short or edited; rerun the benchmark")
    for name, count_of_epochs in (("epochs", stored_epochs), ("config's epochs", values.get("config", {}).get("epochs"))):
        if count_of_epochs is not None and count_of_epochs != timed:
            raise BenchError(f"{where}: {name} is {short(count_of_epochs)}, but epoch_seconds holds {timed} timed "
                             "epochs: a record cut short or edited; rerun the benchmark")


STORED_FIELDS = tuple(spec.name for spec in fields(RunRecord))
MATMUL_FIELDS = frozenset(spec.name for spec in fields(MatmulRate))


@functools.cache
def default_options() -> dict:
    return contract.RunConfig().as_dict()


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


def epoch_time(value) -> bool:
    """A real epoch: no implementation trains an epoch in under a microsecond (a denormal would make images/s
    infinite), and none takes longer than 10^7 s (four months)."""
    return finite(value) and 1e-6 <= value <= 1e7


def list_of(check, what: str):
    return lambda value: isinstance(value, list) and all(map(check, value)), f"a list of {what}"


MAX_FLOPS_PER_SECOND = 1e18  # an exaFLOP/s: no single device the yardstick times comes near it


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
    "epoch_seconds": list_of(epoch_time, "positive finite seconds (each from 1 µs to 1e7 s)"),
    "worker_epoch_seconds": list_of(epoch_time, "positive finite seconds (each from 1 µs to 1e7 s)"),
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
    "matmul": (lambda value: isinstance(value, dict) and MATMUL_FIELDS <= value.keys()
               and all(positive(rate) and rate <= MAX_FLOPS_PER_SECOND for rate in (
                   value["flops_per_second"], value["median_flops_per_second"],
                   value["nominal_peak_flops"] or 1.0)),  # no nominal peak: nothing to check
               f"a matmul yardstick with positive rates of at most {MAX_FLOPS_PER_SECOND:.0e} FLOP/s"),
    "notes": list_of(text, "strings"),
    "schema": (count, "a schema version"),
}


def checked(name: str, value, where: str):
    check, what = FIELD_RULES[name]
    if not check(value):
        raise BenchError(f"{where}: {name} is {short(value)}, not {what}")
    if name == "matmul":
        return MatmulRate(**{name: value[name] for name in MATMUL_FIELDS})
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
    label: str  # short, printable and unique within a report: "0003_f50e434" for an autosaved run, else the file's stem
    date: str  # when the session started, "YYYY-MM-DD HH:MM"
    commit: str  # the short commit id, "(dirty)" after it for a tree with uncommitted changes
    machine: str
    records: list[RunRecord] = field(default_factory=list)
    selected: list[str] | None = None  # the frameworks the session set out to run; None: unknown (every one)
    notes: list[str] = field(default_factory=list)
    started: datetime | None = None  # when the session started
    commit_id: str | None = None  # in full, as pytest-benchmark stores it; None outside a git checkout
    commit_time: datetime | None = None  # when that commit was made: the order of a history
    dirty: bool = False
    timing_only: list[str] = field(default_factory=list)  # frameworks whose entry has no record, only its timing

    @property
    def shown_path(self) -> str:
        return printable(self.path)

    def device(self, record: RunRecord) -> str:
        """Where a record ran: its device on this machine; figures are only ever compared between equal devices."""
        return printable(f"{record.device or 'unknown device'} · {self.machine}")

    def by_framework(self) -> dict[str, RunRecord]:
        found = {}
        for record in self.records:
            if record.framework in found:
                raise BenchError(f"{self.shown_path}: two entries for {printable(record.framework)}; compare runs with "
                                 "one entry per framework")
            found[record.framework] = record
        return found


def read_json(path: Path) -> Any:
    """The JSON content of a file, or a one-line BenchError saying why it cannot be read."""
    shown = printable(path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        what = "a dangling symbolic link" if path.is_symlink() else "no such file"
        raise BenchError(f"{shown}: {what} (pytest-benchmark writes no JSON when no benchmark finished its timed "
                         "epochs)") from None
    except OSError as error:
        raise BenchError(f"{shown}: cannot be read ({error.strerror})") from None
    if not content.strip():
        raise BenchError(f"{shown}: the file is empty (an interrupted run?); rerun the benchmark")
    try:
        return json.loads(content.decode("utf-8"))
    except UnicodeDecodeError:
        raise BenchError(f"{shown}: not a text file, so not pytest-benchmark JSON") from None
    except json.JSONDecodeError as error:
        raise BenchError(f"{shown}: invalid JSON ({error.msg} at line {error.lineno} column {error.colno}): truncated "
                         "by an interrupted run, or not pytest-benchmark output") from None
    except RecursionError:
        raise BenchError(f"{shown}: JSON nested too deeply to be a benchmark run") from None
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        raise BenchError(f"{shown}: JSON the standard parser refuses ({error})") from None


def load_run_file(path: Path) -> RunFile:
    data = read_json(path)
    shown = printable(path)
    if isinstance(data, dict) and "framework" in data and "benchmarks" not in data:
        raise BenchError(f"{shown}: a `python -m bench run --output` record, not pytest-benchmark JSON; the report "
                         "reads `pytest bench --benchmark-json=FILE` output and results/history")
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise BenchError(f"{shown}: not pytest-benchmark JSON (no 'benchmarks' list); the report reads "
                         "`pytest bench --benchmark-json=FILE` output and results/history")
    if data.get(INTERRUPTED):
        raise BenchError(f"{shown}: an interrupted session's partial results; they are not compared or gated: "
                         "rerun the benchmark")
    commit = data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {}
    commit_id = commit.get("id") if isinstance(commit.get("id"), str) and commit.get("id") else None
    short_commit = printable(commit_id or "?")[:7]
    number = AUTOSAVED.match(path.name)
    selected = data.get(SELECTED_FRAMEWORKS)
    run = RunFile(path=path, label=f"{number.group(1)}_{short_commit}" if number else printable(path.stem),
                  date=printable(data.get("datetime") or "")[:16].replace("T", " "),
                  commit=short_commit + (" (dirty)" if commit.get("dirty") else ""),
                  machine=machine_name(data.get("machine_info")),
                  selected=selected if isinstance(selected, list) and all(map(text, selected)) else None,
                  started=timestamp(data.get("datetime")), commit_id=commit_id, commit_time=timestamp(commit.get("time")),
                  dirty=bool(commit.get("dirty")))
    for index, entry in enumerate(data["benchmarks"], start=1):
        run.records.append(entry_record(entry, f"{shown}: benchmark {index}", run))
    if not run.records:
        run.notes.append("no benchmark entries: every framework failed before or during its timed epochs")
    return run


def timestamp(value) -> datetime | None:
    """An ISO 8601 time as pytest-benchmark stores it; one without a zone is taken as UTC, one unreadable as None."""
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def load_runs(inputs: list, warn: Callable[[str], None]) -> list[RunFile]:
    """The runs of files and folders, in the order given; a folder's runs (its subfolders' too) in the order they ran.
    A file given by name must be a run (else BenchError). In a folder, a file that is not one (another project's
    JSON, an interrupted session's partial file, a `bench run --output` record, a dangling link, an unreadable or
    empty file) is named to `warn` and skipped; a folder without a single run is a BenchError."""
    runs = []
    for given in inputs:
        path = Path(given)
        runs += sorted(folder_runs(path, warn), key=lambda run: (run.date, run.path.name)) if path.is_dir() \
            else [load_run_file(path)]
    seen = {}
    for run in runs:  # labels name plot files and chart points: unique within a report
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label}-{seen[run.label]}"
    return runs


def folder_runs(folder: Path, warn: Callable[[str], None]) -> list[RunFile]:
    files = [path for path in sorted(folder.rglob("*.json")) if not path.is_dir()]  # a folder's files are in the walk
    if not files:
        raise BenchError(f"{printable(folder)}: no .json files in this folder")
    runs = []
    for path in files:
        try:
            runs.append(load_run_file(path))
        except BenchError as error:
            warn(f"skipped {error}")
    if not runs:
        raise BenchError(f"{printable(folder)}: none of its {len(files)} .json files is a benchmark run (each is named "
                         "above)")
    return runs


def machine_name(machine_info) -> str:
    cpu = machine_info.get("cpu") if isinstance(machine_info, dict) else None
    if not isinstance(cpu, dict) or not cpu.get("brand_raw"):
        return "unknown machine"
    return printable(f"{cpu['brand_raw']}, {cpu.get('count', '?')} cores")


def entry_record(entry, where: str, run: RunFile) -> RunRecord:
    """The entry's record; an entry whose record() failed after the timed epochs keeps only its timing."""
    if not isinstance(entry, dict) or not isinstance(entry.get("stats"), dict):
        raise BenchError(f"{where} has no 'stats' object: not pytest-benchmark JSON")
    info, stats = entry.get("extra_info", {}), entry["stats"]
    if not isinstance(info, dict):
        raise BenchError(f"{where}: 'extra_info' is {type(info).__name__}, not an object")
    if not info:
        name = str(entry.get("param") or entry.get("name") or where)
        run.notes.append(f"{printable(name)}: no record in its extra_info (a failure after the timed epochs): named "
                         "after its test, only its timing is known")
        run.timing_only.append(name)
        info = {"framework": name, "epoch_seconds": stats.get("data")}
    return RunRecord.from_json(info, where)
