"""The shared training contract: what every framework trains, on what data, in what order, from which weights.

Everything framework-neutral lives here, once, in numpy: the run configuration, the recipe constants (in PyTorch's
conventions), the learning-rate schedule, the per-epoch data order, the canonical weight format with its initializer,
and the `Trainer` interface that each `implementations/<framework>/` package implements. A framework file translates
these; it never restates them (a page in another language passes `recipe()` to its program).

Every framework page (Python, Rust or Haskell) has the sections of PAGE_SECTIONS, in that order, each opened by one
banner comment `# --- Model ---...` (`//` in Rust, `--` in Haskell), and its members stand in the sections and the
order of PAGE_MEMBERS, under the same names: the Flax examples' vocabulary, `train_step` for one SGD step on a
device-resident batch and `eval_step` for one evaluation batch (summed loss, correct count), then the Trainer's
`train_on_batch` (Keras' name: one step on a batch from outside), `train_batches` (the epoch's loop), `evaluate`, and
`import_canonical`/`export_canonical` for the weight conversion. tests/test_pages.py checks both, and
implementations/README.md says how to add a row.
"""

from __future__ import annotations

import abc
import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar, NamedTuple

import numpy as np


PAGE_SECTIONS = ("Model", "State", "Train step", "Epoch", "Evaluation", "Canonical weights")
# Where a page's members stand: section -> their names, in order. A page defines those it needs (a row whose model is
# in another language has no BasicBlock in Python); each stands in its section, in this order, among the page's own
# helpers. ".name" is a method of the page's Trainer; "a|b" is one member under its names in other idioms (Haiku's
# network is a function). Rust pages spell them in snake_case, Haskell pages in camelCase.
PAGE_MEMBERS = {
    "Model": ("BasicBlock", "ResNet18|resnet18"),
    "State": ("select_device|select_devices", "TrainState", "make_optimizer", ".build", ".environment",
              ".memory_peak_bytes", ".trainable_parameters"),
    "Train step": (".train_step", ".train_on_batch", ".learning_rates"),
    "Epoch": (".train_batches", ".warm_up"),
    "Evaluation": (".eval_step", ".evaluate", ".logits"),
    "Canonical weights": (".import_weights", ".export_weights", "import_canonical", "export_canonical"),
}


class ConfigError(ValueError):
    """A run option, or a set of weights, that cannot be used; the message names it and says how to fix it."""


class Unsupported(ConfigError):
    """A valid run option that this framework cannot run (--replicas 2 where it has no data-parallel engine): the
    harness skips the framework for it, saying so, rather than failing it."""


# --- Recipe (identical in every framework) ---------------------------------------------------------------------------
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081  # of MNIST train pixels scaled to [0, 1]
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1  # PyTorch's convention: running = (1 - 0.1) * running + 0.1 * batch (Keras and Haiku call 0.9 the decay)
SGD_MOMENTUM = 0.9  # PyTorch's formulation: buf = 0.9 * buf + grad; param -= lr * buf
# He et al.'s 0.1 for 256 images, scaled linearly with the batch (Goyal et al. 2017): 0.05 at the default 128. A peak of
# 0.1 at batch 128 sat at the edge of stability: fp32 rounding decided whether a run took a loss spike it did not
# recover from in 5 epochs (JAX, seed 0: 98.98%; the same code with seed 1 and the other frameworks: 99.5%).
PEAK_LEARNING_RATE_PER_256_IMAGES = 0.1
WARMUP_FRACTION = 0.1  # of all steps; warm-up keeps the first steps, from BatchNorm's start-up statistics, stable
EVAL_BATCH_SIZE = 1000  # divides the 10,000 test images: every evaluation batch has the same static shape

# --- Model: torchvision's ResNet18 for 1-channel 28x28 images and 10 classes -------------------------------------------
STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 2, 2, 2)
NUM_CLASSES = 10
TRAINABLE_PARAMETERS = 11_175_370


