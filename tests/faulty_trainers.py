"""Implementations that fail the way real ones do, run by the harness tests through --framework-module.

They are the PyTorch reference with one fault each, so the failures come from a real framework in a real worker.
"""

import os
import signal
import time
from pathlib import Path

import torch

from implementations.pytorch.trainer import TorchTrainer


class RaisingTrainer(TorchTrainer):
    """A shape bug: PyTorch itself raises inside the epoch."""

    def train_epoch(self, epoch):
        self.network(torch.zeros(2, 3, 28, 28))  # 3 channels into a 1-channel stem
        return super().train_epoch(epoch)


class SelfKillingTrainer(TorchTrainer):
    """Dies mid-epoch the way the out-of-memory killer ends a process: SIGKILL, no goodbye."""

    def train_epoch(self, epoch):
        self.train_on_batch(self.data.train_images[:128], self.data.train_labels[:128])
        os.kill(os.getpid(), signal.SIGKILL)


class HangingTrainer(TorchTrainer):
    """Never finishes its epoch (a deadlock, say); touches $HANG_MARKER, if set, when it starts hanging."""

    def train_epoch(self, epoch):
        if os.environ.get("HANG_MARKER"):
            Path(os.environ["HANG_MARKER"]).touch()
        time.sleep(3600)


class TorchVersionTrainer(TorchTrainer):
    """Returns torch's own version object, a str subclass that only torch can unpickle."""

    def environment(self):
        return {**super().environment(), "framework_version": torch.__version__}


class NotATrainer:
    """What a typo in --framework-module can name: a class, but no contract.Trainer."""
