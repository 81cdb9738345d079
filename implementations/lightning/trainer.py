"""ResNet18 on MNIST in PyTorch Lightning: the PyTorch page's model, SGD and weight conversion, trained by `pl.Trainer`.

Lightning owns the loop: a LightningModule holds the training step, the per-step schedule and the test step, and the
Trainer runs them over DataLoaders of device-resident batches, one `fit` per epoch, and evaluates with `Trainer.test`.
A page of the Rosetta stone: the sections of contract.PAGE_SECTIONS, in order, and the names every page uses.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from implementations import contract
from implementations.pytorch.trainer import (ResNet18, batches_of_all_replicas, device_data, devices_environment,
                                              export_canonical, import_canonical, init_data_parallel, make_optimizer,
                                              mean_over_replicas, process_group_backend, select_device,
                                              synchronize_batchnorm)

LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}  # bf16-mixed: autocast around each step, fp32 weights

# Every import_weights() builds a Trainer: keep Lightning's report of the devices it found, and its advice to add
# DataLoader workers (they would only copy batches that already sit on the device), out of the worker's output.
logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)  # torch 2.13 deprecates a class Lightning 2.6 uses


# --- Model -----------------------------------------------------------------------------------------------------------
class ResNet18Module(pl.LightningModule):
    """The PyTorch page's ResNet18 and SGD, with the shared schedule as a per-step LambdaLR."""

    def __init__(self, schedule: np.ndarray):
        super().__init__()
        self.model = ResNet18()
        self.schedule = schedule
        self.losses: list[torch.Tensor] = []  # the current epoch's record, on the device: one loss per step
        self.fed_labels: list[torch.Tensor] = []  # and the labels that training_step received
        self.progress: contract.ProgressMeter | None = None  # the current fit's, set by the trainer

    def forward(self, images):
        return self.model(images)

    def reset_optimizer(self) -> None:
        """Fresh momentum, and the schedule back at step 0."""
        self.optimizer = make_optimizer(self.model, lr=1.0)
        # LambdaLR sets the rate to the optimizer's initial 1.0 times the lambda: exactly the table's entry.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.scheduled_rate)

    def scheduled_rate(self, step: int) -> float:
        # LambdaLR also computes the rate of the step after the run's last one: the triangle has decayed to zero there.
        return float(self.schedule[step]) if step < len(self.schedule) else 0.0

    def configure_optimizers(self):
        # Lightning calls this at every fit(), and this page fits once per epoch: it hands over the optimizer and the
        # scheduler that reset_optimizer() made, so that momentum and the schedule's step carry on from epoch to epoch.
        return {"optimizer": self.optimizer, "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"}}

    def on_train_epoch_start(self):
        self.losses, self.fed_labels = [], []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        # Not self.log("train_loss", ..., on_epoch=True): it would average on the device too, but costs ~0.25 ms of
        # Python per call (measured), as much as all the rest of Lightning's loop around a step.
        self.losses.append(loss.detach())
        self.fed_labels.append(labels)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.progress is not None:
            self.progress.step(batch_idx + 1, wait=self.losses[-1].item)

    def test_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images).float()
        # Sums over the test set, divided by its size in evaluate() as on the PyTorch page: the count stays exact.
        # (Lightning's default reduction, the mean of batch means weighted by batch_size, would give the same means.)
        # sync_dist: with replicas, each tests its part of the test set and the sums add up across them.
        self.log("test_loss_sum", F.cross_entropy(logits, labels, reduction="sum"), reduce_fx="sum", sync_dist=True)
        self.log("test_correct", (logits.argmax(1) == labels).sum().float(), reduce_fx="sum", sync_dist=True)


# --- State -----------------------------------------------------------------------------------------------------------
def device_batches(images: torch.Tensor, labels: torch.Tensor, batches: Sequence[torch.Tensor]) -> DataLoader:
    """(images, labels) batches gathered on the device by the index tensors of `batches` (the rows of a [steps, size]
    tensor, say): no host copy, no worker processes."""
    # batch_size=None: each item of the dataset, a tensor of indices, already is a batch; collate_fn gathers it.
    return DataLoader(batches, batch_size=None, collate_fn=lambda indices: (images[indices], labels[indices]))


class StayOnDevice(pl.strategies.SingleDeviceStrategy):
    """Lightning's one-device strategy without its teardown, which after every fit() and test() moves the model and the
    optimizer state to the CPU and empties CUDA's cache: this page fits once per epoch, and the next fit would move
    them back, inside the timed epoch."""

    def teardown(self) -> None:
        pass


class StayOnDeviceDDP(pl.strategies.DDPStrategy):
    """Lightning's DDP over the processes that the harness started with torchrun's variables (Lightning launches none
    where LOCAL_RANK is set), without the teardown's moves (see StayOnDevice): after each fit only the DDP wrapper goes,
    and the next fit wraps the module again."""

    def teardown(self) -> None:
        self.model = self.lightning_module


