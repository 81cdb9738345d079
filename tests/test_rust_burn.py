"""The burn row's PyO3 boundary: a bad input comes back from its worker as a Python exception that names what is wrong
(lib.rs checks every input where it enters, rather than letting burn panic on it), and the worker trains on after it.
The parity suite covers the row's training; this covers what no other row has, a program in another language inside
the worker process."""

from __future__ import annotations

import numpy as np
import pytest

from bench.worker import WorkerError
from implementations import FRAMEWORKS, contract, missing_packages

BURN = FRAMEWORKS["burn"]
CONFIG = contract.RunConfig(train_subset=256, test_subset=1000)  # a small worker: only its boundary is tested
IMAGES = np.random.default_rng(0).standard_normal((2, 1, 28, 28), dtype=np.float32)
LABELS = np.array([3, 7], dtype=np.int32)
INITIAL = contract.initial_weights(CONFIG.seed)


@pytest.fixture(scope="module")
def worker(request, workers):
    selected = request.config.getoption("frameworks")
    if selected and "burn" not in selected.split(","):
        pytest.skip("--frameworks does not select burn")
    if missing_packages(BURN):
        pytest.skip(f"burn is not installed: {BURN.install_hint}")
    return workers.get(BURN, CONFIG)


@pytest.fixture
def burn(worker):
    """The worker at step 0 of its (short) schedule."""
    worker.call("import_weights", INITIAL)
    return worker


WITHOUT_FC_BIAS = {name: weight for name, weight in INITIAL.items() if name != "fc.bias"}
BAD_CALLS = {  # id: (method, arguments, what the exception says)
    "image_shape": ("train_on_batch", (IMAGES[:, :, :14], LABELS),
                    "ValueError: images of shape [2, 1, 14, 28]: expected [batch, 1, 28, 28]"),
    "label_count": ("train_on_batch", (IMAGES, LABELS[:1]), "ValueError: 1 labels for 2 images"),
    "label_value": ("train_on_batch", (IMAGES, LABELS + 3), "ValueError: label 10: expected a class index from 0 to 9"),
    "empty_batch": ("logits", (IMAGES[:0], False), "ValueError: images of shape [0, 1, 28, 28]"),
    "past_the_schedule": ("learning_rates", (np.array([10**6]),), "ValueError: step 1000000: the schedule has"),
    "weights_missing": ("import_weights", (WITHOUT_FC_BIAS,), "missing ['fc.bias']"),
}


@pytest.mark.parametrize("method, arguments, message", BAD_CALLS.values(), ids=BAD_CALLS)
def test_a_bad_input_is_a_python_exception_and_the_worker_trains_on(burn, method, arguments, message):
    with pytest.raises(WorkerError) as raised:
        burn.call(method, *arguments)
    assert message in str(raised.value)
    assert np.isfinite(burn.call("train_on_batch", IMAGES, LABELS))
