"""ResNet18 on MNIST in burn (Rust): the thin Python side of the Rust page, `implementations/rust_burn/src/lib.rs`.

The model, its training and evaluation are Rust, in the extension module `mnist_burn` (PyO3, built with maturin).
This page hands it what the contract decides, so that nothing is re-derived in Rust: the recipe, the normalized data
(once), the learning-rate table, each epoch's batch indices and the canonical weights. A page of the Rosetta stone:
the sections of contract.PAGE_SECTIONS, in order, and the names every page uses.
"""

from __future__ import annotations

import time

import numpy as np

import mnist_burn
from implementations import contract


# --- Model -----------------------------------------------------------------------------------------------------------
# BasicBlock and ResNet18 are Rust structs (lib.rs, "Model"), built with burn's Conv2d, MaxPool2d and Linear and a
# BatchNorm that keeps PyTorch's unbiased running variance.


# --- State -----------------------------------------------------------------------------------------------------------
def select_device(requested: str) -> str:
    """The config's device as a backend of this build: "cpu" (burn's Flex) or "cuda" (built with `--features cuda`)."""
    if requested == "cuda" and "cuda" not in mnist_burn.Trainer.backends():
        raise contract.ConfigError("--device cuda: this burn extension was built without CUDA; rebuild it on a machine "
                                   "with an NVIDIA driver (make setup) or use --device cpu")
    if requested == "auto":
        return "cuda" if "cuda" in mnist_burn.Trainer.backends() else "cpu"
    return requested


class BurnTrainer(contract.Trainer):

    def build(self, weights):
        if self.config.precision != "fp32":
            raise contract.Unsupported(f"--precision {self.config.precision}: the burn row trains in fp32 only")
        self.device = select_device(self.config.device)
        data = self.data
        self.rust = mnist_burn.Trainer(data.train_images, data.train_labels, data.test_images, data.test_labels,
                                       self.schedule, self.device, contract.recipe())
        self.import_weights(weights)

    def environment(self):
        backend = "CUDA backend" if self.device == "cuda" else "Flex CPU backend"
        return {"framework_version": f"burn {mnist_burn.Trainer.framework_version()} ({backend})",
                "device": "NVIDIA GPU (CUDA)" if self.device == "cuda" else "CPU"}

    def memory_peak_bytes(self):
        return None  # burn reports no allocator peak

    def trainable_parameters(self):
        return self.rust.trainable_parameters()

    # --- Train step --------------------------------------------------------------------------------------------------
    # train_step is Rust's (lib.rs): one SGD step on a batch already on the device.
    def train_on_batch(self, images, labels):
        return self.rust.train_on_batch(np.ascontiguousarray(images), np.ascontiguousarray(labels))

    def learning_rates(self, steps):
        return np.array(self.rust.learning_rates(steps), dtype=np.float32)

    # --- Epoch -------------------------------------------------------------------------------------------------------
    def train_batches(self, batches):
        start = time.perf_counter()
        # The loop runs in Rust, detached from the interpreter; it calls the meter after each step.
        mean_loss, consumed = self.rust.train_batches(batches.astype(np.int64), self.progress_meter(batches).step)
        seconds = time.perf_counter() - start  # train_batches returns after reading the losses back: the time is real
        return contract.EpochResult(mean_loss, batches.size, seconds, contract.label_digest(consumed))

    # --- Evaluation --------------------------------------------------------------------------------------------------
    # eval_step is Rust's: one evaluation batch's summed loss and correct count, on the device.
    def evaluate(self):
        loss_sum, correct = self.rust.evaluate(contract.EVAL_BATCH_SIZE)
        n = len(self.data.test_labels)
        return contract.Evaluation(loss_sum / n, correct / n)

    def logits(self, images, train):
        return self.rust.logits(np.ascontiguousarray(images), train)

    # --- Canonical weights -------------------------------------------------------------------------------------------
    # import_canonical / export_canonical are Rust (lib.rs), with burn-store's PyTorch adapters.
    def import_weights(self, weights):
        self.rust.import_weights(contract.check_weights(weights))

    def export_weights(self):
        exported = self.rust.export_weights()
        return {name: exported[name] for name in contract.canonical_shapes()}
