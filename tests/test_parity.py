"""Every implementation is the same model: checked against the PyTorch reference, each framework in its own worker.

Parametrized over every registered, installed framework: a new implementation is covered without any test naming it.
Each check starts both trainers from the same canonical weights and says which framework, which tensor or step
diverged first, and by how much. The tolerances are a small multiple of the honest fp32 gap measured between
frameworks on this CPU (figures beside each bound); a convention slip (padding, epsilon, momentum, biased variance)
is orders of magnitude above them.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.data import load_mnist
from implementations import FRAMEWORKS, contract

# 4096 training images, 2 epochs: 64 steps, first learning rate 0.1 / 7. Strict fp32 on GPUs too: TF32 alone would
# move logits by ~1e-3, far above these bounds.
CONFIG = contract.PRESETS["smoke"].with_options(allow_tf32=False)
REFERENCE = FRAMEWORKS["pytorch"]
BATCH = CONFIG.batch_size

LOGITS_ATOL = 1e-4  # issue's bound; measured gaps: TensorFlow 2e-6, JAX 3e-6 (eval), similar in train mode
LOSS_RTOL = 1e-5  # one-step loss; measured: ~1e-7
UPDATE_RTOL = 1e-3  # |Δw - Δw_ref| / max|Δw_ref| per tensor after one step; measured: <= 5e-5
RUNNING_STATS_RTOL = 1e-4  # running mean/var after one step, relative; biased variance alone would be 8e-3 (128/127)
SHORT_RUN_STEPS = 50
SHORT_RUN_ATOL = 2e-3  # loss per step over 50 steps; fp32 differences grow chaotically, measured: <= 3e-4


@pytest.fixture(scope="module")
def data(mnist_dir):
    return contract.prepare_data(*load_mnist(mnist_dir), CONFIG)


@pytest.fixture(scope="module")
def initial():
    return contract.initial_weights(CONFIG.seed)


@pytest.fixture
def pair(framework, workers, initial):
    """(reference worker, framework worker), both freshly reset to the canonical initial weights."""
    reference = workers.get(REFERENCE, CONFIG)
    # The reference itself is checked against a second, independent PyTorch worker: its runs are reproducible.
    other = workers.get(framework, CONFIG, replica=int(framework == REFERENCE))
    for worker in (reference, other):
        worker.call("import_weights", initial)
    return reference, other


def first_batch(data, epoch=0):
    indices = contract.epoch_batches(CONFIG.seed, epoch, len(data.train_labels), BATCH)[0]
    return data.train_images[indices], data.train_labels[indices]


def test_structure(framework, workers, initial):
    """Same names, shapes and count through the canonical weights, which round-trip bit for bit."""
    worker = workers.get(framework, CONFIG)
    worker.call("import_weights", initial)
    exported = worker.call("export_weights")
    assert list(exported) == list(contract.canonical_shapes()), f"{framework.name}: canonical names differ or reordered"
    for name, array in initial.items():
        assert exported[name].shape == array.shape, f"{framework.name}: {name} exported as {exported[name].shape}"
        assert exported[name].dtype == np.float32, f"{framework.name}: {name} exported as {exported[name].dtype}"
        mismatch = np.flatnonzero(exported[name] != array)
        assert mismatch.size == 0, (f"{framework.name}: {name} does not round-trip: {mismatch.size} values differ, "
                                    f"first at flat index {mismatch[0]}")
    assert contract.trainable_parameter_count(exported) == contract.TRAINABLE_PARAMETERS


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward(framework, pair, data, train):
    """Same logits from the same weights and real MNIST test images (train mode: batch statistics)."""
    reference, other = pair
    images = data.test_images[:BATCH]
    expected, actual = reference.call("logits", images, train), other.call("logits", images, train)
    assert actual.shape == expected.shape == (BATCH, contract.NUM_CLASSES)
    gap = np.abs(actual - expected)
    assert gap.max() <= LOGITS_ATOL, (f"{framework.name}: {'train' if train else 'eval'}-mode logits differ from "
                                      f"PyTorch by up to {gap.max():.3g} (bound {LOGITS_ATOL}) at image {gap.max(1).argmax()}")


def describe_first_divergence(framework, before, expected, actual) -> list[str]:
    """Messages for each tensor, in the model's order, whose one-step change differs from the reference's."""
    problems = []
    for name in contract.canonical_shapes():
        if name.endswith(("running_mean", "running_var")):
            scale = np.abs(expected[name]).max()
            gap = np.abs(actual[name] - expected[name]).max() / scale
            bound, what = RUNNING_STATS_RTOL, "running statistic"
        else:
            update = expected[name] - before[name]
            gap = np.abs((actual[name] - before[name]) - update).max() / max(np.abs(update).max(), 1e-30)
            bound, what = UPDATE_RTOL, "update"
        if not gap <= bound:
            problems.append(f"{framework.name}: {name}: {what} differs from PyTorch's by {gap:.3g} relative (bound {bound})")
    return problems


def test_one_step(framework, pair, data, initial):
    """One SGD step at the schedule's first learning rate: same loss, same new weights and running statistics."""
    reference, other = pair
    images, labels = first_batch(data)
    expected_loss, loss = reference.call("train_step", images, labels), other.call("train_step", images, labels)
    assert abs(loss - expected_loss) <= LOSS_RTOL * abs(expected_loss), (
        f"{framework.name}: first-step loss {loss:.8f} vs PyTorch {expected_loss:.8f}")
    problems = describe_first_divergence(framework, initial, reference.call("export_weights"), other.call("export_weights"))
    assert not problems, f"{len(problems)} tensor(s) diverged after one step, first in model order:\n" + "\n".join(problems[:8])


