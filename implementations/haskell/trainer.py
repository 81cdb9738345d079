"""ResNet18 on MNIST in Haskell (hmatrix + OpenBLAS, hand-derived gradients), as the harness drives every framework.

The model, its backward passes and the epoch loop are Haskell: src/ResNet.hs is the page (the same sections as this
one) over the layers of src/Layers.hs. This page starts the compiled program (implementations/haskell/build.sh) and
speaks its protocol (app/Main.hs): one ASCII request line, then raw little-endian float32/int32 arrays. The recipe
(contract.recipe()) goes first; the data, the learning-rate table, an epoch's batch indices and the canonical weights
cross once per use, never as text per number.

A page of the Rosetta stone: the sections of contract.PAGE_SECTIONS, in order, and the names every page uses.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np

from implementations import contract

PROGRAM = Path(__file__).resolve().parent / "bin" / "mnist-resnet"


# --- Model -----------------------------------------------------------------------------------------------------------
# BasicBlock and ResNet18, forward and backward, are in src/ResNet.hs; here, the process that runs them.
class HaskellProgram:
    """The compiled trainer as a subprocess; it exits when its standard input closes (the worker went away)."""

    def __init__(self, command: tuple[str, ...]):
        if not Path(command[0]).is_file():
            raise contract.ConfigError(f"{command[0]} is not built: run implementations/haskell/build.sh")
        # sgemm runs on OpenBLAS's threads (OPENBLAS_NUM_THREADS, default: every core).
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def request(self, line: str, *arrays: np.ndarray, reply: tuple[tuple[type, int], ...] = (),
                progress: Callable[[int], None] | None = None):
        """Send a request and its arrays; the reply line's fields and the arrays `reply` names (dtype, length).
        `progress` gets the steps done from each "progress K" line that comes before the reply."""
        self.process.stdin.write(line.encode() + b"\n")
        for array in arrays:
            self.process.stdin.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        self.process.stdin.flush()
        answer = self.process.stdout.readline().decode().split()
        while progress is not None and answer[:1] == ["progress"]:
            progress(int(answer[1]))
            answer = self.process.stdout.readline().decode().split()
        if not answer:
            raise RuntimeError(f"the Haskell trainer exited (code {self.process.poll()}) during {line.split()[0]!r}")
        if answer[0] != "ok":
            raise RuntimeError(f"the Haskell trainer failed on {line.split()[0]!r}: {' '.join(answer[1:])}")
        payloads = [np.frombuffer(self.process.stdout.read(np.dtype(dtype).itemsize * n), dtype=dtype)
                    for dtype, n in reply]
        return answer[1:], payloads


def f32(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype="<f4")


def i32(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype="<i4")


# --- State -----------------------------------------------------------------------------------------------------------
def select_device(config: contract.RunConfig) -> str:
    if config.device == "cuda":
        raise contract.Unsupported("--device cuda: the Haskell row runs on the CPU only (OpenBLAS's sgemm)")
    return "CPU"


class HaskellTrainer(contract.Trainer):
    command = (str(PROGRAM),)  # bench/profile_haskell.py runs a profiling build instead

    def build(self, weights):
        if self.config.precision != "fp32":
            raise contract.Unsupported(f"--precision {self.config.precision}: the Haskell row trains in float32 only")
        self.device = select_device(self.config)
        self.program = HaskellProgram(self.command)
        recipe = (f"{name}={json.dumps(value, separators=(',', ':'))}" for name, value in contract.recipe().items())
        self.program.request(" ".join(("recipe", *recipe)))
        self.program.request(f"schedule {len(self.schedule)}", f32(self.schedule))
        data = self.data  # [N, 1, 28, 28] is, byte for byte, the program's NHWC [N, 28, 28, 1]
        self.program.request(f"data {len(data.train_labels)} {len(data.test_labels)}", f32(data.train_images),
                             i32(data.train_labels), f32(data.test_images), i32(data.test_labels))
        self.import_weights(weights)

    def environment(self):
        versions, _ = self.program.request("version")
        return {"framework_version": " ".join(versions), "device": self.device}

    def memory_peak_bytes(self):
        """The program's peak resident memory: the harness's own figure is the worker's, which does not include it."""
        status = Path(f"/proc/{self.program.process.pid}/status")
        if not status.is_file():  # Linux reports it; elsewhere there is no figure
            return None
        kib = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(kib) * 1024

    def trainable_parameters(self):
        (count,), _ = self.program.request("trainable_parameters")
        return int(count)

    # --- Train step --------------------------------------------------------------------------------------------------
    # The program's trainStep is one SGD step on a batch it holds; this hands it a batch from outside.
    def train_on_batch(self, images, labels):
        (loss,), _ = self.program.request(f"train_on_batch {len(labels)}", f32(images), i32(labels))
        return float(loss)

    def learning_rates(self, steps):
        _, (rates,) = self.program.request(f"learning_rates {len(steps)}", i32(steps),
                                           reply=((np.float32, len(steps)),))
        return rates

    # --- Epoch -------------------------------------------------------------------------------------------------------
    def train_batches(self, batches):
        (mean_loss, seconds), (labels,) = self.program.request(
            f"train_batches {len(batches)} {batches.shape[1]}", i32(batches), reply=((np.int32, batches.size),),
            progress=self.progress_meter(batches).step)
        return contract.EpochResult(float(mean_loss), batches.size, float(seconds), contract.label_digest(labels))

    def warm_up(self):
        """Compiled ahead of time: there is nothing to trace."""

    # --- Evaluation --------------------------------------------------------------------------------------------------
    def evaluate(self):
        (loss_sum, correct), _ = self.program.request(f"evaluate {contract.EVAL_BATCH_SIZE}")
        n = len(self.data.test_labels)
        return contract.Evaluation(float(loss_sum) / n, int(correct) / n)

    def logits(self, images, train):
        _, (logits,) = self.program.request(f"logits {len(images)} {int(train)}", f32(images),
                                            reply=((np.float32, len(images) * contract.NUM_CLASSES),))
        return logits.reshape(len(images), contract.NUM_CLASSES)

    # --- Canonical weights -------------------------------------------------------------------------------------------
    # The program converts layouts (OIHW -> [kh, kw, in, out], linear [out, in] -> [in, out]) in ResNet.hs.
    def import_weights(self, weights):
        self.program.request("import", import_canonical(weights))

    def export_weights(self):
        _, (flat,) = self.program.request("export", reply=((np.float32, canonical_size()),))
        return export_canonical(flat)


def canonical_size() -> int:
    return sum(int(np.prod(shape)) for shape in contract.canonical_shapes().values())


def import_canonical(weights: contract.Weights) -> np.ndarray:
    """Canonical weights as the program reads them: every tensor, in state_dict order, flattened and concatenated."""
    checked = contract.check_weights(weights)
    return f32(np.concatenate([checked[name].ravel() for name in contract.canonical_shapes()]))


def export_canonical(flat: np.ndarray) -> contract.Weights:
    weights, offset = {}, 0
    for name, shape in contract.canonical_shapes().items():
        size = int(np.prod(shape))
        weights[name] = flat[offset:offset + size].reshape(shape).copy()
        offset += size
    return weights