class LightningTrainer(contract.Trainer):
    data_parallel = "Lightning's DDPStrategy (torch.distributed), one process per replica"

    def build(self, weights):
        self.rank, self.replicas = init_data_parallel(self.config)
        self.device = select_device(self.config)
        self.module = ResNet18Module(self.schedule)
        if self.replicas > 1:
            # Joined here, not at the first fit, so that environment() can gather; Lightning then finds it joined.
            torch.distributed.init_process_group(process_group_backend(self.device))
            # The PyTorch page's synchronized BatchNorm: Lightning's sync_batchnorm is nn.SyncBatchNorm, GPU-only.
            self.module.model = synchronize_batchnorm(self.module.model, self.device)
        # Channels-last, as on the PyTorch page; Lightning's own move to the device keeps the layout.
        self.module.to(self.device, memory_format=torch.channels_last)
        if self.config.compile:
            self.module.model.compile()  # in place: the state_dict keeps its canonical names
        self.train_images, self.train_labels, self.test_images, self.test_labels = device_data(self.data, self.device)
        self.import_weights(weights)

    def environment(self):
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        return {"framework_version": pl.__version__, **devices_environment(name)}

    def memory_peak_bytes(self):
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def trainable_parameters(self):
        return sum(parameter.numel() for parameter in self.module.parameters() if parameter.requires_grad)

    def new_trainer(self) -> pl.Trainer:
        # Lightning's strategy selects the GPU by its index; torch.device("cuda") stands for the current one.
        device = torch.device("cuda", torch.cuda.current_device()) if self.device.type == "cuda" else self.device
        strategy = StayOnDevice(device)
        if self.replicas > 1:  # gloo on CPU, NCCL on GPUs; each rank's loader holds its shards: no sampler of Lightning's
            strategy = StayOnDeviceDDP(process_group_backend=process_group_backend(self.device))
        # Nothing but the loop: no checkpoints, logger, progress bar, model summary or sanity validation in the epochs.
        return pl.Trainer(accelerator=self.device.type, strategy=strategy, devices=self.replicas,
                          use_distributed_sampler=False, precision=LIGHTNING_PRECISION[self.config.precision], max_epochs=0,
                          benchmark=self.device.type == "cuda", num_sanity_val_steps=0, enable_checkpointing=False,
                          logger=False, enable_progress_bar=False, enable_model_summary=False)

    # --- Train step --------------------------------------------------------------------------------------------------
    # Lightning's own step is ResNet18Module.training_step, which pl.Trainer runs inside fit().
    def fit_one_more_epoch(self, loader) -> None:
        """One more Lightning epoch over `loader`, continuing the run: same optimizer, scheduler and step counters."""
        # The harness times each epoch apart, evaluating in between, so Lightning cannot be handed the whole run at
        # once: the page raises max_epochs by one and calls fit() again, and the Trainer resumes where it stopped.
        self.module.train()  # logits(train=False) may have left eval mode, which Lightning does not undo
        self.trainer.fit_loop.max_epochs = self.trainer.current_epoch + 1
        self.trainer.fit(self.module, train_dataloaders=loader)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # A one-batch fit: the step runs the very path that train_batches runs (Lightning's optimization loop, precision
        # plugin and scheduler stepping), so the parity tests check what the benchmark times.
        self.fit_one_more_epoch(DataLoader([(images, labels)], batch_size=None))
        return self.module.losses[0]

    def train_on_batch(self, images, labels):
        shard = contract.replica_shard(len(labels), self.rank, self.replicas)
        images = torch.from_numpy(images[shard]).to(self.device).contiguous(memory_format=torch.channels_last)
        loss = self.train_step(images, torch.from_numpy(labels[shard]).to(self.device).long())
        return mean_over_replicas(loss).item()

    def learning_rates(self, steps):
        scheduler = self.module.scheduler  # LambdaLR's rule (its get_lr) at each step, read without stepping it
        rate = lambda step: scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step)
        return np.array([rate(int(step)) for step in steps], dtype=np.float32)

    # --- Epoch -------------------------------------------------------------------------------------------------------
    def train_batches(self, batches):
        # The harness picks the batches; Lightning's current_epoch also counts train_step's one-batch fits.
        start = time.perf_counter()
        shards = torch.from_numpy(batches[:, contract.replica_shard(batches.shape[1], self.rank, self.replicas)])
        self.module.progress = self.progress_meter(batches)
        self.fit_one_more_epoch(device_batches(self.train_images, self.train_labels, shards.to(self.device)))
        self.module.progress = None
        mean_loss = mean_over_replicas(torch.stack(self.module.losses)).mean().item()  # .item(): the time is real
        seconds = time.perf_counter() - start
        fed = batches_of_all_replicas(torch.stack(self.module.fed_labels))
        return contract.EpochResult(mean_loss, batches.size, seconds, contract.label_digest(fed.cpu().numpy()))

    # --- Evaluation --------------------------------------------------------------------------------------------------
    # Lightning's own evaluation step is ResNet18Module.test_step, which pl.Trainer runs inside test().
    def evaluate(self):
        n = len(self.test_labels)
        part = torch.arange(n, device=self.device)[contract.replica_shard(n, self.rank, self.replicas)]
        loader = device_batches(self.test_images, self.test_labels, part.split(contract.EVAL_BATCH_SIZE))
        [metrics] = self.trainer.test(self.module, loader, verbose=False)  # eval mode, inference mode, autocast
        return contract.Evaluation(metrics["test_loss_sum"] / n, metrics["test_correct"] / n)

    @torch.no_grad()
    def logits(self, images, train):
        self.module.train(train)
        images = torch.from_numpy(images).to(self.device).contiguous(memory_format=torch.channels_last)
        with self.trainer.precision_plugin.forward_context():  # the autocast that Lightning wraps around each step
            return self.module(images).float().cpu().numpy()

    # --- Canonical weights -------------------------------------------------------------------------------------------
    # The PyTorch page's conversion, applied to the same nn.Module inside the LightningModule.
    def import_weights(self, weights):
        import_canonical(self.module.model, weights)
        self.module.reset_optimizer()
        self.trainer = self.new_trainer()  # a new run: Lightning's epoch and step counters start at 0 too

    def export_weights(self):
        return export_canonical(self.module.model)