def test_schedule(framework, workers):
    """Every framework's learning rate at every step of a default run is the shared function's."""
    config = contract.RunConfig()  # the default run: 5 epochs of 60,000 images
    worker = workers.get(framework, config)
    total = config.epochs * contract.steps_per_epoch(60_000, config.batch_size)
    steps = np.arange(total)
    rates = worker.call("learning_rates", steps)
    expected = np.array([contract.learning_rate(int(s), total) for s in steps], dtype=np.float32)
    wrong = np.flatnonzero(~np.isclose(rates, expected, rtol=1e-7, atol=0))  # float32 table entries: exact
    assert wrong.size == 0, (f"{framework.name}: learning rate differs at {wrong.size} of {total} steps, first at step "
                             f"{wrong[0]}: {rates[wrong[0]]!r} vs the shared schedule's {expected[wrong[0]]!r}")


def test_short_run(framework, pair, data):
    """50 steps from the same start on the same batches: the loss curves agree."""
    reference, other = pair
    batches = np.concatenate([contract.epoch_batches(CONFIG.seed, epoch, len(data.train_labels), BATCH)
                              for epoch in range(CONFIG.epochs)])[:SHORT_RUN_STEPS]
    gaps = []
    for step, indices in enumerate(batches):
        images, labels = data.train_images[indices], data.train_labels[indices]
        expected, actual = reference.call("train_step", images, labels), other.call("train_step", images, labels)
        gaps.append(abs(actual - expected))
        assert gaps[-1] <= SHORT_RUN_ATOL, (f"{framework.name}: loss at step {step} is {actual:.6f}, PyTorch's "
                                             f"{expected:.6f} (gap {gaps[-1]:.3g}, bound {SHORT_RUN_ATOL})")
    print(f"{framework.name}: largest loss gap over {SHORT_RUN_STEPS} steps {max(gaps):.3g}")


def test_data_order(framework, pair, data):
    """An epoch consumes exactly the batches that the shared permutation names, in its order."""
    _, worker = pair
    for epoch in range(CONFIG.epochs):
        result = worker.call("train_epoch", epoch)
        indices = contract.epoch_batches(CONFIG.seed, epoch, len(data.train_labels), BATCH)
        assert result.images == indices.size, f"{framework.name}: epoch {epoch} trained on {result.images} images, not {indices.size}"
        expected = contract.label_digest(data.train_labels[indices.ravel()])
        assert result.label_digest == expected, (f"{framework.name}: epoch {epoch} consumed labels with digest "
                                                 f"{result.label_digest}, the shared permutation gives {expected}")