# --- Run configuration -----------------------------------------------------------------------------------------------
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")  # bf16: mixed precision, bf16 compute with fp32 weights, like torch.autocast
# The ranges of the numeric options (README, "Options"). The schedule is a table of every step, made before training:
# at most MAX_EPOCHS x 30,000 steps (batch 2), 120 MB. A replica is a process or a device: MAX_REPLICAS bounds what one
# run starts. Seeds are 32-bit, as numpy's and every framework's own.
MAX_EPOCHS = 1000
MAX_REPLICAS = 64
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class RunConfig:
    epochs: int = 5
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"  # auto: CUDA when the framework sees a GPU, else CPU
    precision: str = "fp32"
    allow_tf32: bool = True  # CUDA only: TF32 tensor cores for fp32 matmuls/convolutions (off: strict fp32)
    compile: bool = False  # the framework's optional graph compiler: torch.compile, TensorFlow XLA (JAX always jits)
    train_subset: int | None = None  # first N training images; None: all 60,000
    test_subset: int | None = None  # evaluate on the first N test images (whole evaluation batches); None: all 10,000
    # Data parallel on the framework's own engine: each step's batch is split into `replicas` contiguous shards, one per
    # replica (device), gradients are averaged and BatchNorm statistics taken over the whole batch: the same model.
    replicas: int = 1
    min_accuracy: float = 0.993  # test accuracy the run must reach (fraction)

    def __post_init__(self):
        check_integer("epochs", self.epochs, 1, MAX_EPOCHS)
        check_integer("batch_size", self.batch_size, 2, None, "BatchNorm trains on batch statistics, and layer4's 1x1 "
                                                           "maps hold one value per channel for a batch of one image")
        check_integer("seed", self.seed, 0, MAX_SEED)
        check_integer("replicas", self.replicas, 1, MAX_REPLICAS)
        if self.train_subset is not None:
            check_integer("train_subset", self.train_subset, self.batch_size, None,
                          f"an epoch trains on whole batches of --batch-size {self.batch_size}")
        if self.test_subset is not None and not (isinstance(self.test_subset, int) and self.test_subset > 0
                                                 and self.test_subset % EVAL_BATCH_SIZE == 0):
            raise ConfigError(f"--test-subset must be a positive multiple of {EVAL_BATCH_SIZE} (whole evaluation "
                              f"batches, so that every one has the same static shape), got {self.test_subset!r}")
        if self.batch_size % self.replicas:
            raise ConfigError(f"--batch-size {self.batch_size} does not split into --replicas {self.replicas} equal "
                              "shards: choose a number of replicas that divides the batch size")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not (isinstance(self.min_accuracy, (int, float)) and 0.0 <= self.min_accuracy <= 1.0):
            raise ConfigError(f"--min-accuracy is a fraction from 0 to 1 (0.993 for 99.3%), got {self.min_accuracy!r}")

    def check_sizes(self, train_images: int, test_images: int) -> None:
        """A ConfigError naming the option that asks for more images than the data has (MNIST: 60,000 and 10,000)."""
        if self.train_subset is not None and self.train_subset > train_images:
            raise ConfigError(f"--train-subset {self.train_subset} is larger than the {train_images} training images")
        if self.batch_size > (self.train_subset or train_images):
            raise ConfigError(f"--batch-size {self.batch_size} is larger than the {self.train_subset or train_images} "
                              "training images: an epoch would have no full batch")
        if self.test_subset is not None and self.test_subset > test_images:
            raise ConfigError(f"--test-subset {self.test_subset} is larger than the {test_images} test images")
        if self.test_subset is None and (test_images < EVAL_BATCH_SIZE or test_images % EVAL_BATCH_SIZE):
            raise ConfigError(f"the test data holds {test_images} images, not a multiple of {EVAL_BATCH_SIZE} (whole "
                              "evaluation batches): pass --test-subset")

    def with_options(self, **overrides) -> RunConfig:
        """This configuration with the given options replaced; None means 'keep', unknown names fail loudly."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown run option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict:
        return asdict(self)


def option(name: str) -> str:
    return name.replace("_", "-")


def check_integer(name: str, value, low: int, high: int | None, why: str = "") -> None:
    """A ConfigError unless `value` is an integer from `low` to `high` (None: no upper bound); `why` explains `low`."""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high):
        return
    allowed = f"from {low:,} to {high:,}" if high is not None else f"of at least {low:,}"
    raise ConfigError(f"--{option(name)} must be an integer {allowed}{f' ({why})' if why else ''}, got {value!r}")


PRESETS = {
    "full": RunConfig(),
    # The test command's preset: a short run on 2 CPU cores that still has to learn. 48 steps of 128 images reach 92.5%
    # to 95.4% on every row (32 steps: 84% on PyTorch's); 1,000 test images resolve the 90% target and the gate's one
    # point. Each row's smoke run costs ~70% of one on 4,096 images evaluated on 2,000 (the baseline until commit 0b329ea).
    "smoke": RunConfig(epochs=2, train_subset=3072, test_subset=1000, min_accuracy=0.9),
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# --- Data: normalized once, in numpy, so every framework sees bit-identical inputs --------------------------------------
class Data(NamedTuple):
    train_images: np.ndarray  # [N, 1, 28, 28] float32, normalized (NCHW; NHWC frameworks transpose once)
    train_labels: np.ndarray  # [N] int32
    test_images: np.ndarray  # [10000, 1, 28, 28] float32 (the first --test-subset only, where given)
    test_labels: np.ndarray  # [10000] int32 (as the images)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28]: scaled to [0, 1], then standardized."""
    scaled = images.astype(np.float32) / np.float32(255)
    return ((scaled - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD))[:, None, :, :]


