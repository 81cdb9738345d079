"""Every implementation is the same model: checked against the PyTorch reference, each framework in its own worker.

Parametrized over every registered, installed framework: a new implementation is covered without any test naming it.
Each check starts both trainers from the same canonical weights and says which framework, which tensor or step
diverged first, and by how much. The tolerances are a small multiple of the honest fp32 gap measured between
frameworks on this CPU (figures beside each bound); a convention slip (padding, epsilon, momentum, biased variance)
is orders of magnitude above them.

Every worker, the reference's too, trains under a recipe whose every constant differs from the real one
(tests/changed_recipe.py), values no framework has as a default: a page that restated a constant, rather than read it
from the contract (or, in another language, from contract.recipe()), fails every check, at no cost of its own. That a
page reads the recipe makes the real one's parity follow from this one's; the benchmark trains the real one, and the
smoke gate holds its accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.worker import UnsupportedRun
from implementations import FRAMEWORKS, contract

# The default run's schedule (2,340 steps that warm up over 234: the first steps train gently, so fp32 rounding
# differences stay small for many steps), on the first 384 training images: 780 epochs of 3 batches, where the default
# run has 5 of 468. A few hundred images show what 60,000 do, and every worker builds in a fraction of the time. The
# data-order check trains two of these epochs: three batches each show the order as well as longer ones. Strict fp32
# on GPUs too: TF32 alone would move logits by ~1e-3.
CONFIG = contract.RunConfig(epochs=780, train_subset=384, test_subset=1000, allow_tf32=False)
REFERENCE = FRAMEWORKS["pytorch"]
BATCH = CONFIG.batch_size

EVAL_LOGITS_ATOL = 1e-4  # the bound; measured: TensorFlow 2.4e-7, JAX 5.7e-7
# Train mode normalizes with batch statistics, and PyTorch's CPU BatchNorm kernel accumulates them in fp32 over the
# stem's 25,088 values per channel: its logits are 1.5e-4 from a float64 run, JAX's 7.6e-6. Measured against PyTorch:
# TensorFlow 1.2e-5, JAX 1.4e-4. A wrong epsilon (1e-3) or padding moves them by > 1e-2.
TRAIN_LOGITS_ATOL = 5e-4
LOSS_RTOL = 1e-5  # first-step loss; measured: TensorFlow 1.9e-7, JAX 3.7e-7
# First steps, per tensor: |Δw - Δw_ref| / |Δw_ref| in the Euclidean norm. fp32 gradients of this freshly initialized
# network are ill-conditioned: PyTorch fp32 against PyTorch float64 differs by up to 3.2% (layer4's BatchNorm weights),
# and a ReLU input within rounding of zero can flip sides between frameworks. Measured against PyTorch: TensorFlow
# 1.3%, JAX 2.5%. A wrong rate, loss reduction or momentum formulation (step 2) moves updates by >= 20%.
UPDATE_RTOL = 0.1
# Running mean/var after the first steps, relative to the statistic; measured <= 2.3e-5. Keeping the biased batch
# variance instead (Haiku's and Keras' default) shows as 1.6e-4 to 4e-4 after one step in layers 2-4: caught, by 1.6x.
RUNNING_STATS_RTOL = 1e-4
SHORT_RUN_STEPS, SHORT_RUN_WINDOW = 30, 10
# 10-step mean losses over the default run's first steps, relative; measured over 50 steps: TensorFlow 10.7%, JAX 11.0%
# (7.6% and 9.4% under the first recipe's peak rate 0.1), the largest in the last windows, as chaos grows step by step.
SHORT_RUN_RTOL = 0.2
FIRST_STEPS = 2  # the second is where momentum formulations part: the buffer is no longer zero, the rate has doubled


def under_changed_recipe(framework):
    """The framework's trainer, loaded in its worker under tests/changed_recipe.py."""
    return framework._replace(module=f"changed_recipe:{framework.name}")


@pytest.fixture(scope="session")
def data(mnist):
    return contract.prepare_data(*mnist, CONFIG)


@pytest.fixture(scope="session")
def initial():
    return contract.initial_weights(CONFIG.seed)


