"""ResNet18 on MNIST in Keras 3, backend-neutral: one page that trains on JAX, PyTorch or TensorFlow.

Only `keras.layers` and `keras.ops`; the worker sets KERAS_BACKEND before Keras is imported, which picks the backend.
Training is Keras' own machinery: `compile` with the contract's loss and a PyTorch-form SGD, then `fit` over the
contract's batches, gathered from device-resident data. Where a Keras default differs from PyTorch's (padding,
BatchNorm momentum, epsilon and running variance, SGD's momentum formulation) the page says so.
Sections, in the same order in every framework: model, state, train step, epoch, evaluation, canonical weights.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: keeps its C++ notices out of the log
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax starts: no grab of 75% of the GPU up front
# XLA:CPU's algebraic simplifier swaps the operands of each convolution whose image is smaller than its kernel (layer3's
# 2x2 and layer4's 1x1 maps) into a form that only its naive loop emitter runs: a training step took 8x longer here.
# The Haiku page passes jax.jit's compiler_options; Keras jits its own functions, so the pass is disabled through
# XLA_FLAGS, which bind every backend from the first one's start: only where jax has no CUDA plugin (the GPU needs it).
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")
if os.environ.get("KERAS_BACKEND") == "jax" and not any(importlib.util.find_spec(plugin) for plugin in CUDA_PLUGINS):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_disable_hlo_passes=algsimp".strip()

import math
import time

import keras
import numpy as np
from keras import layers, ops

from implementations import contract


# --- Model -----------------------------------------------------------------------------------------------------------
def conv(filters: int, kernel_size: int, strides: int = 1) -> layers.Layer:
    """PyTorch's Conv2d(kernel, stride, padding=kernel // 2, bias=False) on NHWC images.

    Keras' "same" pads a stride-2 convolution of an even-sized input on the bottom/right only (28 -> 14 in the stem,
    4 -> 2 and 2 -> 1 in stages 3 and 4), where PyTorch pads every side alike: those pad explicitly, then convolve
    "valid". At stride 1, and for 1x1 kernels, "same" already is PyTorch's padding.
    """
    if strides == 1 or kernel_size == 1:
        return layers.Conv2D(filters, kernel_size, strides, padding="same", use_bias=False)
    return keras.Sequential([layers.ZeroPadding2D(kernel_size // 2),
                             layers.Conv2D(filters, kernel_size, strides, padding="valid", use_bias=False)])


class BatchNorm2d(layers.BatchNormalization):
    """PyTorch's BatchNorm2d: Keras' layer in PyTorch's conventions, with PyTorch's running variance.

    Keras' momentum is the decay of the running averages, 1 - PyTorch's momentum, and its epsilon defaults to 1e-3.
    Keras also averages the biased batch variance (sum / n) into its moving variance, where PyTorch averages the
    unbiased one (sum / (n - 1)): 128/127 apart in the last stage at batch 128. So training mode is written here;
    inference is Keras' own.
    """

    def __init__(self):
        super().__init__(momentum=1 - contract.BN_MOMENTUM, epsilon=contract.BN_EPSILON)

    def call(self, inputs, training=False):
        if not training:
            return super().call(inputs, training=False)
        x = ops.cast(inputs, "float32")  # statistics in float32, also under mixed bf16
        mean, var = ops.moments(x, axes=(0, 1, 2))
        n = ops.size(x) // ops.shape(x)[-1]
        unbiased_var = var * ops.cast(n, "float32") / ops.cast(n - 1, "float32")
        self.moving_mean.assign(self.momentum * self.moving_mean + (1 - self.momentum) * mean)
        self.moving_variance.assign(self.momentum * self.moving_variance + (1 - self.momentum) * unbiased_var)
        outputs = ops.batch_normalization(x, mean, var, axis=-1, offset=self.beta, scale=self.gamma,
                                          epsilon=self.epsilon)
        return ops.cast(outputs, inputs.dtype)


class BasicBlock(keras.layers.Layer):
    def __init__(self, in_channels: int, out_channels: int, stride: int, batchnorm: type = BatchNorm2d):
        super().__init__()
        self.conv1 = conv(out_channels, 3, stride)
        self.bn1 = batchnorm()
        self.conv2 = conv(out_channels, 3)
        self.bn2 = batchnorm()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = [conv(out_channels, 1, stride), batchnorm()]  # indexed as PyTorch's Sequential

    def call(self, x, training=False):
        shortcut = x
        if self.downsample is not None:
            downsample_conv, downsample_bn = self.downsample
            shortcut = downsample_bn(downsample_conv(x), training=training)
        out = ops.relu(self.bn1(self.conv1(x), training=training))
        out = self.bn2(self.conv2(out), training=training)
        return ops.relu(out + shortcut)


class ResNet18(keras.Model):
    """batchnorm: the BatchNorm layer (the TensorFlow page passes its fused kernel's)."""

    def __init__(self, batchnorm: type = BatchNorm2d):
        super().__init__()
        widths = contract.STAGE_WIDTHS
        self.conv1 = conv(widths[0], 7, 2)
        self.bn1 = batchnorm()
        # PyTorch's MaxPool2d(3, 2, padding=1) pads with -inf; zeros are equivalent here, after a ReLU: every window
        # holds a value >= 0, and a pad can only tie with a zero, whose ReLU passes no gradient either way.
        # ("same" would pad bottom/right only, as for the convolutions.)
        self.maxpool = keras.Sequential([layers.ZeroPadding2D(1), layers.MaxPool2D(3, 2)])
        in_channels = widths[0]
        for stage, (width, blocks) in enumerate(zip(widths, contract.BLOCKS_PER_STAGE), start=1):
            stride = 1 if stage == 1 else 2
            layer = [BasicBlock(in_channels if b == 0 else width, width, stride if b == 0 else 1, batchnorm)
                     for b in range(blocks)]
            setattr(self, f"layer{stage}", layer)
            in_channels = width
        self.fc = layers.Dense(contract.NUM_CLASSES)

    def call(self, x, training=False):  # [B, 28, 28, 1] -> [B, 10]
        x = self.maxpool(ops.relu(self.bn1(self.conv1(x), training=training)))
        for block in self.layer1 + self.layer2 + self.layer3 + self.layer4:
            x = block(x, training=training)
        return ops.cast(self.fc(ops.mean(x, axis=(1, 2))), "float32")  # float32 logits under mixed bf16 too


# --- State -----------------------------------------------------------------------------------------------------------
def gpu_available() -> bool:
    """Keras has no backend-neutral device query: each backend is asked in its own words."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        return jax.default_backend() == "gpu"
    if backend == "torch":
        import torch
        return torch.cuda.is_available()
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


def select_device(requested: str) -> str:
    """A `keras.device` name: the GPU unless --device cpu or there is none.

    No index: under "cpu:0" Keras' torch backend creates each variable as a copy (not a leaf), which gets no gradient.
    """
    if requested == "cuda" and not gpu_available():
        raise contract.ConfigError(f"--device cuda: Keras' {keras.backend.backend()} backend sees no GPU; "
                                   "use --device cpu")
    return "gpu" if requested != "cpu" and gpu_available() else "cpu"


def data_parallel_devices(device: str, replicas: int) -> list[str]:
    """Data parallel with Keras' distribution API (JAX backend): the variables replicated on every device, each batch
    split into contiguous shards along its first axis. Keras jits the step for the global batch and XLA inserts the
    all-reduces: gradients and BatchNorm's batch statistics are those of the whole batch, as on one device."""
    devices = keras.distribution.list_devices(device)
    if len(devices) < replicas:
        raise contract.ConfigError(f"--replicas {replicas}: Keras sees {len(devices)} {device} device(s); "
                                   "lower --replicas")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices[:replicas]))
    return devices[:replicas]


class TableSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The contract's learning-rate table, looked up at the optimizer's step counter."""

    def __init__(self, table: np.ndarray):
        self.table = ops.convert_to_tensor(table)

    def __call__(self, step):
        return ops.take(self.table, step)


class SGD(keras.optimizers.Optimizer):
    """PyTorch's SGD with momentum: buffer = momentum * buffer + grad; param -= lr * buffer.

    Keras' own SGD keeps velocity = momentum * velocity - lr * grad; param += velocity, which folds each step's rate
    into the velocity: the same updates at a constant rate, other ones when the schedule changes it every step.
    """

    def __init__(self, schedule: TableSchedule):
        super().__init__(learning_rate=schedule, name="sgd")

    def build(self, variables):
        super().build(variables)
        self.momentum_buffers = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        # The one non-public name: Keras' public API has no way from a variable to its slot (on TensorFlow update_step
        # gets the backend's tf.Variable, with no .path to key a dict on). _get_variable_index is what Keras documents
        # for a custom optimizer (the example in keras/src/optimizers/base_optimizer.py) and what its own SGD uses.
        buffer = self.momentum_buffers[self._get_variable_index(variable)]
        self.assign(buffer, contract.SGD_MOMENTUM * buffer + gradient)
        self.assign_sub(variable, learning_rate * buffer)


class ReportProgress(keras.callbacks.Callback):
    """fit's progress to the contract's meter, step by step. async_safe: Keras then calls it beside its loop, which
    reads no loss to the host for it."""

    async_safe = True

    def __init__(self, meter: contract.ProgressMeter):
        super().__init__()
        self.meter = meter

    def on_train_batch_end(self, batch, logs=None):
        self.meter.step(batch + 1)


class Keras3Trainer(contract.Trainer):
    # Keras' distribution API runs on the JAX backend only (its PyTorch and TensorFlow backends have none).
    data_parallel = "keras.distribution.DataParallel" if keras.backend.backend() == "jax" else None

    def build(self, weights):
        if contract.job_process().processes > 1:
            raise contract.Unsupported("a job of several processes: Keras' DataParallel feeds each process its own part "
                                       "of the input there (keras.distribution.initialize), and this page feeds global "
                                       "batches; run keras-jax on one process (--replicas N over its devices)")
        if self.config.replicas > 1:  # the CPU as N XLA host devices: set before JAX's backend starts
            import jax
            jax.config.update("jax_num_cpu_devices", self.config.replicas)
        self.device = select_device(self.config.device)
        self.devices = data_parallel_devices(self.device, self.config.replicas) if self.config.replicas > 1 else []
        # bf16: Keras' mixed precision, bf16 compute with float32 variables, as torch.autocast does.
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if self.config.precision == "bf16" else "float32")
        with keras.device(self.device):
            self.model = ResNet18()
            self.model(keras.Input((28, 28, 1)))  # a symbolic call: creates the variables, computes nothing
            self.schedule_fn = TableSchedule(self.schedule)
            self.optimizer = SGD(self.schedule_fn)
            self.optimizer.build(self.model.trainable_variables)
            # The whole dataset lives on the device, NHWC; an epoch only gathers from it.
            self.train_images = ops.convert_to_tensor(contract.nhwc(self.data.train_images))
            self.train_labels = ops.convert_to_tensor(self.data.train_labels)
            self.test_images = ops.convert_to_tensor(contract.nhwc(self.data.test_images))
            self.test_labels = ops.convert_to_tensor(self.data.test_labels)
        # Keras compiles the train, test and predict functions once: jax.jit on JAX (always: eager JAX would dispatch
        # op by op), tf.function on TensorFlow (XLA with --compile), eager PyTorch (torch.compile with --compile).
        self.model.compile(optimizer=self.optimizer,
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                           metrics=[keras.metrics.SparseCategoricalAccuracy()],
                           jit_compile=self.config.compile or keras.backend.backend() == "jax")
        self.import_weights(weights)

    def environment(self):
        backend = keras.backend.backend()
        backend_module = __import__({"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}[backend])
        device = "GPU" if self.device == "gpu" else "CPU"
        environment = {"framework_version": f"keras {keras.__version__}, {backend} {backend_module.__version__}",
                       "device": device}
        if self.devices:  # XLA:CPU's host devices share one thread pool of every core; a GPU replica is its GPU
            threads = len(os.sched_getaffinity(0)) if device == "CPU" else None
            environment |= {"devices": [device] * len(self.devices), "threads_per_replica": threads}
        return environment

    def memory_peak_bytes(self):
        return None  # Keras has no backend-neutral allocator report

    def trainable_parameters(self):
        return sum(math.prod(variable.shape) for variable in self.model.trainable_weights)

    # --- Train step --------------------------------------------------------------------------------------------------
    def train_step(self, images, labels):
        """One step of Keras' compiled train function, the one `fit` runs; its loss comes back as a float."""
        with keras.device(self.device):
            return float(self.model.train_on_batch(images, labels, return_dict=True)["loss"])

    def train_on_batch(self, images, labels):
        with keras.device(self.device):
            images, labels = ops.convert_to_tensor(contract.nhwc(images)), ops.convert_to_tensor(labels)
        return self.train_step(images, labels)

    def learning_rates(self, steps):
        with keras.device(self.device):
            return ops.convert_to_numpy(self.schedule_fn(ops.convert_to_tensor(steps)))

    # --- Epoch -------------------------------------------------------------------------------------------------------
    def train_batches(self, batches):
        start, consumed = time.perf_counter(), []

        def device_batches():  # gathered on the device from the resident data, in the contract's order
            for indices in batches:
                labels = ops.take(self.train_labels, indices, axis=0)
                consumed.append(labels)
                yield ops.take(self.train_images, indices, axis=0), labels

        with keras.device(self.device):
            history = self.model.fit(device_batches(), epochs=1, steps_per_epoch=len(batches), shuffle=False,
                                     verbose=0, callbacks=[ReportProgress(self.progress_meter(batches))])
        mean_loss = history.history["loss"][0]  # fit's epoch mean of the step losses: read from the device at its end
        seconds = time.perf_counter() - start
        digest = contract.label_digest(np.concatenate([ops.convert_to_numpy(labels) for labels in consumed]))
        return contract.EpochResult(float(mean_loss), batches.size, seconds, digest)

    # --- Evaluation --------------------------------------------------------------------------------------------------
    def evaluate(self):
        def test_batches():
            for start in range(0, len(self.data.test_labels), contract.EVAL_BATCH_SIZE):
                batch = slice(start, start + contract.EVAL_BATCH_SIZE)
                yield self.test_images[batch], self.test_labels[batch]

        with keras.device(self.device):
            steps = len(self.data.test_labels) // contract.EVAL_BATCH_SIZE
            loss, accuracy = self.model.evaluate(test_batches(), steps=steps, verbose=0)  # means over all the test images
        return contract.Evaluation(float(loss), float(accuracy))

    def logits(self, images, train):
        with keras.device(self.device):
            return ops.convert_to_numpy(self.model(ops.convert_to_tensor(contract.nhwc(images)), training=train))

    # --- Canonical weights -------------------------------------------------------------------------------------------
    # Canonical names are PyTorch module paths, which the Keras model's attributes follow ("layer2.0.downsample.1").
    def import_weights(self, weights):
        with keras.device(self.device):
            import_canonical(self.model, weights)
            for buffer in self.optimizer.momentum_buffers:
                buffer.assign(ops.zeros(buffer.shape, buffer.dtype))
            self.optimizer.iterations.assign(0)

    def export_weights(self):
        return export_canonical(self.model)


def import_canonical(model: ResNet18, weights: contract.Weights) -> None:
    for name, array in contract.check_weights(weights).items():
        keras_variable(model, name).assign(contract.to_channels_last(array))


def export_canonical(model: ResNet18) -> contract.Weights:
    return {name: contract.from_channels_last(ops.convert_to_numpy(keras_variable(model, name)))
            for name in contract.canonical_shapes()}


KERAS_BATCHNORM = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def keras_variable(model: ResNet18, name: str):
    """The Keras variable behind a canonical name, e.g. "layer2.0.downsample.1.running_var"."""
    path, _, field = name.rpartition(".")
    layer = model
    for part in path.split("."):
        layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
    if isinstance(layer, keras.Sequential):  # conv(): explicit padding, then the convolution
        layer = layer.layers[-1]
    if isinstance(layer, layers.BatchNormalization):
        return getattr(layer, KERAS_BATCHNORM[field])
    return layer.kernel if field == "weight" else layer.bias
