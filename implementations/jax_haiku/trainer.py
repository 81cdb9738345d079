"""ResNet18 on MNIST in JAX with Haiku and optax: the PyTorch page's model and recipe as pure, jitted functions.

The network is a plain function made into init/apply by `hk.transform_with_state` (BatchNorm statistics are Haiku
state); parameters, state and optimizer state travel explicitly in a TrainState, and every step is state in, state out.
The trainer holds the current TrainState and runs the pure steps, jitted, on it.
A page of the Rosetta stone: the sections of contract.PAGE_SECTIONS, in order, and the names every page uses.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax starts: no grab of 75% of the GPU up front

import re
import time
from functools import partial
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from implementations import contract
from implementations.jax_devices import allocator_peak_bytes, device_data, devices_environment, placement


# --- Model -----------------------------------------------------------------------------------------------------------
class BatchNorm2d(hk.Module):
    """PyTorch's BatchNorm2d, channels last.

    Not hk.BatchNorm: that keeps the biased batch variance, in moving averages that are zero-debiased by default, while
    PyTorch's running_var averages the unbiased (n / (n - 1)) variance from a plain start at mean 0, variance 1.
    """

    def __call__(self, x, is_training: bool):
        channels, dtype = x.shape[-1], x.dtype
        scale = hk.get_parameter("scale", [channels], init=jnp.ones)
        offset = hk.get_parameter("offset", [channels], init=jnp.zeros)
        running_mean = hk.get_state("mean", [channels], init=jnp.zeros)
        running_var = hk.get_state("var", [channels], init=jnp.ones)
        x = x.astype(jnp.float32)  # statistics in fp32, also when the network computes in bf16
        if is_training:
            mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
            n = x.size // channels
            momentum = contract.BN_MOMENTUM  # PyTorch's convention: the weight of the new batch (Haiku's decay is 0.9)
            hk.set_state("mean", (1 - momentum) * running_mean + momentum * mean)
            hk.set_state("var", (1 - momentum) * running_var + momentum * var * (n / (n - 1)))
        else:
            mean, var = running_mean, running_var
        return ((x - mean) * jax.lax.rsqrt(var + contract.BN_EPSILON) * scale + offset).astype(dtype)


def conv(channels: int, kernel: int, stride: int, padding: int, name: str) -> hk.Conv2D:
    # Explicit symmetric padding, as PyTorch's: "SAME" would pad stride-2 convolutions of even inputs bottom/right only.
    return hk.Conv2D(channels, kernel, stride, padding=[(padding, padding)] * 2, with_bias=False, name=name)


def max_pool(x):  # 3x3, stride 2, padding 1 with -inf, as nn.MaxPool2d (hk.max_pool knows only "SAME" and "VALID")
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


class BasicBlock(hk.Module):
    def __init__(self, channels: int, stride: int, name: str):
        super().__init__(name=name)
        self.channels, self.stride = channels, stride

    def __call__(self, x, is_training: bool):
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.channels:
            shortcut = conv(self.channels, 1, self.stride, 0, name="downsample_0")(x)
            shortcut = BatchNorm2d(name="downsample_1")(shortcut, is_training)
        out = conv(self.channels, 3, self.stride, 1, name="conv1")(x)
        out = jax.nn.relu(BatchNorm2d(name="bn1")(out, is_training))
        out = BatchNorm2d(name="bn2")(conv(self.channels, 3, 1, 1, name="conv2")(out), is_training)
        return jax.nn.relu(out + shortcut)


def resnet18(images, is_training: bool):  # [B, 28, 28, 1] -> [B, 10]
    widths = contract.STAGE_WIDTHS
    x = jax.nn.relu(BatchNorm2d(name="bn1")(conv(widths[0], 7, 2, 3, name="conv1")(images), is_training))
    x = max_pool(x)
    for stage, (width, blocks) in enumerate(zip(widths, contract.BLOCKS_PER_STAGE), start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            x = BasicBlock(width, stride, name=f"layer{stage}_{block}")(x, is_training)
    return hk.Linear(contract.NUM_CLASSES, name="fc")(x.mean(axis=(1, 2)))


model = hk.without_apply_rng(hk.transform_with_state(resnet18))  # parameters come from canonical weights, never init


def forward(params, state, images, is_training: bool, dtype):
    """bf16: the network computes on bf16 copies of the fp32 parameters and inputs; BatchNorm and the loss stay fp32."""
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    logits, state = model.apply(params, state, images.astype(dtype), is_training)
    return logits.astype(jnp.float32), state


# --- State -----------------------------------------------------------------------------------------------------------
class TrainState(NamedTuple):
    params: hk.Params  # conv1/w [7, 7, 1, 64] HWIO, ..., fc/w [512, 10], fc/b [10]; BatchNorm scale, offset [C]
    state: hk.State  # BatchNorm running statistics: mean, var [C] per layer
    opt_state: optax.OptState  # momentum buffers shaped like params; the step count that indexes the schedule


def make_optimizer(learning_rate: optax.Schedule) -> optax.GradientTransformation:
    # optax's trace is PyTorch's momentum: buf = 0.9 * buf + grad; params -= lr * buf.
    return optax.sgd(learning_rate=learning_rate, momentum=contract.SGD_MOMENTUM)


class HaikuTrainer(contract.Trainer):
    data_parallel = "jax.sharding: jit over a device mesh"

    def build(self, weights):
        self.devices, self.device, self.replicated, self.batch_sharding = placement(self.config)
        dtype = jnp.bfloat16 if self.config.precision == "bf16" else jnp.float32
        table = jnp.asarray(self.schedule)
        self.learning_rate = lambda count: table[count]  # optax's schedule: called with its step count, from 0
        self.optimizer = make_optimizer(self.learning_rate)
        # XLA:CPU's algebraic simplifier swaps the operands of each convolution whose image is smaller than its kernel
        # (the 3x3 convolutions on layer3's 2x2 and layer4's 1x1 maps) into a form that only its naive loop emitter
        # runs. Without that pass a training step takes 7x less time here (an evaluation 16x), as close to float64.
        cpu_options = {"xla_disable_hlo_passes": "algsimp"} if self.device.platform == "cpu" else None
        jit = partial(jax.jit, compiler_options=cpu_options)
        # The state is donated: XLA updates parameters and momentum in place instead of allocating new buffers.
        self.jitted_train_step = jit(partial(self.train_step, self.optimizer, dtype), donate_argnums=0,
                                     out_shardings=self.replicated)
        self.jitted_eval_step = jit(partial(self.eval_step, dtype))
        self.jitted_forward = jit(partial(forward, dtype=dtype), static_argnums=3)
        self.train_images, self.train_labels, self.test_images, self.test_labels = device_data(self.data,
                                                                                              self.replicated)
        self.import_weights(weights)

    def environment(self):
        return {"framework_version": f"jax {jax.__version__}, haiku {hk.__version__}, optax {optax.__version__}",
                **devices_environment(self.devices)}

    def memory_peak_bytes(self):
        return allocator_peak_bytes(self.device)

    def trainable_parameters(self):
        return sum(leaf.size for leaf in jax.tree.leaves(self.train_state.params))

    # --- Train step --------------------------------------------------------------------------------------------------
    @staticmethod
    def train_step(optimizer, dtype, train_state: TrainState, images, labels) -> tuple[TrainState, jax.Array]:
        """One SGD step as a pure function (the Flax examples' train_step), jitted in build(): TrainState in, TrainState
        and loss out."""
        def loss_fn(params):
            logits, state = forward(params, train_state.state, images, True, dtype)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_state.params)
        updates, opt_state = optimizer.update(grads, train_state.opt_state)
        return TrainState(optax.apply_updates(train_state.params, updates), state, opt_state), loss

    def train_on_batch(self, images, labels):
        images, labels = jax.device_put((contract.nhwc(images), labels), self.batch_sharding)
        self.train_state, loss = self.jitted_train_step(self.train_state, images, labels)
        return float(loss)

    def learning_rates(self, steps):
        return np.asarray(self.learning_rate(jnp.asarray(steps)))

    # --- Epoch -------------------------------------------------------------------------------------------------------
    def train_batches(self, batches):
        # A Python loop of jitted steps. As one lax.scan it was 19x slower per step here: XLA:CPU left the backward
        # convolutions inside the loop body in layouts that only its naive emitter runs.
        start = time.perf_counter()
        losses, consumed, progress = [], [], self.progress_meter(batches)
        for step, indices in enumerate(batches, start=1):
            indices = jax.device_put(indices, self.replicated)
            labels = self.train_labels[indices]  # gathered on the device
            images, batch_labels = jax.device_put((self.train_images[indices], labels), self.batch_sharding)
            self.train_state, loss = self.jitted_train_step(self.train_state, images, batch_labels)  # no sync per step
            losses.append(loss)
            consumed.append(labels)
            progress.step(step, wait=loss.block_until_ready)
        losses, consumed = jax.device_get((losses, consumed))  # waits for every step's loss
        jax.block_until_ready(self.train_state)  # and for the last step's update, before the clock
        seconds = time.perf_counter() - start
        return contract.EpochResult(float(np.mean(losses)), batches.size, seconds,
                                    contract.label_digest(np.concatenate(consumed)))

    # --- Evaluation --------------------------------------------------------------------------------------------------
    @staticmethod
    def eval_step(dtype, params, state, images, labels) -> tuple[jax.Array, jax.Array]:
        """Eval mode's summed loss and correct count of one batch, as a pure function jitted in build()."""
        logits, _ = forward(params, state, images, False, dtype)
        loss_sum = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
        return loss_sum, (logits.argmax(-1) == labels).sum()

    def evaluate(self):
        params, state = self.train_state.params, self.train_state.state
        loss_sum = correct = 0
        for start in range(0, len(self.data.test_labels), contract.EVAL_BATCH_SIZE):
            batch = slice(start, start + contract.EVAL_BATCH_SIZE)
            batch_loss, batch_correct = self.jitted_eval_step(params, state, self.test_images[batch],
                                                              self.test_labels[batch])
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct  # device scalars: no sync per batch
        n = len(self.data.test_labels)
        return contract.Evaluation(float(loss_sum) / n, int(correct) / n)  # the one host read

    def logits(self, images, train):
        # train=True: batch statistics; the updated running statistics are dropped, the state stays as it was.
        logits, _ = self.jitted_forward(self.train_state.params, self.train_state.state, contract.nhwc(images), train)
        return np.asarray(logits)

    # --- Canonical weights -------------------------------------------------------------------------------------------
    def import_weights(self, weights):
        params, state = import_canonical(weights)
        self.train_state = jax.device_put(TrainState(params, state, self.optimizer.init(params)), self.replicated)

    def export_weights(self):
        return export_canonical(*jax.device_get((self.train_state.params, self.train_state.state)))


# Canonical (PyTorch) name -> Haiku (collection, module, entry). PyTorch's numbered children become Haiku names with the
# number appended (layer2.0 -> layer2_0, downsample.1 -> downsample_1); nesting is "/".
LAYER_ENTRIES = {"weight": ("params", "w"), "bias": ("params", "b")}
BATCHNORM_ENTRIES = {"weight": ("params", "scale"), "bias": ("params", "offset"),
                     "running_mean": ("state", "mean"), "running_var": ("state", "var")}


def haiku_location(name: str) -> tuple[str, str, str]:
    module, field = name.rsplit(".", 1)
    entries = BATCHNORM_ENTRIES if f"{module}.running_mean" in contract.canonical_shapes() else LAYER_ENTRIES
    collection, entry = entries[field]
    return collection, re.sub(r"\.(\d)", r"_\1", module).replace(".", "/"), entry


def import_canonical(weights: contract.Weights) -> tuple[hk.Params, hk.State]:
    trees = {"params": {}, "state": {}}
    for name, array in contract.check_weights(weights).items():
        collection, module, entry = haiku_location(name)
        trees[collection].setdefault(module, {})[entry] = contract.to_channels_last(array)
    return trees["params"], trees["state"]


def export_canonical(params: hk.Params, state: hk.State) -> contract.Weights:
    trees = {"params": params, "state": state}
    weights = {}
    for name in contract.canonical_shapes():
        collection, module, entry = haiku_location(name)
        weights[name] = contract.from_channels_last(np.asarray(trees[collection][module][entry]))
    return weights
