"""ResNet18 on MNIST in TensorFlow: the Keras 3 page's model, trained by a tf.function step with a GradientTape.

What TensorFlow users write beside Keras' `fit`: the Keras 3 page's ResNet18 and optimizer (NHWC, PyTorch's padding,
momentum formulation and BatchNorm conventions, said there), with TensorFlow's own fused BatchNorm kernel, a custom
training step compiled by tf.function (XLA with --compile) over device-resident data, and tf.distribute for replicas.
A page of the Rosetta stone: the sections of contract.PAGE_SECTIONS, in order, and the names every page uses.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: keeps its C++ notices out of the log

import math
import time

import keras
import tensorflow as tf
from keras import ops

from implementations import contract
from implementations.keras3 import trainer as keras3


# --- Model -----------------------------------------------------------------------------------------------------------
class BatchNorm2d(keras3.BatchNorm2d):
    """The Keras 3 page's BatchNorm2d (PyTorch's conventions), training with TensorFlow's fused kernel, whose running
    variance applies the n / (n - 1) correction as PyTorch does (it is also faster, and on this CPU closer to PyTorch's
    batch statistics than Keras' unfused moments: 1e-5 against 1e-4 in the logits), and over the global batch of all
    replicas."""

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


class TensorFlowTrainer(contract.Trainer):
    data_parallel = "tf.distribute.MirroredStrategy"

    def build(self, weights):
        self.devices = select_devices(self.config)
        self.device = self.devices[0]
        self.strategy = data_parallel_strategy(self.devices)
        # bf16: Keras' mixed precision, bf16 compute with float32 variables, as torch.autocast does.
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if self.config.precision == "bf16" else "float32")
        with tf.device(self.device), self.strategy.scope():
            self.model = keras3.ResNet18(batchnorm=BatchNorm2d)
            self.model(tf.zeros([1, 28, 28, 1]))  # creates the variables; import_weights() sets them
            self.learning_rate = keras3.TableSchedule(self.schedule)
            self.optimizer = keras3.SGD(self.learning_rate)
            self.optimizer.build(self.model.trainable_variables)
            # The whole dataset lives on the device, NHWC; an epoch only gathers from it.
            self.train_images = tf.constant(contract.nhwc(self.data.train_images))
            self.train_labels = tf.constant(self.data.train_labels)
            self.test_images = tf.constant(contract.nhwc(self.data.test_images))
            self.test_labels = tf.constant(self.data.test_labels)
        # The steps compiled in place, as @tf.function would, with the run's jit_compile: one graph each, traced once.
        # XLA when asked: much slower on this CPU (40-120 against ~700 images/s), often the faster one on GPUs.
        self.train_step = tf.function(self.train_step, jit_compile=self.config.compile)
        self.eval_step = tf.function(self.eval_step, jit_compile=self.config.compile)
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

    def trainable_parameters(self):
        return sum(math.prod(variable.shape) for variable in self.model.trainable_weights)

    # --- Train step --------------------------------------------------------------------------------------------------
    def train_step(self, images, labels):  # traced once by tf.function (build): one graph, no Python inside
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

    def train_on_batch(self, images, labels):
        with tf.device(self.device):
            return float(self.train_step(tf.constant(contract.nhwc(images)), tf.constant(labels)))

    def learning_rates(self, steps):
        with tf.device(self.device):
            return self.learning_rate(tf.constant(steps)).numpy()

    # --- Epoch -------------------------------------------------------------------------------------------------------
    # A Python loop over the compiled step, as on the PyTorch page: the step is the one train_on_batch runs, and one
    # tf.function holding the whole epoch in a while loop measured slower on this CPU (~335 against 500-670 images/s).
    def train_batches(self, batches):
        start = time.perf_counter()
        losses, consumed, progress = [], [], self.progress_meter(batches)
        with tf.device(self.device):
            for step, indices in enumerate(tf.constant(batches), start=1):
                labels = tf.gather(self.train_labels, indices)
                losses.append(self.train_step(tf.gather(self.train_images, indices), labels))
                consumed.append(labels)
                progress.step(step, wait=losses[-1].numpy)
            mean_loss = float(tf.reduce_mean(tf.stack(losses)))  # float() waits for the device: the time is real
        seconds = time.perf_counter() - start
        digest = contract.label_digest(tf.concat(consumed, 0).numpy())
        return contract.EpochResult(mean_loss, batches.size, seconds, digest)

    # --- Evaluation --------------------------------------------------------------------------------------------------
    def eval_step(self, images, labels):
        logits = self.model(images, training=False)
        loss_sum = ops.sum(ops.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        return loss_sum, ops.sum(ops.cast(ops.argmax(logits, axis=1) == labels, "int32"))

    def evaluate(self):
        loss_sum = correct = 0
        with tf.device(self.device):
            for start in range(0, len(self.data.test_labels), contract.EVAL_BATCH_SIZE):
                batch = slice(start, start + contract.EVAL_BATCH_SIZE)
                batch_loss, batch_correct = self.eval_step(self.test_images[batch], self.test_labels[batch])
                loss_sum, correct = loss_sum + batch_loss, correct + batch_correct  # device scalars: no sync per batch
        n = len(self.data.test_labels)
        return contract.Evaluation(float(loss_sum) / n, int(correct) / n)  # the one host read

    def logits(self, images, train):
        with tf.device(self.device):
            return self.model(tf.constant(contract.nhwc(images)), training=train).numpy()

    # --- Canonical weights -------------------------------------------------------------------------------------------
    # Canonical names are PyTorch module paths, which the Keras model's attributes follow ("layer2.0.downsample.1").
    def import_weights(self, weights):
        keras3.import_canonical(self.model, weights)
        for buffer in self.optimizer.momentum_buffers:  # zeroed in place: the traced step holds these variables
            buffer.assign(tf.zeros_like(buffer))
        self.optimizer.iterations.assign(0)

    def export_weights(self):
        return keras3.export_canonical(self.model)