@pytest.fixture(autouse=True)
def built_ahead(request, workers):
    """From a framework's first check on, the workers of its data-parallel checks and the next framework's first worker
    build in the background (WorkerPool.build_ahead), while its one-device checks run."""
    if "framework" not in request.fixturenames:
        return
    framework = request.getfixturevalue("framework")
    for processes in (None, 2):
        if not data_parallel_skip(framework, processes):
            workers.build_ahead(under_changed_recipe(framework), CONFIG.with_options(replicas=2), processes=processes)
    items = request.session.items
    following = (item.callspec.params["framework"] for item in items[items.index(request.node) + 1:]
                 if item.module is request.module and "framework" in item.fixturenames)
    if (upcoming := next((f for f in following if f != framework), None)) is not None:
        workers.build_ahead(under_changed_recipe(upcoming), CONFIG)


@pytest.fixture
def other(framework, workers, initial):
    """The framework's worker, freshly reset to the canonical initial weights. The reference is checked against a
    second, independent PyTorch worker: its runs are reproducible."""
    worker = workers.get(under_changed_recipe(framework), CONFIG, copy=int(framework == REFERENCE))
    worker.call("import_weights", initial)
    return worker


@pytest.fixture(scope="session")
def expected(workers, initial, data):
    """expected(steps, weights_after): the PyTorch reference's losses over the run's first `steps` steps from the
    canonical initial weights, and its weights after each step of `weights_after`, computed once per session and shared
    by every framework's checks (the first steps' checks and the short run share the one run)."""
    results = {}

    def result(steps, weights_after=()):
        if steps not in results:
            reference = workers.get(under_changed_recipe(REFERENCE), CONFIG)
            reference.call("import_weights", initial)
            results[steps] = train_steps(reference, first_batches(data, steps), range(1, FIRST_STEPS + 1))
        losses, weights = results[steps]
        return losses, {step: weights[step] for step in weights_after}

    return result


@pytest.fixture(scope="session")
def reference_logits(workers, initial):
    """reference_logits(images, train): the PyTorch reference's logits from the initial weights, once per mode."""
    results = {}

    def result(images, train):
        if train not in results:
            reference = workers.get(under_changed_recipe(REFERENCE), CONFIG)
            reference.call("import_weights", initial)
            results[train] = reference.call("logits", images, train)
        return results[train]

    return result


