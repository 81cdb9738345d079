"""ResNet18 on MNIST in TensorFlow with Keras 3 layers: a custom tf.function training step over device-resident data.

The PyTorch page's model, written with Keras layers in NHWC (TensorFlow's layout); where a Keras default differs from
PyTorch's (padding, BatchNorm momentum, epsilon and running variance, SGD's momentum formulation) the page says so.
A page of the Rosetta stone: the sections of contract.PAGE_SECTIONS, in order, and the names every page uses.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: keeps its C++ notices out of the log

import time

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from implementations import contract


# --- Model -----------------------------------------------------------------------------------------------------------
class Conv2d(layers.Conv2D):
    """PyTorch's Conv2d(kernel, stride, padding=kernel // 2, bias=False) on NHWC images.

    Keras' "same" pads a stride-2 convolution of an even-sized input on the bottom/right only (28 -> 14 in the stem,
    4 -> 2 and 2 -> 1 in stages 3 and 4), where PyTorch pads every side alike: those convolutions pad explicitly.
    At stride 1, and for 1x1 kernels, "same" already is PyTorch's padding.
    """

    def __init__(self, filters: int, kernel_size: int, strides: int = 1):
        explicit = strides > 1 and kernel_size > 1
        super().__init__(filters, kernel_size, strides, padding="valid" if explicit else "same", use_bias=False)
        self.explicit_padding = kernel_size // 2 if explicit else 0

    def call(self, inputs):
        p = self.explicit_padding
        return super().call(ops.pad(inputs, [[0, 0], [p, p], [p, p], [0, 0]]) if p else inputs)

    def compute_output_shape(self, input_shape):  # Keras checks the shape at build time: the padded one
        batch, height, width, channels = input_shape
        p = 2 * self.explicit_padding
        return super().compute_output_shape((batch, height + p, width + p, channels))


class BatchNorm2d(layers.BatchNormalization):
    """PyTorch's BatchNorm2d: Keras' layer in PyTorch's conventions, with PyTorch's running variance.

    Keras' momentum is the decay of the running averages, 1 - PyTorch's momentum, and its epsilon defaults to 1e-3.
    Keras also averages the biased batch variance (sum / n) into its moving variance, where PyTorch averages the
    unbiased one (sum / (n - 1)): 128/127 apart in the last stage at batch 128. So training mode runs TensorFlow's
    fused kernel, whose running variance applies the n / (n - 1) correction as PyTorch does (it is also faster, and
    on this CPU closer to PyTorch's batch statistics than Keras' unfused moments: 1e-5 against 1e-4 in the logits).
    """

    def __init__(self):
        super().__init__(momentum=1 - contract.BN_MOMENTUM, epsilon=contract.BN_EPSILON)

    def add_weight(self, *args, trainable=True, **kwargs):
        # With replicas, each updates the running statistics to the same global values: TensorFlow keeps the first's.
        if not trainable:
            kwargs.setdefault("aggregation", "only_first_replica")
        return super().add_weight(*args, trainable=trainable, **kwargs)

    def call(self, inputs, training=False):
        if not training:
            return super().call(inputs, training=False)
        replicas = tf.distribute.get_replica_context()
        if replicas is not None and replicas.num_replicas_in_sync > 1:
            return self.normalize_over_replicas(inputs, replicas)
        # Normalizes with the batch's statistics and returns the running averages updated by exponential_avg_factor,
        # which is PyTorch's momentum. Statistics, scale and offset stay float32 under mixed bf16.
        outputs, running_mean, running_var = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, self.moving_mean, self.moving_variance, epsilon=self.epsilon,
            is_training=True, exponential_avg_factor=contract.BN_MOMENTUM)
        self.moving_mean.assign(running_mean)
        self.moving_variance.assign(running_var)
        return outputs

    def normalize_over_replicas(self, inputs, replicas: tf.distribute.ReplicaContext):
        """Training mode over the global batch of all replicas: sums all-reduced across them (differentiable, so the
        backward pass sums over them too), mean first, then the variance around it. Keras' synchronized=True does the
        same but keeps the biased variance."""
        x = tf.cast(inputs, tf.float32)
        n = tf.cast(tf.size(x) // tf.shape(x)[-1] * replicas.num_replicas_in_sync, tf.float32)
        mean = replicas.all_reduce("SUM", tf.reduce_sum(x, axis=(0, 1, 2))) / n
        var = replicas.all_reduce("SUM", tf.reduce_sum(tf.square(x - mean), axis=(0, 1, 2))) / n
        self.moving_mean.assign((1 - contract.BN_MOMENTUM) * self.moving_mean + contract.BN_MOMENTUM * mean)
        self.moving_variance.assign((1 - contract.BN_MOMENTUM) * self.moving_variance
                                    + contract.BN_MOMENTUM * var * n / (n - 1))
        outputs = tf.nn.batch_normalization(x, mean, var, self.beta, self.gamma, self.epsilon)
        return tf.cast(outputs, inputs.dtype)


class BasicBlock(keras.layers.Layer):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = Conv2d(out_channels, 3, stride)
        self.bn1 = BatchNorm2d()
        self.conv2 = Conv2d(out_channels, 3)
        self.bn2 = BatchNorm2d()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = [Conv2d(out_channels, 1, stride), BatchNorm2d()]  # indexed as PyTorch's Sequential

    def call(self, x, training=False):
        shortcut = x
        if self.downsample is not None:
            conv, bn = self.downsample
            shortcut = bn(conv(x), training=training)
        out = ops.relu(self.bn1(self.conv1(x), training=training))
        out = self.bn2(self.conv2(out), training=training)
        return ops.relu(out + shortcut)


class ResNet18(keras.Model):
    def __init__(self):
        super().__init__()
        widths = contract.STAGE_WIDTHS
        self.conv1 = Conv2d(widths[0], 7, 2)
        self.bn1 = BatchNorm2d()
        # PyTorch's MaxPool2d(3, 2, padding=1) pads with -inf; zeros are equivalent here, after a ReLU: every window
        # holds a value >= 0, and a pad can only tie with a zero, whose ReLU passes no gradient either way.
        # ("same" would pad bottom/right only, as for the convolutions.)
        self.maxpool = keras.Sequential([layers.ZeroPadding2D(1), layers.MaxPool2D(3, 2)])
        in_channels = widths[0]
        for stage, (width, blocks) in enumerate(zip(widths, contract.BLOCKS_PER_STAGE), start=1):
            stride = 1 if stage == 1 else 2
            layer = [BasicBlock(in_channels if b == 0 else width, width, stride if b == 0 else 1)
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
def select_devices(config: contract.RunConfig) -> list[str]:
    """Configure TensorFlow's devices (before its first op, which fixes them) and name this process's, one per replica.
    In a job of several processes (contract.JobProcess), one replica per process: this process's device only."""
    job = contract.job_process(config)
    if job.processes > 1:
        check_cluster(job)
    gpus = tf.config.list_physical_devices("GPU")
    if config.device == "cuda" and not gpus:
        raise contract.ConfigError("--device cuda: TensorFlow sees no GPU (tensorflow-cpu, or CUDA libraries missing: "
                                   "pip install 'tensorflow[and-cuda]'); use --device cpu")
    tf.config.experimental.enable_tensor_float_32_execution(config.allow_tf32)  # GPUs only; TF's default: on
    local_replicas = config.replicas // job.processes
    if config.device == "cpu" or not gpus:
        tf.config.set_visible_devices([], "GPU")
        if local_replicas > 1:  # the CPU as N logical devices, which share its thread pools
            [cpu] = tf.config.list_physical_devices("CPU")
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * local_replicas)
        return [f"/CPU:{index}" for index in range(local_replicas)]
    if job.processes > 1:  # this process's GPU, as torchrun's ranks take them
        gpus = gpus[job.local_rank:job.local_rank + 1]
        tf.config.set_visible_devices(gpus, "GPU")
    if len(gpus) < local_replicas:
        raise contract.ConfigError(f"--replicas {config.replicas}: TensorFlow sees {len(gpus)} GPU(s); lower --replicas")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)  # allocate as needed, not the whole card up front
    return [f"/GPU:{index}" for index in range(local_replicas)]