def prepare_data(train_images, train_labels, test_images, test_labels, config: RunConfig) -> Data:
    config.check_sizes(len(train_images), len(test_images))
    n = len(train_images) if config.train_subset is None else config.train_subset
    tests = len(test_images) if config.test_subset is None else config.test_subset
    return Data(normalize(train_images[:n]), train_labels[:n].astype(np.int32),
                normalize(test_images[:tests]), test_labels[:tests].astype(np.int32))


def nhwc(images: np.ndarray) -> np.ndarray:
    """The contract's NCHW images in the channels-last layout of TensorFlow and Haiku."""
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    return num_train // batch_size  # the last partial batch is dropped: shapes stay static


def epoch_batches(seed: int, epoch: int, num_train: int, batch_size: int) -> np.ndarray:
    """[steps, batch_size] training indices of one epoch: the same permutation in every framework."""
    order = np.random.default_rng([seed, epoch]).permutation(num_train)
    steps = steps_per_epoch(num_train, batch_size)
    return order[: steps * batch_size].reshape(steps, batch_size)


def replica_shard(size: int, replica: int, replicas: int) -> slice:
    """The contiguous part of a batch (or of the test set) that one data-parallel replica takes: replica 0 the first."""
    return slice(replica * size // replicas, (replica + 1) * size // replicas)


class JobProcess(NamedTuple):
    """This process's place in a multi-process data-parallel job (one replica per process), as torchrun's environment
    variables say: torchrun sets them; for the JAX and TensorFlow engines, a scheduler or the user does (README)."""

    rank: int = 0  # RANK: this process's replica, 0 the first
    processes: int = 1  # WORLD_SIZE
    local_rank: int = 0  # LOCAL_RANK: its index among the processes of its machine (which GPU it takes)
    coordinator: str | None = None  # "MASTER_ADDR:MASTER_PORT": where rank 0 listens for the others


def job_process(config: RunConfig | None = None) -> JobProcess:
    """This process's JobProcess; a ConfigError names a variable that is missing or not a number, or, given the run's
    `config`, a job whose size is not its --replicas (one replica per process)."""
    environment = os.environ
    try:
        processes = int(environment.get("WORLD_SIZE", 1))
        rank, local_rank = int(environment.get("RANK", 0)), int(environment.get("LOCAL_RANK", 0))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun's variables); got "
                          + ", ".join(f"{name}={environment.get(name)!r}" for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
                          ) from None
    if processes < 1 or not 0 <= rank < processes:
        raise ConfigError(f"RANK={rank} of WORLD_SIZE={processes}: the ranks of a job run from 0 to WORLD_SIZE - 1")
    address, port = environment.get("MASTER_ADDR"), environment.get("MASTER_PORT")
    if processes > 1 and not (address and port):
        raise ConfigError(f"WORLD_SIZE={processes} needs MASTER_ADDR and MASTER_PORT: rank 0's host and a free port "
                          "on it, the same for every process of the job")
    if config is not None and processes > 1 and config.replicas != processes:
        raise ConfigError(f"--replicas {config.replicas}: this process is RANK={rank} of a job of WORLD_SIZE={processes}, "
                          f"one replica per process; pass --replicas {processes}")
    return JobProcess(rank, processes, local_rank, f"{address}:{port}" if processes > 1 else None)


def label_digest(labels) -> str:
    """Order-sensitive fingerprint of a label sequence: proves which batches a framework consumed, in which order."""
    return hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


# --- Learning-rate schedule: one pure function of the step ---------------------------------------------------------
def peak_learning_rate(batch_size: int) -> float:
    return PEAK_LEARNING_RATE_PER_256_IMAGES * batch_size / 256


def learning_rate(steps: np.ndarray, total_steps: int, peak: float) -> np.ndarray:
    """Linear warm-up to the peak over the first 10% of steps, then linear decay towards zero (airbench's triangle).

    Piecewise linear, so that every framework can evaluate it exactly; step 0 already trains (peak / warmup_steps), the
    peak is reached at the last warm-up step and the last step still trains (peak / (decay steps + 1)). float64.
    """
    warmup_steps = max(1, math.ceil(WARMUP_FRACTION * total_steps))
    steps = np.asarray(steps, dtype=np.float64)
    return np.where(steps < warmup_steps, peak * (steps + 1) / warmup_steps,
                    peak * (total_steps - steps) / (total_steps - warmup_steps + 1))


def learning_rate_table(config: RunConfig, num_train: int) -> np.ndarray:
    """float32 learning rate of every step of the run: what each framework's schedule looks up by step."""
    total = config.epochs * steps_per_epoch(num_train, config.batch_size)
    return learning_rate(np.arange(total), total, peak_learning_rate(config.batch_size)).astype(np.float32)


# --- Canonical weights: PyTorch's names and layouts -----------------------------------------------------------------
Weights = dict  # name -> np.ndarray float32; OIHW convolutions, [out, in] linear, BatchNorm weight/bias/running stats
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def canonical_shapes() -> dict[str, tuple[int, ...]]:
    """Every canonical tensor in torchvision's state_dict order (without BatchNorm's num_batches_tracked)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, out_ch, in_ch, k):
        shapes[f"{name}.weight"] = (out_ch, in_ch, k, k)

    def batchnorm(name, ch):
        for f in BN_FIELDS:
            shapes[f"{name}.{f}"] = (ch,)

    conv("conv1", STAGE_WIDTHS[0], 1, 7)
    batchnorm("bn1", STAGE_WIDTHS[0])
    in_ch = STAGE_WIDTHS[0]
    for stage, (width, blocks) in enumerate(zip(STAGE_WIDTHS, BLOCKS_PER_STAGE), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            conv(f"{prefix}.conv1", width, in_ch, 3)
            batchnorm(f"{prefix}.bn1", width)
            conv(f"{prefix}.conv2", width, width, 3)
            batchnorm(f"{prefix}.bn2", width)
            if block == 0 and stage > 1:
                conv(f"{prefix}.downsample.0", width, in_ch, 1)
                batchnorm(f"{prefix}.downsample.1", width)
            in_ch = width
    shapes["fc.weight"] = (NUM_CLASSES, STAGE_WIDTHS[-1])
    shapes["fc.bias"] = (NUM_CLASSES,)
    return shapes


def is_trainable(name: str) -> bool:
    return not name.endswith(("running_mean", "running_var"))


def trainable_parameter_count(weights: Weights) -> int:
    return sum(int(np.prod(w.shape)) for name, w in weights.items() if is_trainable(name))


def initial_weights(seed: int) -> Weights:
    """torchvision's ResNet initialization, drawn with numpy: every framework starts from these exact values.

    Convolutions: kaiming normal, fan_out, gain sqrt(2); BatchNorm: weight 1, bias 0, running mean 0, variance 1;
    linear: PyTorch's default, uniform(+-1/sqrt(fan_in)) for weight and bias.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    weights: Weights = {}
    for name, shape in canonical_shapes().items():
        if len(shape) == 4:  # convolution, OIHW
            fan_out = shape[0] * shape[2] * shape[3]
            weights[name] = rng.normal(0.0, math.sqrt(2.0 / fan_out), shape)
        elif name.startswith("fc."):
            bound = 1.0 / math.sqrt(STAGE_WIDTHS[-1])
            weights[name] = rng.uniform(-bound, bound, shape)
        elif name.endswith(("weight", "running_var")):
            weights[name] = np.ones(shape)
        else:
            weights[name] = np.zeros(shape)
    return {name: w.astype(np.float32) for name, w in weights.items()}


def check_weights(weights: Weights, source: str = "weights") -> Weights:
    """The weights, as float32 arrays, if they are complete canonical ResNet18 weights; else a ConfigError saying why."""
    expected = canonical_shapes()
    missing = [n for n in expected if n not in weights]
    unexpected = [n for n in weights if n not in expected]
    if missing or unexpected:
        raise ConfigError(f"{source}: not canonical ResNet18 weights; missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                          f" unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    checked = {}
    for name, shape in expected.items():
        array = np.asarray(weights[name])
        if array.shape != shape:
            raise ConfigError(f"{source}: {name} has shape {array.shape}, expected {shape} (PyTorch layout: OIHW, [out, in])")
        if not np.all(np.isfinite(array)):
            raise ConfigError(f"{source}: {name} holds NaN or infinite values")
        checked[name] = array.astype(np.float32)
    return checked


def to_channels_last(array: np.ndarray) -> np.ndarray:
    """A canonical tensor in TensorFlow's and Haiku's layouts: convolution OIHW -> HWIO, linear [out, in] -> [in, out]."""
    if array.ndim == 4:
        array = array.transpose(2, 3, 1, 0)
    elif array.ndim == 2:
        array = array.T
    return np.ascontiguousarray(array, dtype=np.float32)


def from_channels_last(array: np.ndarray) -> np.ndarray:
    """to_channels_last's inverse: HWIO -> OIHW, [in, out] -> [out, in]."""
    if array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)
    elif array.ndim == 2:
        array = array.T
    return np.ascontiguousarray(array, dtype=np.float32)


# --- The trainer every framework implements --------------------------------------------------------------------------
class EpochResult(NamedTuple):
    mean_loss: float
    images: int  # images trained on
    seconds: float  # the epoch as the trainer timed it, after its synchronizing read: the harness's overhead is the rest
    label_digest: str  # label_digest() of the labels the epoch's steps consumed


class Evaluation(NamedTuple):
    loss: float
    accuracy: float  # fraction of the test images (all 10,000, or --test-subset's)


class EpochProgress(NamedTuple):
    """How far the epoch in progress has come: what a trainer reports from inside its loop."""

    steps_done: int
    steps: int
    images_done: int
    seconds: float  # since the epoch started


PROGRESS_INTERVAL_S = 5.0  # by default, at most one report, and one device synchronization for it, this often


class ProgressMeter:
    """An epoch's progress, reported at most every `interval_s`: a page calls step() after each step it runs.

    Between reports a call costs one clock read. A report first waits, through `wait`, for the device to finish the
    steps it counts (JAX and CUDA run ahead of Python): one synchronization every few seconds, not one per step.
    """

    def __init__(self, report: Callable[[EpochProgress], None] | None, steps: int, batch_size: int,
                 interval_s: float = PROGRESS_INTERVAL_S):
        self.report, self.steps, self.batch_size, self.interval_s = report, steps, batch_size, interval_s
        self.start = time.perf_counter()
        self.next_report = self.start + interval_s if report and interval_s > 0 else math.inf

    def step(self, steps_done: int, wait: Callable[[], object] | None = None) -> None:
        if time.perf_counter() < self.next_report:
            return
        if wait is not None:
            wait()
        now = time.perf_counter()
        self.report(EpochProgress(steps_done, self.steps, steps_done * self.batch_size, now - self.start))
        self.next_report = now + self.interval_s


WARMUP_STEPS = 3  # what the warm-up trains before the timed epochs: their first steps, through their own path


def recipe() -> dict:
    """The recipe's constants and the model's widths, for a page in another language to hand to its program (rather
    than restate them): change one here, and every row follows."""
    return {"bn_epsilon": BN_EPSILON, "bn_momentum": BN_MOMENTUM, "sgd_momentum": SGD_MOMENTUM,
            "stage_widths": list(STAGE_WIDTHS), "num_classes": NUM_CLASSES}


@dataclass
class Trainer(abc.ABC):
    """One framework's training of the shared recipe; the benchmark worker drives it through these methods only.

    `__init__` builds the model from `weights` and moves `data` to the device once. Steps are counted from 0 from the
    last import_weights(); each step's learning rate is `schedule[step]`. The harness names the run (the registry's
    name, or --framework-module's): a trainer does not name itself. The methods below come in the order of the page's
    sections (PAGE_MEMBERS), where each page defines them too.
    """

    config: RunConfig
    data: Data
    weights: Weights
    schedule: np.ndarray = field(init=False)
    report_progress: Callable[[EpochProgress], None] | None = field(default=None, init=False)  # set by the harness
    progress_interval_s: float = field(default=PROGRESS_INTERVAL_S, init=False)  # and how often it listens
    # The framework's data-parallel engine, in a few words (e.g. "jax.sharding: jit over a device mesh"); None: the
    # trainer runs on one device only and refuses --replicas above 1.
    data_parallel: ClassVar[str | None] = None

    def __post_init__(self):
        if self.config.replicas > 1 and not self.data_parallel:
            raise Unsupported(f"--replicas {self.config.replicas}: {type(self).__name__} has no data-parallel engine; "
                              "it runs with --replicas 1 only")
        self.schedule = learning_rate_table(self.config, len(self.data.train_labels))
        self.build(self.weights)

    # State
    @abc.abstractmethod
    def build(self, weights: Weights) -> None:
        """Create model, optimizer and device data; start from `weights`."""

    @abc.abstractmethod
    def environment(self) -> dict:
        """{"framework_version": ..., "device": human-readable device name}; with replicas, also "devices" (one name
        per replica) and "threads_per_replica" (the compute threads each replica may use). Plain data only."""

    @abc.abstractmethod
    def memory_peak_bytes(self) -> int | None:
        """The framework allocator's peak device memory; None where the allocator does not report one (CPU)."""

    @abc.abstractmethod
    def trainable_parameters(self) -> int:
        """The framework's own count of the model's trainable parameters (TRAINABLE_PARAMETERS, if it is the model)."""

    # Train step: a page's own `train_step(images, labels)` is one SGD step on a device-resident batch
    @abc.abstractmethod
    def train_on_batch(self, images: np.ndarray, labels: np.ndarray) -> float:
        """One SGD step on a host batch ([B, 1, 28, 28] normalized, [B]) at the current step's learning rate, through
        the same step the epochs run (as Keras' train_on_batch); the loss."""

    @abc.abstractmethod
    def learning_rates(self, steps: np.ndarray) -> np.ndarray:
        """The learning rate the framework's own schedule mechanism gives at each of `steps`."""

    # Epoch
    def epoch_batches(self, epoch: int) -> np.ndarray:
        """[steps, batch_size] indices into the training data, in the order every framework trains on them."""
        return epoch_batches(self.config.seed, epoch, len(self.data.train_labels), self.config.batch_size)

    def progress_meter(self, batches: np.ndarray) -> ProgressMeter:
        """The meter of a run over `batches`: its step() reports to the harness, when one listens."""
        return ProgressMeter(self.report_progress, len(batches), batches.shape[1], self.progress_interval_s)

    def train_epoch(self, epoch: int) -> EpochResult:
        """One epoch: what the harness times."""
        return self.train_batches(self.epoch_batches(epoch))

    @abc.abstractmethod
    def train_batches(self, batches: np.ndarray) -> EpochResult:
        """Train on `batches` ([steps, batch_size] indices into the device-resident training data), in order, calling
        progress_meter(batches).step() after each step; synchronized before it returns."""

    def warm_up(self) -> None:
        """Compile and trace on exactly what the timed epochs run, outside their timer: the epoch's own path over its
        first WARMUP_STEPS batches (the same layouts, strides, dtypes and shapes), and one evaluation; then the initial
        state again."""
        self.train_batches(self.epoch_batches(0)[:WARMUP_STEPS])
        self.evaluate()
        self.import_weights(self.weights)

    # Evaluation: a page's own `eval_step(images, labels)` is one device-resident evaluation batch's summed loss and
    # correct count
    @abc.abstractmethod
    def evaluate(self) -> Evaluation:
        """Eval-mode loss and accuracy on all test images, EVAL_BATCH_SIZE at a time."""

    @abc.abstractmethod
    def logits(self, images: np.ndarray, train: bool) -> np.ndarray:
        """[B, 10] logits of a host batch; train=True normalizes with batch statistics, as a training forward pass does
        (it may update the BatchNorm running statistics too: callers that care import weights afterwards)."""

    # Canonical weights
    @abc.abstractmethod
    def import_weights(self, weights: Weights) -> None:
        """Start afresh from canonical `weights` (checked with check_weights, which names what is wrong): model and
        BatchNorm statistics set, optimizer state zeroed, step 0."""

    @abc.abstractmethod
    def export_weights(self) -> Weights:
        """The current model as canonical weights (numpy float32, PyTorch names and layouts)."""


# --- Work per image: what model FLOPs utilization divides by the machine's measured peak ---------------------------
# Convolutions and the linear layer by the direct method, a multiply-add counted as 2 FLOPs (torch's FlopCounterMode's
# convention, and PaLM's MFU's), kernel taps that read padding included. Not counted: BatchNorm, ReLU, pooling, the
# residual additions, the loss and the SGD update, all linear in activations or parameters rather than in multiply-adds:
# about 1% of the total.
INPUT_SIDE = 28


def output_side(side: int, kernel: int, stride: int, padding: int) -> int:
    """The side of a square map after a convolution or pooling window (floor rounding, like every framework)."""
    return (side + 2 * padding - kernel) // stride + 1


def taps_inside(side: int, kernel: int, stride: int, padding: int) -> int:
    """Along one axis, how many (output position, kernel tap) pairs read the input rather than its padding."""
    return sum(0 <= position * stride - padding + tap < side
               for position in range(output_side(side, kernel, stride, padding)) for tap in range(kernel))


def forward_multiply_adds(include_padding: bool = True) -> dict[str, int]:
    """Multiply-adds of one image's forward pass in each convolution and the linear layer, by canonical weight name.

    include_padding=False counts only the taps that read the image: what a convolution that skips padding multiplies.
    On MNIST's small maps that is about half the direct method's count (layer4's 3x3 kernels see a 1x1 map: 1 tap of 9).
    """
    counts: dict[str, int] = {}

    def conv(name: str, in_ch: int, out_ch: int, kernel: int, stride: int, side: int) -> int:
        padding = kernel // 2  # torchvision's: 3 for the 7x7 stem, 1 for 3x3, 0 for the 1x1 shortcut
        out_side = output_side(side, kernel, stride, padding)
        taps = out_side * kernel if include_padding else taps_inside(side, kernel, stride, padding)
        counts[f"{name}.weight"] = taps * taps * out_ch * in_ch
        return out_side

    side = conv("conv1", 1, STAGE_WIDTHS[0], 7, 2, INPUT_SIDE)
    side = output_side(side, kernel=3, stride=2, padding=1)  # max pooling
    in_ch = STAGE_WIDTHS[0]
    for stage, (width, blocks) in enumerate(zip(STAGE_WIDTHS, BLOCKS_PER_STAGE), start=1):
        for block in range(blocks):
            prefix, stride, block_input_side = f"layer{stage}.{block}", 2 if block == 0 and stage > 1 else 1, side
            side = conv(f"{prefix}.conv1", in_ch, width, 3, stride, block_input_side)
            side = conv(f"{prefix}.conv2", width, width, 3, 1, side)
            if block == 0 and stage > 1:
                conv(f"{prefix}.downsample.0", in_ch, width, 1, stride, block_input_side)
            in_ch = width
    counts["fc.weight"] = STAGE_WIDTHS[-1] * NUM_CLASSES  # after global average pooling: one 512-vector per image
    return counts


def forward_flops_per_image() -> int:
    return 2 * sum(forward_multiply_adds().values())


def training_flops_per_image() -> int:
    """Forward, then backward's two products per layer, each as many multiply-adds as its forward: the gradient of the
    layer's input and that of its weights. The stem convolution's input gradient is left out: nothing needs the image's.
    """
    forward = forward_multiply_adds()
    return 2 * (3 * sum(forward.values()) - forward["conv1.weight"])