def first_batches(data, steps):
    """The run's first `steps` batches, in the contract's order: the first epochs' batches one after the other."""
    epochs = range(-(-steps // contract.steps_per_epoch(len(data.train_labels), BATCH)))
    indices = np.concatenate([contract.epoch_batches(CONFIG.seed, epoch, len(data.train_labels), BATCH)
                              for epoch in epochs])[:steps]
    return [(data.train_images[i], data.train_labels[i]) for i in indices]


def test_structure(framework, workers, initial):
    """Same names, shapes and count through the canonical weights, which round-trip bit for bit."""
    worker = workers.get(under_changed_recipe(framework), CONFIG)
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
    counted = worker.call("trainable_parameters")
    assert counted == contract.TRAINABLE_PARAMETERS, f"{framework.name} counts {counted} trainable parameters"


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward(framework, other, reference_logits, data, train):
    """Same logits from the same weights and real MNIST test images (train mode: batch statistics)."""
    images = data.test_images[:BATCH]
    reference = reference_logits(images, train)
    actual = other.call("logits", images, train)
    assert actual.shape == reference.shape == (BATCH, contract.NUM_CLASSES)
    gap, bound = np.abs(actual - reference), TRAIN_LOGITS_ATOL if train else EVAL_LOGITS_ATOL
    assert gap.max() <= bound, (f"{framework.name}: {'train' if train else 'eval'}-mode logits differ from "
                                f"PyTorch by up to {gap.max():.3g} (bound {bound}) at image {gap.max(1).argmax()}")


def describe_first_divergence(framework, before, expected, actual, steps: int) -> list[str]:
    """Messages for each tensor, in the model's order, whose change since `before` differs from the reference's.

    After one step the running statistics come from identical weights and are held tight: that is where BatchNorm
    conventions show. Later ones see the first update's rounding through the batch statistics: checked as updates.
    """
    problems = []
    for name in contract.canonical_shapes():
        if name.endswith(("running_mean", "running_var")) and steps == 1:
            scale = np.abs(expected[name]).max()
            gap = np.abs(actual[name] - expected[name]).max() / scale
            bound, what = RUNNING_STATS_RTOL, "running statistic"
        else:
            update = expected[name] - before[name]
            gap = np.linalg.norm((actual[name] - before[name]) - update) / max(np.linalg.norm(update), 1e-30)
            bound, what = UPDATE_RTOL, "update"
        if not gap <= bound:
            problems.append(f"{framework.name}: {name}: {what} differs from PyTorch's by {gap:.3g} relative (bound {bound})")
    return problems


def train_steps(worker, batches, weights_after=()) -> tuple[list[float], dict[int, contract.Weights]]:
    """The losses of SGD steps on `batches`, and the weights after each step of `weights_after` (counted from 1)."""
    losses, weights = [], {}
    for step, (images, labels) in enumerate(batches, start=1):
        losses.append(worker.call("train_on_batch", images, labels))
        if step in weights_after:
            weights[step] = worker.call("export_weights")
    return losses, weights


def first_steps_problems(framework, worker, data, initial, reference) -> list[str]:
    """Why the worker's first FIRST_STEPS steps from the initial weights are not the reference's (losses, weights)."""
    worker.call("import_weights", initial)
    losses, weights = train_steps(worker, first_batches(data, FIRST_STEPS), range(1, FIRST_STEPS + 1))
    expected_losses, expected_weights = reference
    problems = []
    if abs(losses[0] - expected_losses[0]) > LOSS_RTOL * abs(expected_losses[0]):  # later losses carry step 1's rounding
        problems.append(f"{framework.name}: first-step loss {losses[0]:.8f} vs PyTorch {expected_losses[0]:.8f}")
    for step in range(1, FIRST_STEPS + 1):
        problems += [f"after step {step}: {problem}" for problem in
                     describe_first_divergence(framework, initial, expected_weights[step], weights[step], step)]
    return problems


def data_parallel_skip(framework, processes: int | None) -> str | None:
    """Why the framework's data-parallel check in `processes` processes does not run, known without a worker."""
    if processes == 2 and framework.process_per_replica:
        return f"{framework.name}: its two replicas always are two processes (two_replicas)"
    return framework.cannot_run(CONFIG.with_options(replicas=2))


@pytest.fixture
def data_parallel(framework, workers, initial, processes):
    """The framework's worker training on 2 replicas of its data-parallel engine, in one process or as a job of two
    (one replica each, the engine's path across machines); skipped where the engine has no such path."""
    if reason := data_parallel_skip(framework, processes):
        pytest.skip(reason)  # known from the registry: no worker started
    try:
        worker = workers.get(under_changed_recipe(framework), CONFIG.with_options(replicas=2), processes=processes)
    except UnsupportedRun as error:
        pytest.skip(str(error))
    return worker


@pytest.mark.parametrize("replicas, processes", [(1, None), (2, None), (2, 2)],
                         ids=["one_device", "two_replicas", "two_processes"])
def test_first_steps(framework, replicas, processes, request, expected, data, initial):
    """The first SGD steps at the schedule's first rates: same losses, same new weights and running statistics, after
    each step. The second step is where momentum formulations part: the buffer is no longer zero and the rate has
    doubled.

    On two replicas, each takes half of every batch: gradients and BatchNorm statistics over the whole batch make it the
    same model, held to the same bounds against the reference on one device; as two processes too, where the engine's
    collectives cross processes (gloo, gRPC) as they cross machines.
    """
    worker = request.getfixturevalue("other" if replicas == 1 else "data_parallel")
    problems = first_steps_problems(framework, worker, data, initial,
                                    expected(SHORT_RUN_STEPS, range(1, FIRST_STEPS + 1)))
    assert not problems, (f"{len(problems)} difference(s) on {replicas} device(s) in {processes or 1} process(es), "
                          "first in model order:\n" + "\n".join(problems[:8]))


def test_schedule(framework, workers):
    """Every framework's learning rate at every step of a default run is the recipe's, stated here on its own: 2,340
    steps (5 epochs of 468 batches of 128), a linear warm-up over the first 234 (10%) to the peak 0.05 (0.1 per 256
    images), then a linear decay that still trains at the last step."""
    worker = workers.get(under_changed_recipe(framework), CONFIG)  # the default run's schedule
    total, warmup, peak = 2340, 234, 0.05
    steps = np.arange(total)
    rates = worker.call("learning_rates", steps)
    expected = np.where(steps < warmup, peak * (steps + 1) / warmup,
                        peak * (total - steps) / (total - warmup + 1)).astype(np.float32)
    wrong = np.flatnonzero(~np.isclose(rates, expected, rtol=1e-7, atol=0))  # float32 table entries: exact
    assert wrong.size == 0, (f"{framework.name}: learning rate differs at {wrong.size} of {total} steps, first at step "
                             f"{wrong[0]}: {rates[wrong[0]]!r} vs the shared schedule's {expected[wrong[0]]!r}")


def test_short_run(framework, other, expected, data):
    """The default run's first 50 steps from the same start on the same batches: the loss curves agree.

    Step by step, fp32 training from this start is chaotic: PyTorch in fp32 against itself in float64 already differs
    by 1.5% at step 5 and 7% at step 10, and single steps of two frameworks differ by up to 2x after loss spikes. The
    curves are compared as means over windows of 10 steps: this catches a run that learns differently, not rounding.
    """
    reference, _ = expected(SHORT_RUN_STEPS)
    actual, _ = train_steps(other, first_batches(data, SHORT_RUN_STEPS))
    windows = lambda losses: np.reshape(losses, (-1, SHORT_RUN_WINDOW)).mean(axis=1)
    gaps = np.abs(windows(actual) - windows(reference)) / windows(reference)
    print(f"{framework.name}: relative gaps of 10-step mean losses {np.round(gaps, 4)}, largest per-step gap "
          f"{np.max(np.abs(np.subtract(actual, reference)) / reference):.3g}")
    worst = int(np.argmax(gaps))
    assert gaps[worst] <= SHORT_RUN_RTOL, (
        f"{framework.name}: mean loss of steps {worst * SHORT_RUN_WINDOW}-{(worst + 1) * SHORT_RUN_WINDOW - 1} is "
        f"{windows(actual)[worst]:.5f}, PyTorch's {windows(reference)[worst]:.5f} (relative gap {gaps[worst]:.3g}, "
        f"bound {SHORT_RUN_RTOL})")


def test_data_order(framework, workers, data, initial):
    """An epoch consumes exactly the batches that the shared permutation names, in its order."""
    worker = workers.get(under_changed_recipe(framework), CONFIG)
    worker.call("import_weights", initial)
    for epoch in range(2):
        result = worker.call("train_epoch", epoch)
        indices = contract.epoch_batches(CONFIG.seed, epoch, len(data.train_labels), BATCH)
        assert result.images == indices.size, f"{framework.name}: epoch {epoch} trained on {result.images} images, not {indices.size}"
        expected = contract.label_digest(data.train_labels[indices.ravel()])
        assert result.label_digest == expected, (f"{framework.name}: epoch {epoch} consumed labels with digest "
                                                 f"{result.label_digest}, the shared permutation gives {expected}")


REAL_RECIPE = 2  # the pool's copy number of the one worker under the real recipe


def test_the_changed_recipe_trains_otherwise_than_the_real_one(workers, data, initial, expected):
    """The suite's recipe shows in its checks: PyTorch under the real recipe, one step from the same weights, is far
    outside the bounds that the rows are held to against the changed one."""
    real = workers.get(REFERENCE, CONFIG, copy=REAL_RECIPE)
    real.call("import_weights", initial)
    _, weights = train_steps(real, first_batches(data, 1), [1])
    _, changed = expected(SHORT_RUN_STEPS, [1])
    assert describe_first_divergence(REFERENCE, initial, changed[1], weights[1], 1), \
        "the changed recipe trains as the real one: the parity suite would not see a page that restates a constant"