def check_cluster(job: contract.JobProcess) -> None:
    """MultiWorkerMirroredStrategy reads its cluster from TF_CONFIG: it must name this process as worker RANK of
    WORLD_SIZE workers, or the replicas would take other shards of the batch than the contract's."""
    try:
        cluster = json.loads(os.environ["TF_CONFIG"])
        workers, index = cluster["cluster"]["worker"], cluster["task"]["index"]
    except (KeyError, TypeError, ValueError):
        raise contract.ConfigError(
            f"WORLD_SIZE={job.processes}: TensorFlow's MultiWorkerMirroredStrategy needs TF_CONFIG on every process, as "
            'JSON: {"cluster": {"worker": ["host0:port", "host1:port", ...]}, "task": {"type": "worker", "index": RANK}}'
            ' (README, "Across processes and machines")') from None
    if len(workers) != job.processes or index != job.rank:
        raise contract.ConfigError(f"TF_CONFIG names {len(workers)} worker(s) and this process as index {index!r}, but "
                                   f"it is RANK={job.rank} of WORLD_SIZE={job.processes}: make them agree")


def data_parallel_strategy(devices: list[str]) -> tf.distribute.Strategy:
    """tf.distribute.MirroredStrategy: variables mirrored on every device; each replica runs the step on its shard of
    the batch, the optimizer sums their gradients (all-reduce) and BatchNorm2d all-reduces its statistics. In a job of
    several processes, MultiWorkerMirroredStrategy: the same, its collectives between the processes of TF_CONFIG. On
    one device, TensorFlow's default strategy, under which strategy.run is a plain call."""
    if contract.job_process().processes > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy(devices) if len(devices) > 1 else tf.distribute.get_strategy()


class TableSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The contract's learning-rate table, looked up at the optimizer's step counter."""

    def __init__(self, table: np.ndarray):
        self.table = tf.constant(table)

    def __call__(self, step):
        return tf.gather(self.table, step)


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
        buffer = self.momentum_buffers[self._get_variable_index(variable)]
        self.assign(buffer, contract.SGD_MOMENTUM * buffer + gradient)
        self.assign_sub(variable, learning_rate * buffer)


class KerasTrainer(contract.Trainer):
    data_parallel = "tf.distribute.MirroredStrategy"

    def build(self, weights):
        self.devices = select_devices(self.config)
        self.device = self.devices[0]
        self.strategy = data_parallel_strategy(self.devices)
        # bf16: Keras' mixed precision, bf16 compute with float32 variables, as torch.autocast does.
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if self.config.precision == "bf16" else "float32")
        with tf.device(self.device), self.strategy.scope():
            self.model = ResNet18()
            self.model(tf.zeros([1, 28, 28, 1]))  # creates the variables; import_weights() sets them
            self.learning_rate = TableSchedule(self.schedule)
            self.optimizer = SGD(self.learning_rate)
            self.optimizer.build(self.model.trainable_variables)
            # The whole dataset lives on the device, NHWC; an epoch only gathers from it.
            self.train_images = tf.constant(contract.nhwc(self.data.train_images))
            self.train_labels = tf.constant(self.data.train_labels)
            self.test_images = tf.constant(contract.nhwc(self.data.test_images))
            self.test_labels = tf.constant(self.data.test_labels)
        # The steps compiled in place, as @tf.function would, with the run's jit_compile: one graph each, traced once.
        # XLA when asked: much slower on this CPU (40-120 against ~700 images/s), often the faster one on GPUs.
        self.device_train_step = tf.function(self.device_train_step, jit_compile=self.config.compile)
        self.device_eval_step = tf.function(self.device_eval_step, jit_compile=self.config.compile)
        self.import_weights(weights)

    def environment(self):
        replicas = self.strategy.num_replicas_in_sync  # in a job, all processes' (this one names its own devices)
        names = ["CPU"] * replicas
        if self.device != "/CPU:0":
            gpus = tf.config.get_visible_devices("GPU")[:len(self.devices)]
            names = [tf.config.experimental.get_device_details(gpu)["device_name"] for gpu in gpus]
            names *= replicas // len(names)
        environment = {"framework_version": tf.__version__, "device": names[0]}
        if replicas > 1:  # logical CPU devices (or each process of a job) use TensorFlow's thread pools of every core
            threads = len(os.sched_getaffinity(0)) if self.device == "/CPU:0" else None
            environment |= {"devices": names, "threads_per_replica": threads}
        return environment

    def memory_peak_bytes(self):
        return None if self.device == "/CPU:0" else tf.config.experimental.get_memory_info("GPU:0")["peak"]

    # --- Train step --------------------------------------------------------------------------------------------------
    def device_train_step(self, images, labels):  # traced once by tf.function (build): one graph, no Python inside
        losses = self.strategy.run(self.replica_train_step, args=(images, labels))
        return self.strategy.reduce("SUM", losses, axis=None)  # stays on the device: no sync per step

    def replica_train_step(self, images, labels):
        """One replica's part of the step: its shard of the batch, its share of the batch's mean loss."""
        replicas = tf.distribute.get_replica_context()
        batch_size = labels.shape[0]
        shard = contract.replica_shard(batch_size, replicas.replica_id_in_sync_group, replicas.num_replicas_in_sync)
        with tf.GradientTape() as tape:
            logits = self.model(images[shard], training=True)
            loss = ops.sum(ops.sparse_categorical_crossentropy(labels[shard], logits, from_logits=True)) / batch_size
        gradients = tape.gradient(loss, self.model.trainable_variables)
        # Summed over the replicas (all-reduce), then applied at schedule[step], then step += 1.
        self.optimizer.apply(gradients, self.model.trainable_variables)
        return loss

    def train_step(self, images, labels):
        with tf.device(self.device):
            return float(self.device_train_step(tf.constant(contract.nhwc(images)), tf.constant(labels)))

    def learning_rates(self, steps):
        with tf.device(self.device):
            return self.learning_rate(tf.constant(steps)).numpy()

    # --- Epoch -------------------------------------------------------------------------------------------------------
    # A Python loop over the compiled step, as on the PyTorch page: the step is the one train_step runs, and one
    # tf.function holding the whole epoch in a while loop measured slower on this CPU (~335 against 500-670 images/s).
    def train_epoch(self, epoch):
        start = time.perf_counter()
        batches = self.epoch_batches(epoch)
        losses, consumed = [], []
        with tf.device(self.device):
            for indices in tf.constant(batches):
                labels = tf.gather(self.train_labels, indices)
                losses.append(self.device_train_step(tf.gather(self.train_images, indices), labels))
                consumed.append(labels)
            mean_loss = float(tf.reduce_mean(tf.stack(losses)))  # float() waits for the device: the time is real
        seconds = time.perf_counter() - start
        digest = contract.label_digest(tf.concat(consumed, 0).numpy())
        return contract.EpochResult(mean_loss, batches.size, seconds, digest)

    # --- Evaluation --------------------------------------------------------------------------------------------------
    def device_eval_step(self, images, labels):
        logits = self.model(images, training=False)
        loss_sum = ops.sum(ops.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        return loss_sum, ops.sum(ops.cast(ops.argmax(logits, axis=1) == labels, "int32"))

    def evaluate(self):
        loss_sum = correct = 0
        with tf.device(self.device):
            for start in range(0, len(self.data.test_labels), contract.EVAL_BATCH_SIZE):
                batch = slice(start, start + contract.EVAL_BATCH_SIZE)
                batch_loss, batch_correct = self.device_eval_step(self.test_images[batch], self.test_labels[batch])
                loss_sum, correct = loss_sum + batch_loss, correct + batch_correct  # device scalars: no sync per batch
        n = len(self.data.test_labels)
        return contract.Evaluation(float(loss_sum) / n, int(correct) / n)  # the one host read

    def logits(self, images, train):
        with tf.device(self.device):
            return self.model(tf.constant(contract.nhwc(images)), training=train).numpy()

    # --- Canonical weights -------------------------------------------------------------------------------------------
    # Canonical names are PyTorch module paths, which the Keras model's attributes follow ("layer2.0.downsample.1").
    def import_weights(self, weights):
        import_canonical(self.model, weights)
        for buffer in self.optimizer.momentum_buffers:  # zeroed in place: the traced step holds these variables
            buffer.assign(tf.zeros_like(buffer))
        self.optimizer.iterations.assign(0)

    def export_weights(self):
        return export_canonical(self.model)


def import_canonical(model: ResNet18, weights: contract.Weights) -> None:
    for name, array in contract.check_weights(weights).items():
        keras_variable(model, name).assign(contract.to_channels_last(array))


def export_canonical(model: ResNet18) -> contract.Weights:
    return {name: contract.from_channels_last(keras_variable(model, name).numpy())
            for name in contract.canonical_shapes()}


KERAS_BATCHNORM = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def keras_variable(model: ResNet18, name: str):
    """The Keras variable behind a canonical name, e.g. "layer2.0.downsample.1.running_var"."""
    path, _, field = name.rpartition(".")
    layer = model
    for part in path.split("."):
        layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
    if isinstance(layer, BatchNorm2d):
        return getattr(layer, KERAS_BATCHNORM[field])
    return layer.kernel if field == "weight" else layer.bias
