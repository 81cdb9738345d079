"""ResNet18 on MNIST in JAX with Flax NNX and optax: the PyTorch page's model and recipe as mutable NNX modules.

NNX modules hold their parameters and BatchNorm statistics as attributes, as PyTorch modules do; `nnx.jit` lifts the
train and eval steps over them, and the model and optimizer it is handed are updated in place.
Sections, in the same order in every framework: model, state, train step, epoch, evaluation, canonical weights.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax starts: no grab of 75% of the GPU up front
# XLA:CPU's algebraic simplifier swaps the operands of each convolution whose image is smaller than its kernel (layer3's
# 2x2 and layer4's 1x1 maps) into a form that only its naive loop emitter runs: a training step took 8x longer here.
# The Haiku page passes jax.jit's compiler_options; nnx.jit takes none, so the pass is disabled through XLA_FLAGS,
# which bind every backend from the first one's start: only where jax has no CUDA plugin (the GPU needs the pass).
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")
if not any(importlib.util.find_spec(plugin) for plugin in CUDA_PLUGINS):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_disable_hlo_passes=algsimp".strip()

import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from implementations import contract
from implementations.jax_devices import allocator_peak_bytes, device_data, devices_environment, placement


# --- Model -----------------------------------------------------------------------------------------------------------
class BatchNorm(nnx.BatchNorm):
    """PyTorch's BatchNorm2d, channels last: nnx.BatchNorm in PyTorch's conventions, with PyTorch's running variance.

    Flax's momentum is the decay of the running averages (1 - PyTorch's momentum). nnx.BatchNorm averages the biased
    batch variance (and computes it as E[x^2] - E[x]^2) where PyTorch averages the unbiased n / (n - 1) one: training
    mode computes the statistics here, as PyTorch does; evaluation is nnx.BatchNorm's own.
    """

    def __init__(self, channels: int, rngs: nnx.Rngs):
        super().__init__(channels, momentum=1 - contract.BN_MOMENTUM, epsilon=contract.BN_EPSILON, rngs=rngs)

    def __call__(self, x):
        if self.use_running_average:
            return super().__call__(x)
        dtype, x = x.dtype, x.astype(jnp.float32)  # statistics in fp32, also when the network computes in bf16
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        n = x.size // x.shape[-1]
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var * (n / (n - 1))
        return ((x - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]).astype(dtype)


def conv(in_channels: int, out_channels: int, kernel: int, stride: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    # Explicit symmetric padding, as PyTorch's: "SAME" would pad stride-2 convolutions of even inputs bottom/right only.
    padding = kernel // 2
    return nnx.Conv(in_channels, out_channels, (kernel, kernel), (stride, stride), padding=[(padding, padding)] * 2,
                    use_bias=False, dtype=dtype, rngs=rngs)


class BasicBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, dtype, rngs: nnx.Rngs):
        self.conv1 = conv(in_channels, out_channels, 3, stride, dtype, rngs)
        self.bn1 = BatchNorm(out_channels, rngs)
        self.conv2 = conv(out_channels, out_channels, 3, 1, dtype, rngs)
        self.bn2 = BatchNorm(out_channels, rngs)
        self.downsample = nnx.data(None)  # data, not a static attribute: the blocks that downsample hold modules here
        if stride != 1 or in_channels != out_channels:  # indexed as PyTorch's Sequential: downsample.0, downsample.1
            self.downsample = nnx.List([conv(in_channels, out_channels, 1, stride, dtype, rngs),
                                        BatchNorm(out_channels, rngs)])

    def __call__(self, x):
        shortcut = x
        if self.downsample is not None:
            conv1x1, bn = self.downsample
            shortcut = bn(conv1x1(x))
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nnx.relu(out + shortcut)


class ResNet18(nnx.Module):
    """bf16: convolutions and the classifier compute on bf16 copies of their fp32 parameters (Flax's `dtype`)."""

    def __init__(self, dtype, rngs: nnx.Rngs):
        widths = contract.STAGE_WIDTHS
        self.conv1 = conv(1, widths[0], 7, 2, dtype, rngs)
        self.bn1 = BatchNorm(widths[0], rngs)
        in_channels = widths[0]
        for stage, (width, blocks) in enumerate(zip(widths, contract.BLOCKS_PER_STAGE), start=1):
            stride = 1 if stage == 1 else 2
            layer = [BasicBlock(in_channels if b == 0 else width, width, stride if b == 0 else 1, dtype, rngs)
                     for b in range(blocks)]
            setattr(self, f"layer{stage}", nnx.List(layer))
            in_channels = width
        self.fc = nnx.Linear(widths[-1], contract.NUM_CLASSES, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x):  # [B, 28, 28, 1] -> [B, 10]
        x = nnx.relu(self.bn1(self.conv1(x.astype(self.dtype))))
        x = nnx.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # pads with -inf, as nn.MaxPool2d
        for block in [*self.layer1, *self.layer2, *self.layer3, *self.layer4]:
            x = block(x)
        return self.fc(x.mean(axis=(1, 2))).astype(jnp.float32)


@nnx.jit
def forward(model: ResNet18, images):
    return model(images)


# --- State -----------------------------------------------------------------------------------------------------------
# The model holds parameters (nnx.Param) and BatchNorm statistics (nnx.BatchStat); the nnx.Optimizer holds the momentum
# buffers of the parameters and the step count that indexes the schedule.
def make_optimizer(learning_rate: optax.Schedule) -> optax.GradientTransformation:
    # optax's trace is PyTorch's momentum: buf = 0.9 * buf + grad; params -= lr * buf.
    return optax.sgd(learning_rate, momentum=contract.SGD_MOMENTUM)


class FlaxTrainer(contract.Trainer):
    data_parallel = "jax.sharding: nnx.jit over a device mesh"

    def build(self, weights):
        self.devices, self.device, self.replicated, self.batch_sharding = placement(self.config)
        dtype = jnp.bfloat16 if self.config.precision == "bf16" else jnp.float32
        table = jnp.asarray(self.schedule)
        self.learning_rate = lambda count: table[count]  # optax's schedule: called with its step count, from 0
        # Made once: the transformation is static in the nnx.Optimizer's graph, which nnx.jit caches on, so a new one
        # per import_weights would recompile the first step of every run.
        self.sgd = make_optimizer(self.learning_rate)
        # The model's structure alone (nnx.eval_shape: no initializer runs), as the Flax examples restore a checkpoint:
        # import_weights gives every variable its value.
        self.model = nnx.eval_shape(lambda: ResNet18(dtype, nnx.Rngs(0)))
        self.train_images, self.train_labels, self.test_images, self.test_labels = device_data(self.data,
                                                                                              self.replicated)
        self.import_weights(weights)

    def environment(self):
        return {"framework_version": f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}",
                **devices_environment(self.devices)}

    def memory_peak_bytes(self):
        return allocator_peak_bytes(self.device)

    def trainable_parameters(self):
        return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(self.model, nnx.Param)))

    # --- Train step --------------------------------------------------------------------------------------------------
    # The Flax examples' pure steps, compiled by nnx.jit. The model and optimizer are donated: XLA updates parameters,
    # statistics and momentum in place.
    @staticmethod
    @nnx.jit(donate_argnames=("model", "optimizer"))
    def train_step(model: ResNet18, optimizer: nnx.Optimizer, images, labels) -> jax.Array:
        """One SGD step on a device-resident batch, in place on the model and optimizer; the loss stays on the device."""
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)  # gradients of the nnx.Param leaves; BatchStat updates kept
        optimizer.update(model, grads)
        return loss

    def train_on_batch(self, images, labels):
        self.model.train()  # BatchNorm normalizes with, and updates, batch statistics
        images, labels = jax.device_put((contract.nhwc(images), labels), self.batch_sharding)
        return float(self.train_step(self.model, self.optimizer, images, labels))

    def learning_rates(self, steps):
        return np.asarray(self.learning_rate(jnp.asarray(steps)))

    # --- Epoch -------------------------------------------------------------------------------------------------------
    def train_batches(self, batches):
        start = time.perf_counter()
        self.model.train()
        losses, consumed, progress = [], [], self.progress_meter(batches)
        for step, indices in enumerate(batches, start=1):
            indices = jax.device_put(indices, self.replicated)
            labels = self.train_labels[indices]  # gathered on the device
            images, batch_labels = jax.device_put((self.train_images[indices], labels), self.batch_sharding)
            losses.append(self.train_step(self.model, self.optimizer, images, batch_labels))  # no sync per step
            consumed.append(labels)
            progress.step(step, wait=losses[-1].block_until_ready)
        losses, consumed = jax.device_get((losses, consumed))  # waits for every step's loss
        jax.block_until_ready(nnx.state(self.model))  # and for the last step's update, before the clock
        seconds = time.perf_counter() - start
        return contract.EpochResult(float(np.mean(losses)), batches.size, seconds,
                                    contract.label_digest(np.concatenate(consumed)))

    # --- Evaluation --------------------------------------------------------------------------------------------------
    @staticmethod
    @nnx.jit
    def eval_step(model: ResNet18, images, labels) -> tuple[jax.Array, jax.Array]:
        """Eval mode's summed loss and correct count of one device-resident batch."""
        logits = model(images)
        loss_sum = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
        return loss_sum, (logits.argmax(-1) == labels).sum()

    def evaluate(self):
        self.model.eval()  # BatchNorm normalizes with its running statistics
        loss_sum = correct = 0
        for start in range(0, len(self.data.test_labels), contract.EVAL_BATCH_SIZE):
            batch = slice(start, start + contract.EVAL_BATCH_SIZE)
            batch_loss, batch_correct = self.eval_step(self.model, self.test_images[batch], self.test_labels[batch])
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct  # device scalars: no sync per batch
        n = len(self.data.test_labels)
        return contract.Evaluation(float(loss_sum) / n, int(correct) / n)

    def logits(self, images, train):
        self.model.train() if train else self.model.eval()
        return np.asarray(forward(self.model, jax.device_put(contract.nhwc(images), self.replicated)))

    # --- Canonical weights -------------------------------------------------------------------------------------------
    def import_weights(self, weights):
        import_canonical(self.model, weights, self.replicated)
        self.optimizer = nnx.Optimizer(self.model, self.sgd, wrt=nnx.Param)  # zero momentum, step 0
        # Placed as the train step returns it: a step count made on the default device would compile the step twice.
        nnx.update(self.optimizer, jax.device_put(nnx.state(self.optimizer), self.replicated))

    def export_weights(self):
        return export_canonical(self.model)


# Canonical names are PyTorch module paths, which the NNX model's attributes follow ("layer2.0.downsample.1.weight").
NNX_BATCHNORM = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def nnx_variable(model: ResNet18, name: str) -> nnx.Variable:
    """The NNX variable behind a canonical name: Conv and Linear keep `kernel` (HWIO, [in, out]) and `bias`."""
    path, _, field = name.rpartition(".")
    module = model
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    if isinstance(module, BatchNorm):
        return getattr(module, NNX_BATCHNORM[field])
    return module.kernel if field == "weight" else module.bias


def import_canonical(model: ResNet18, weights: contract.Weights, placement: NamedSharding) -> None:
    for name, array in contract.check_weights(weights).items():
        nnx_variable(model, name).set_value(jax.device_put(contract.to_channels_last(array), placement))


def export_canonical(model: ResNet18) -> contract.Weights:
    return {name: contract.from_channels_last(np.asarray(nnx_variable(model, name)[...]))
            for name in contract.canonical_shapes()}
